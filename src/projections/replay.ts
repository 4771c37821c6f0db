import { randomBytes } from 'node:crypto'
import { type Kysely, type RawBuilder, sql, type Transaction } from 'kysely'
import type { EventStore, Position, RecordedEvent } from '../event-store/port.js'
import { matchesFilter, START } from '../event-store/port.js'
import { applyBatch, applyInTransaction, asOnlyRebuild, lockProjection, readCheckpoint } from './checkpoints.js'
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

/**
 * An audit's copy whose lock (a hash of its checkpoint's name) is no projection's: the audit applies the
 * last stretch to its shadow on other connections while it holds the live copy's lock, and a live runner
 * may wait for that lock holding the locks of other projections; a copy sharing one of those would wait
 * for ever.
 */
async function freeAuditCopy(db: Kysely<any>, name: string): Promise<Copy> {
  for (;;) {
    const copy = auditCopy(name)
    const { rows } = await sql<{ taken: boolean }>`
      select exists (
        select from (select name from public.projection_checkpoints union select ${name}) as p
        where hashtext(p.name) = hashtext(${copy.checkpoint}) and p.name <> ${copy.checkpoint}) as taken`.execute(db)
    if (!rows[0]?.taken) return copy
  }
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

/** Runs `f` in a transaction on a copy: its lock held, its schema first in the search path. */
async function inCopy(db: Kysely<any>, copy: Copy, f: (trx: Transaction<any>) => Promise<void>): Promise<void> {
  await db.transaction().execute(async (trx) => {
    await lockProjection(trx, copy.checkpoint)
    await sql`set local search_path to ${sql.id(copy.schema)}, public`.execute(trx)
    await f(trx)
  })
}

async function dropCopy(db: Kysely<any>, copy: Copy): Promise<void> {
  await sql`drop schema if exists ${sql.id(copy.schema)} cascade`.execute(db)
  await sql`delete from public.projection_checkpoints where name = ${copy.checkpoint}`.execute(db)
}

/**
 * Replays the log after `from` into a copy, one transaction per page, up to `until` (inclusive) or to
 * the end of the log. The next page is read while the current one is applied. With `trx`, everything
 * happens inside that transaction. With `throwaway` (an audit's shadow), the page transactions commit
 * without waiting for the write-ahead log to reach the disk: a crash loses nothing that is kept. Returns
 * the copy's new position.
 */
async function replay(
  deps: ReplayDeps,
  projection: Projection,
  copy: Copy,
  from: Position,
  options: { until?: Position; trx?: Transaction<any>; throwaway?: boolean } = {},
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
    // keeps an unhandled rejection of the read ahead from ending the process while this page is applied
    next.catch(() => {})
    if (options.trx) await applyInTransaction(options.trx, projection, copy, events, position)
    else if (options.throwaway) {
      await deps.db.transaction().execute(async (trx) => {
        await sql`set local synchronous_commit = off`.execute(trx)
        await applyInTransaction(trx, projection, copy, events, position)
      })
    } else await applyBatch(deps.db, projection, copy, events, position)
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
 * one's name and its checkpoint becomes the live checkpoint. Returns the new checkpoint. Two rebuilds of one
 * projection run one after the other (see asOnlyRebuild).
 */
export async function rebuild(deps: ReplayDeps, projection: Projection): Promise<Position> {
  return asOnlyRebuild(deps.db, projection.name, () => rebuildAlone(deps, projection))
}

async function rebuildAlone(deps: ReplayDeps, projection: Projection): Promise<Position> {
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

/** Runs `f` in a transaction of its own on the shadow copy (its schema first in the search path). */
export type InShadow = <T>(f: (trx: Transaction<any>) => Promise<T>) => Promise<T>

/**
 * A projection's faster way to fill an audit's empty shadow copy up to the live checkpoint, in place of
 * its own `apply` page by page: `begin` once, on the freshly created tables; `add` for every page of the
 * stretch, each event exactly once, but with the pages in no particular order (several readers read
 * parts of the log at once), so what it keeps must not depend on the order; `finish` once, after the
 * last page. From then on the tables must hold exactly the rows, byte for byte, that the projection's
 * own `apply` gives over the same events, with their keys and indexes: `apply` takes over for the last
 * stretch under the lock. Each runs its statements with `inShadow`, as many transactions as it likes,
 * at once if it likes; the shadow is dropped after the audit, so its tables may be unlogged. A failure
 * anywhere ends the audit.
 */
export interface BulkLoad {
  begin(inShadow: InShadow): Promise<void>
  add(events: RecordedEvent[], inShadow: InShadow): Promise<void>
  finish(inShadow: InShadow): Promise<void>
}

/** Readers of the log at once in a bulk load, and the parts of the log they share out. */
const BULK_READERS = 2
const BULK_PARTS = 8

/**
 * Replays the log from the start up to `until` (inclusive) into an audit's empty shadow through a bulk
 * load: `BULK_READERS` readers take the parts of the position range one after another (a reader reads a
 * part's next page while the current one is added), so that reading, decoding and adding overlap; then
 * the load finishes and the shadow's checkpoint is set to `until`. Returns `until`.
 */
async function bulkReplay(deps: ReplayDeps, projection: Projection, copy: Copy, bulk: BulkLoad, until: Position): Promise<Position> {
  const size = deps.batchSize ?? 20_000
  const inShadow: InShadow = (f) => deps.db.transaction().execute(async (trx) => {
    await sql`set local synchronous_commit = off`.execute(trx)
    await sql`set local search_path to ${sql.id(copy.schema)}, public`.execute(trx)
    return f(trx)
  })
  await bulk.begin(inShadow)
  const parts: [Position, Position][] = []
  const span = until - START
  for (let i = 0n, n = BigInt(BULK_PARTS); i < n; i++) {
    const [from, to] = [START + (span * i) / n, START + (span * (i + 1n)) / n]
    if (to > from) parts.push([from, to])
  }
  // Positions per event (the log's density) over the pages read so far: a part's last read asks for
  // about as many events as are left in it (an eighth of a page at least: positions come in lumps, one
  // per transaction), not a whole page that would mostly lie in the next part, read and thrown away.
  let positions = 0
  let scanned = 0
  const limit = (after: Position, to: Position) =>
    scanned === 0 ? size : Math.min(size, Math.max(Math.ceil(size / 8), Math.ceil((Number(to - after) * scanned * 1.1) / positions)))
  let failed = false
  const reader = async () => {
    for (let part = parts.shift(); part && !failed; part = parts.shift()) {
      const [from, to] = part
      let after = from
      let next = readPage(deps, projection, after, limit(after, to))
      for (;;) {
        const page = await next
        if (page.scanned > 0) {
          positions += Number(page.last - after)
          scanned += page.scanned
        }
        // each event once, as the checkpoint makes sure page by page: a store may deliver one again
        const events = page.events.filter((e) => e.position > after && e.position <= to)
        const more = page.scanned > 0 && page.last < to
        if (more) {
          after = page.last
          next = readPage(deps, projection, after, limit(after, to))
          next.catch(() => {}) // awaited above on the next turn; not an unhandled rejection meanwhile
        }
        if (events.length > 0) await bulk.add(events, inShadow)
        if (!more || failed) break
      }
    }
  }
  const stopOthers = (error: unknown) => {
    failed = true
    throw error
  }
  // every reader ends before the audit goes on (or drops the shadow); the first failure is the audit's
  const results = await Promise.allSettled(Array.from({ length: BULK_READERS }, () => reader().catch(stopOthers)))
  for (const r of results) if (r.status === 'rejected') throw r.reason
  await bulk.finish(inShadow)
  await inCopy(deps.db, copy, async (trx) => {
    await sql`
      insert into public.projection_checkpoints (name, position, version) values (${copy.checkpoint}, ${until.toString()}, ${projection.version})
      on conflict (name) do update set position = excluded.position, version = excluded.version, updated_at = now()`.execute(trx)
  })
  return until
}

/** For the audit's comparison and inspection: their joins, sorts and aggregates in memory, not in temporary files. */
const WORK_MEM = sql.lit('128MB')

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
    /**
     * Extra figures for the report: runs alongside the comparison, in a transaction of its own, with both
     * copies in place and still (the live one cannot move until the audit ends); `compared` is the
     * comparison's outcome, for figures that depend on it.
     */
    inspect?: (trx: Transaction<any>, schemas: { live: string; replayed: string }, compared: Promise<TableAudit[]>) => Promise<X>
    /** Builds the shadow up to the live checkpoint with this instead of `projection.apply`; one per audit. */
    bulkLoad?: BulkLoad
  } = {},
): Promise<AuditReport & { extra: X }> {
  const copy = await freeAuditCopy(deps.db, projection.name)
  const live = readCheckpoint(deps.db, projection.name)
  const target = (await live)?.position
  if (target === undefined) throw new Error(`projection ${projection.name} has no live copy yet: start dcp once first`)
  await resetCopy(deps.db, projection, copy)
  try {
    const replayed = options.bulkLoad
      ? await bulkReplay(deps, projection, copy, options.bulkLoad, target)
      : await replay(deps, projection, copy, START, { until: target, throwaway: true })
    return await deps.db.transaction().execute(async (trx) => {
      await lockProjection(trx, projection.name)
      await sql`set local work_mem = ${WORK_MEM}`.execute(trx)
      const now = (await readCheckpoint(trx, projection.name))!.position
      // The last stretch, committed on its own connections (the live copy cannot move meanwhile: this
      // transaction holds its lock), so that the inspection can read the finished shadow on a connection
      // of its own while this one compares.
      const position = await replay(deps, projection, copy, replayed, { until: now, throwaway: true })
      const schemas = { live: liveSchema(projection.name), replayed: copy.schema }
      const compared = (async () => {
        const tables: TableAudit[] = []
        for (const table of projection.tables) {
          tables.push(await compareTable(trx, schemas.live, schemas.replayed, table, options.maxDifferences ?? 100, options.where?.(table.name)))
        }
        return tables
      })()
      const inspect = options.inspect
      const inspected = inspect
        ? deps.db.transaction().execute(async (other) => {
            await sql`set local work_mem = ${WORK_MEM}`.execute(other)
            return inspect(other, schemas, compared)
          })
        : Promise.resolve(undefined as X)
      const [tables, extra] = await Promise.all([compared, inspected])
      const ok = tables.every((t) => t.differenceCount === 0)
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
