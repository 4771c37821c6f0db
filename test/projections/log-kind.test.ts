/**
 * Projection checkpoints are positions in one event log: a database whose read models were built from the
 * Postgres log is refused when dcp starts on EventStoreDB, and the other way round. The check is about the
 * checkpoints table (Postgres either way), so it runs here without an EventStoreDB server: the refusal comes
 * before the EventStoreDB store is first used.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { sql } from 'kysely'
import t, { type Test } from 'tap'
import { loadConfig } from '../../src/config.js'
import { openPlatform } from '../../src/platform.js'
import { CheckpointsFromOtherLogError } from '../../src/projections/log-kind.js'
import type { Database } from '../../src/postgres/database.js'
import { freshDatabase } from '../helpers/database.js'

const NO_SERVER = 'esdb://127.0.0.1:1?tls=false&defaultDeadline=2000'

async function configFor(t: Test, database: Database, eventStoreUrl?: string) {
  const dataDir = await mkdtemp(path.join(tmpdir(), 'dcp-log-kind-'))
  t.teardown(() => rm(dataDir, { recursive: true, force: true }))
  return loadConfig({ DATABASE_URL: database.url, DATA_DIR: dataDir, ...(eventStoreUrl ? { EVENTSTORE_URL: eventStoreUrl } : {}) })
}

const recordedKind = async (database: Database) =>
  (await sql<{ kind: string }>`select kind from event_log_kind`.execute(database.db)).rows.map((r) => r.kind)

t.test('read models built from the Postgres log: dcp refuses to start on EventStoreDB', async (t) => {
  const database = await freshDatabase(t)
  // given read models built from the Postgres log
  const onPostgres = await openPlatform(await configFor(t, database))
  await onPostgres.store.append('customer-c1', [{ type: 'Noted', data: {} }])
  await onPostgres.projections.rebuild('event_counts')
  await onPostgres.close()
  t.same(await recordedKind(database), ['postgres'])

  // when dcp starts on EventStoreDB, then it refuses, saying what to do
  const esdbConfig = await configFor(t, database, NO_SERVER)
  const refused = await openPlatform(esdbConfig).catch((e: unknown) => e)
  t.type(refused, CheckpointsFromOtherLogError)
  t.match((refused as Error).message, /built from the Postgres log.*starting on EventStoreDB.*empty database \(DATABASE_URL\)/)

  // a database from before the kind was recorded: its events table tells
  await sql`delete from event_log_kind`.execute(database.db)
  await t.rejects(openPlatform(esdbConfig), CheckpointsFromOtherLogError, 'told by the Postgres events')

  // on the Postgres log again it starts, and records it
  const again = await openPlatform(await configFor(t, database))
  await again.close()
  t.same(await recordedKind(database), ['postgres'])
})

t.test('an empty database starts on EventStoreDB; its checkpoints then refuse the Postgres log', async (t) => {
  const database = await freshDatabase(t)
  // with no server the start goes as far as the log's first use (completing unfinished multi-stream writes),
  // and stops there, saying it cannot reach it; the checkpoints were claimed for EventStoreDB before that
  const unreachable = /UNAVAILABLE|ECONNREFUSED|unavailable|connect/
  await t.rejects(openPlatform(await configFor(t, database, NO_SERVER)), unreachable, 'no EventStoreDB here')
  t.same(await recordedKind(database), ['eventstoredb'])
  // the Postgres log while nothing is built: allowed, and recorded
  const before = await openPlatform(await configFor(t, database))
  await before.close()
  t.same(await recordedKind(database), ['postgres'])
  await t.rejects(openPlatform(await configFor(t, database, NO_SERVER)), unreachable)
  // a read model built from EventStoreDB (a checkpoint at one of its positions; none can be built here)
  await sql`insert into projection_checkpoints (name, position, version) values ('event_counts', 4096, 1)`.execute(database.db)
  const refused = await openPlatform(await configFor(t, database)).catch((e: unknown) => e)
  t.type(refused, CheckpointsFromOtherLogError)
  t.match((refused as Error).message, /built from EventStoreDB.*starting on the Postgres log/)
})
