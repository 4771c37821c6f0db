import { randomBytes } from 'node:crypto'
import { type Kysely, type RawBuilder, sql, type Transaction } from 'kysely'
import type { EventStore, Position } from '../event-store/port.js'
import { matchesFilter, START } from '../event-store/port.js'
import { applyBatch, applyInTransaction, lockProjection, readCheckpoint } from './checkpoints.js'
import { liveSchema, type Projection } from './projection.js'

export interface ReplayDeps {
  db: Kysely<any>
  store: EventStore
  /** Events scanned and applied per transaction. Default 20,000. */
  batchSize?: number
}

/** A copy of a projection other than the live one: its schema and its checkpoint's name. */
interface Copy {
  schema: string
  checkpoint: string
}

const rebuildCopy = (name: string): Copy => ({ schema: `rm_${name}__rebuild`, checkpoint: `${name}__rebuild` })
/** Each audit replays into a shadow of its own, so two audits at once (CLI and admin API) do not meet. */
const auditCopy = (name: string): Copy => {
  const id = randomBytes(4).toString('hex')
  return { schema: `rm_${name}__audit_${id}`, checkpoint: `${name}__audit_${id}` }
}

/** Drops and creates a copy's schema and tables, and forgets its checkpoint. */
async function resetCopy(db: Kysely<any>, projection: Projection, copy: Copy): Promise<void> {
  await db.transaction().execute(async (trx) => {
    await lockProjection(trx, copy.checkpoint)
    await sql`drop schema if exists ${sql.id(copy.schema)} cascade`.execute(trx)
    await sql`create schema ${sql.id(copy.schema)}`.execute(trx)
    await sql`set local search_path to ${sql.id(copy.schema)}, public`.execute(trx)
    await projection.createTables(trx)
    await sql`delete from public.projection_checkpoints where name = ${copy.checkpoint}`.execute(trx)
  })
}

async function dropCopy(db: Kysely<any>, copy: Copy): Promise<void> {
  await sql`drop schema if exists ${sql.id(copy.schema)} cascade`.execute(db)
  await sql`delete from public.projection_checkpoints where name = ${copy.checkpoint}`.execute(db)
}

/**
 * Replays the log after `from` into a copy, one transaction per page, up to `until` (inclusive) or to
 * the end of the log. The next page is read while the current one is applied. With `trx`, everything
 * happens inside that transaction. Returns the copy's new position.
 */
async function replay(
  deps: ReplayDeps,
  projection: Projection,
  copy: Copy,
  from: Position,
  options: { until?: Position; trx?: Transaction<any> } = {},
): Promise<Position> {
  const size = deps.batchSize ?? 20_000
  const until = options.until
  const done = (position: Position) => until !== undefined && position >= until
  let position = from
  let next = done(position) ? Promise.resolve(undefined) : readPage(deps, projection, position, size)
  for (;;) {
    const page = await next
    if (!page || page.scanned === 0) return position
    const events = until === undefined ? page.events : page.events.filter((e) => e.position <= until)
    position = until !== undefined && page.last > until ? until : page.last
    next = done(position) ? Promise.resolve(undefined) : readPage(deps, projection, position, size)
    if (options.trx) await applyInTransaction(options.trx, projection, copy, events, position)
    else await applyBatch(deps.db, projection, copy, events, position)
  }
}

/**
 * The next page for a projection: filtered while reading when the store can (only the events the
 * projection handles are read in full), else `readAll` filtered here.
 */
async function readPage(deps: ReplayDeps, projection: Projection, after: Position, size: number) {
  const store = deps.store
  if (store.readFilteredPage && projection.filter) {
    for (let attempt = 0; ; attempt++) {
      const page = await store.readFilteredPage(after, size, projection.filter)
      // held before anything: a transaction below is still open; it commits or aborts in a moment
      if (page.scanned > 0 || !page.held || attempt >= 50) return page
      await new Promise((resolve) => setTimeout(resolve, 20))
    }
  }
  const all = await store.readAll(after, size)
  return { events: all.filter((e) => matchesFilter(e, projection.filter)), scanned: all.length, last: all.at(-1)?.position ?? after, held: false }
}

/**
 * Builds a fresh copy of a projection from the whole log while the live one keeps serving, then swaps it
 * in: under the projection's lock, the copy catches up with the last events, its schema takes the live
 * one's name and its checkpoint becomes the live checkpoint. Returns the new checkpoint.
 */
export async function rebuild(deps: ReplayDeps, projection: Projection): Promise<Position> {
  const copy = rebuildCopy(projection.name)
  const live = { schema: liveSchema(projection.name), checkpoint: projection.name }
  await resetCopy(deps.db, projection, copy)
  // Up to the head as it is now: under a steady stream of appends, "until the log ends" would never come.
  const caughtUp = await replay(deps, projection, copy, START, { until: await deps.store.headPosition() })
  return deps.db.transaction().execute(async (trx) => {
    await lockProjection(trx, live.checkpoint)
    // the last stretch under the lock; what comes after it is the live runner's, from the checkpoint
    const position = await replay(deps, projection, copy, caughtUp, { trx, until: await deps.store.headPosition() })
    await sql`set local search_path to public`.execute(trx)
    await sql`drop schema if exists ${sql.id(live.schema)} cascade`.execute(trx)
    await sql`alter schema ${sql.id(copy.schema)} rename to ${sql.id(live.schema)}`.execute(trx)
    await sql`delete from public.projection_checkpoints where name = ${copy.checkpoint}`.execute(trx)
    await sql`
      insert into public.projection_checkpoints (name, position, version)
      values (${live.checkpoint}, ${position.toString()}, ${projection.version})
      on conflict (name) do update set position = excluded.position, version = excluded.version, updated_at = now()`.execute(trx)
    return position
  })
}

export interface RowDifference {
  /** The primary key of the row. */
  key: Record<string, unknown>
  /** The live row, or null when the live read model lacks it. */
  live: Record<string, unknown> | null
  /** The row the replay produced, or null when only the live read model has it. */
  replayed: Record<string, unknown> | null
}

export interface TableAudit {
  table: string
  primaryKey: readonly string[]
  liveRows: number
  replayedRows: number
  differences: RowDifference[]
  /** All differences, when more than `differences` lists. */
  differenceCount: number
}

export interface AuditReport {
  projection: string
  /** The log position both copies were compared at. */
  position: string
  ok: boolean
  tables: TableAudit[]
}

/**
 * Replays the log into a shadow schema up to the live checkpoint and compares every table row by row.
 * The comparison runs under the projection's lock, so the live copy cannot move while it is compared.
 */
export async function audit<X = undefined>(
  deps: ReplayDeps,
  projection: Projection,
  options: {
    maxDifferences?: number
    /** Which rows to compare (an SQL condition on the table's columns); default all. */
    where?: (table: string) => RawBuilder<boolean> | undefined
    /** Runs with both copies in place, before the shadow is dropped: extra figures for the report. */
    inspect?: (trx: Transaction<any>, schemas: { live: string; replayed: string }) => Promise<X>
  } = {},
): Promise<AuditReport & { extra: X }> {
  const copy = auditCopy(projection.name)
  const live = readCheckpoint(deps.db, projection.name)
  const target = (await live)?.position
  if (target === undefined) throw new Error(`projection ${projection.name} has no live copy yet: start dcp once first`)
  await resetCopy(deps.db, projection, copy)
  try {
    const replayed = await replay(deps, projection, copy, START, { until: target })
    return await deps.db.transaction().execute(async (trx) => {
      await lockProjection(trx, projection.name)
      const now = (await readCheckpoint(trx, projection.name))!.position
      const position = await replay(deps, projection, copy, replayed, { until: now, trx })
      await sql`set local search_path to public`.execute(trx)
      const tables = []
      for (const table of projection.tables) {
        tables.push(await compareTable(trx, liveSchema(projection.name), copy.schema, table, options.maxDifferences ?? 100, options.where?.(table.name)))
      }
      const ok = tables.every((t) => t.differenceCount === 0)
      const extra = (options.inspect ? await options.inspect(trx, { live: liveSchema(projection.name), replayed: copy.schema }) : undefined) as X
      return { projection: projection.name, position: (position > now ? position : now).toString(), ok, tables, extra }
    })
  } finally {
    await dropCopy(deps.db, copy)
  }
}

async function compareTable(
  trx: Transaction<any>,
  live: string,
  shadow: string,
  table: { name: string; primaryKey: readonly string[] },
  limit: number,
  where: RawBuilder<boolean> = sql<boolean>`true`,
): Promise<TableAudit> {
  // One pass: a full join on the typed key columns, the differing rows counted by a window over them.
  // Whole rows compared as records (cheaper than as jsonb); only the differing rows are turned into JSON.
  const side = (schema: string) => sql`select t.* from ${sql.table(`${schema}.${table.name}`)} as t where ${where}`
  const key = sql.join(table.primaryKey.flatMap((c) => [sql.lit(c), sql`coalesce(${sql.ref(`l.${c}`)}, ${sql.ref(`s.${c}`)})`]))
  const on = sql.join(table.primaryKey.map((c) => sql`${sql.ref(`l.${c}`)} = ${sql.ref(`s.${c}`)}`), sql` and `)
  const present = (alias: string) => sql`case when ${sql.ref(`${alias}.${table.primaryKey[0]!}`)} is null then null else to_jsonb(${sql.raw(alias)}) end`
  const { rows } = await sql<RowDifference & { total: string }>`
    select jsonb_build_object(${key}) as key, ${present('l')} as live, ${present('s')} as replayed, count(*) over () as total
    from (${side(live)}) l full join (${side(shadow)}) s on ${on}
    where l is distinct from s
    order by 1 limit ${limit}`.execute(trx)
  const counts = await sql<{ live: string; replayed: string }>`
    select (select count(*) from ${sql.table(`${live}.${table.name}`)} as t where ${where}) as live,
           (select count(*) from ${sql.table(`${shadow}.${table.name}`)} as t where ${where}) as replayed`.execute(trx)
  const c = counts.rows[0]!
  return {
    table: table.name,
    primaryKey: table.primaryKey,
    liveRows: Number(c.live),
    replayedRows: Number(c.replayed),
    differences: rows.map(({ total: _total, ...difference }) => difference),
    differenceCount: Number(rows[0]?.total ?? 0),
  }
}
