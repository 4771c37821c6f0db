import { type Kysely, type RawBuilder, sql, type Transaction } from 'kysely'
import type { Position, RecordedEvent } from '../event-store/port.js'
import { START } from '../event-store/port.js'
import type { Projection } from './projection.js'

/** Advisory lock classes (first key); the second key is `hashtext(<checkpoint name>)`. */
const LEADER_LOCK = 0x646370_02
const BATCH_LOCK = 0x646370_03
const REBUILD_LOCK = 0x646370_04

export interface CheckpointRow {
  position: Position
  version: number
}

export async function readCheckpoint(db: Kysely<any>, name: string): Promise<CheckpointRow | undefined> {
  const { rows } = await sql<{ position: string; version: number }>`
    select position, version from public.projection_checkpoints where name = ${name}`.execute(db)
  const row = rows[0]
  return row ? { position: BigInt(row.position), version: row.version } : undefined
}

/** The checkpoints of several projections in one query (undefined where a projection has none), in the order given. */
export async function readCheckpoints(db: Kysely<any>, names: readonly string[]): Promise<(CheckpointRow | undefined)[]> {
  const { rows } = await sql<{ name: string; position: string; version: number }>`
    select name, position, version from public.projection_checkpoints where name = any(${names}::text[])`.execute(db)
  const byName = new Map(rows.map((r) => [r.name, { position: BigInt(r.position), version: r.version }]))
  return names.map((name) => byName.get(name))
}

/** Blocks the projection's writer (and other rebuilds or audits of it) until the transaction ends. */
export async function lockProjection(trx: Transaction<any>, name: string): Promise<void> {
  await lockProjections(trx, [name])
}

/** `lockProjection` for several projections in one statement, in the order given. */
export async function lockProjections(trx: Transaction<any>, names: readonly string[]): Promise<void> {
  await sql`select pg_advisory_xact_lock(${BATCH_LOCK}, hashtext(n)) from unnest(${names}::text[]) with ordinality as u(n, i) order by i`.execute(trx)
}

/** SQL that takes the batch lock of the projection named by `name` if it is free at once (true), else false; held to the transaction's end. */
export function tryLockProjection(name: RawBuilder<unknown>) {
  return sql<boolean>`pg_try_advisory_xact_lock(${BATCH_LOCK}, hashtext(${name}))`
}

/** Tries to become the one writer of a projection; held by the connection until unlocked or closed. */
export async function tryLeadership(db: Kysely<any>, name: string): Promise<boolean> {
  const { rows } = await sql<{ ok: boolean }>`select pg_try_advisory_lock(${LEADER_LOCK}, hashtext(${name})) as ok`.execute(db)
  return rows[0]?.ok === true
}

/**
 * Runs `f` as the one rebuild of a projection: every rebuild fills the same copy (`rm_<name>__rebuild`), so a
 * second one at once would empty the copy the first is filling, and the first would swap in a copy with
 * holes. A rebuild that finds another running waits for it (held by a connection of its own, for the session).
 */
export async function asOnlyRebuild<T>(db: Kysely<any>, name: string, f: () => Promise<T>): Promise<T> {
  return db.connection().execute(async (connection) => {
    await sql`select pg_advisory_lock(${REBUILD_LOCK}, hashtext(${name}))`.execute(connection)
    try {
      return await f()
    } finally {
      await sql`select pg_advisory_unlock(${REBUILD_LOCK}, hashtext(${name}))`.execute(connection)
    }
  })
}

export async function releaseLeadership(db: Kysely<any>, name: string): Promise<void> {
  await sql`select pg_advisory_unlock(${LEADER_LOCK}, hashtext(${name}))`.execute(db)
}

/**
 * Applies events to a copy of a projection (the live one or a shadow) inside `trx`, and moves that copy's
 * checkpoint in the same transaction. Events at or below the stored checkpoint are dropped first, so a
 * batch delivered twice changes nothing.
 */
export async function applyInTransaction(
  trx: Transaction<any>,
  projection: Projection,
  target: { schema: string; checkpoint: string },
  events: RecordedEvent[],
  checkpoint: Position,
): Promise<void> {
  await lockProjection(trx, target.checkpoint)
  await sql`set local search_path to ${sql.id(target.schema)}, public`.execute(trx)
  const current = (await readCheckpoint(trx, target.checkpoint))?.position ?? START
  const fresh = events.filter((e) => e.position > current)
  if (fresh.length > 0) await projection.apply(trx, fresh)
  const next = checkpoint > current ? checkpoint : current
  await sql`
    insert into public.projection_checkpoints (name, position, version) values (${target.checkpoint}, ${next.toString()}, ${projection.version})
    on conflict (name) do update set position = excluded.position, version = excluded.version, updated_at = now()`.execute(trx)
}

export async function applyBatch(
  db: Kysely<any>,
  projection: Projection,
  target: { schema: string; checkpoint: string },
  events: RecordedEvent[],
  checkpoint: Position,
): Promise<void> {
  await db.transaction().execute((trx) => applyInTransaction(trx, projection, target, events, checkpoint))
}
