import { sql } from 'kysely'
import t, { type Test } from 'tap'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import type { RecordedEvent } from '../../src/event-store/port.js'
import { applyBatch, lockProjection, readCheckpoint } from '../../src/projections/checkpoints.js'
import { eventCounts } from '../../src/projections/event-counts.js'
import type { Projection } from '../../src/projections/projection.js'
import { Projections } from '../../src/projections/projections.js'
import { audit, rebuild } from '../../src/projections/replay.js'
import { ProjectionRunner } from '../../src/projections/runner.js'
import { freshDatabase } from '../helpers/database.js'
import { eventually } from '../helpers/device.js'

async function setup(t: Test) {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  return { database, db: database.db, store }
}

async function counts(db: import('kysely').Kysely<any>, schema = 'rm_event_counts') {
  const { rows } = await sql<{ category: string; type: string; count: string }>`
    select category, type, count from ${sql.table(`${schema}.event_counts`)} order by category, type`.execute(db)
  return rows.map((r) => `${r.category}/${r.type}=${r.count}`)
}

t.test('a runner builds the read model from the log, then follows it live (read-your-writes)', async (t) => {
  const { db, store } = await setup(t)
  await store.append('device-1', [{ type: 'DeviceRegistered', data: {} }, { type: 'HeartbeatReceived', data: {} }])
  await store.append('model-1', [{ type: 'ModelUploaded', data: {} }])
  const projections = new Projections({ db, store, retryMs: 50 }, [eventCounts])
  projections.start()
  t.teardown(() => projections.stop())
  const written = await store.append('device-1', [{ type: 'HeartbeatReceived', data: {} }])
  await projections.waitFor(written.position)
  t.same(await counts(db), ['device/DeviceRegistered=1', 'device/HeartbeatReceived=2', 'model/ModelUploaded=1'])
  const [status] = await projections.status()
  t.equal(status!.state, 'live')
  t.equal(status!.checkpoint, written.position.toString())
  t.equal(status!.lag, 0)
})

t.test('a batch delivered twice changes nothing', async (t) => {
  const { db, store } = await setup(t)
  const projections = new Projections({ db, store }, [eventCounts])
  await projections.rebuild('event_counts') // an empty live copy
  await store.append('job-1', [{ type: 'A', data: {} }, { type: 'A', data: {} }])
  const events = await store.readAll()
  const live = { schema: 'rm_event_counts', checkpoint: 'event_counts' }
  await applyBatch(db, eventCounts, live, events, events.at(-1)!.position)
  await applyBatch(db, eventCounts, live, events, events.at(-1)!.position)
  await applyBatch(db, eventCounts, live, events.slice(1), events.at(-1)!.position)
  t.same(await counts(db), ['job/A=2'])
})

t.test('two rebuilds of one projection at once: one after the other, and the read model is whole', async (t) => {
  const { db, store } = await setup(t)
  for (let i = 0; i < 30; i++) await store.appendMany(Array.from({ length: 10 }, (_, j) => ({ streamId: `job-${i}-${j}`, events: [{ type: 'Tick', data: {} }] })))
  // small pages, so that the two would interleave
  const a = new Projections({ db, store, batchSize: 20 }, [eventCounts])
  const b = new Projections({ db, store, batchSize: 20 }, [eventCounts])
  const results = await Promise.allSettled([a.rebuild('event_counts'), b.rebuild('event_counts')])
  t.same(results.map((r) => r.status), ['fulfilled', 'fulfilled'], JSON.stringify(results.filter((r) => r.status === 'rejected')))
  t.same(await counts(db), ['job/Tick=300'], 'every event counted once')
  t.ok((await a.audit('event_counts')).ok)
})

t.test('a crash between the rows and the checkpoint rolls both back', async (t) => {
  const { db, store } = await setup(t)
  const crashing: Projection = {
    ...eventCounts,
    async apply(trx, events) {
      await eventCounts.apply(trx, events)
      if (events.some((e) => e.type === 'Poison')) throw new Error('killed between the rows and the checkpoint')
    },
  }
  const projections = new Projections({ db, store }, [crashing])
  await projections.rebuild('event_counts')
  await store.append('job-1', [{ type: 'A', data: {} }])
  const first = await store.readAll()
  const live = { schema: 'rm_event_counts', checkpoint: 'event_counts' }
  await applyBatch(db, crashing, live, first, first.at(-1)!.position)
  await store.append('job-1', [{ type: 'A', data: {} }, { type: 'Poison', data: {} }])
  const second = await store.readAll(first.at(-1)!.position)
  await t.rejects(applyBatch(db, crashing, live, second, second.at(-1)!.position), /killed/)
  t.same(await counts(db), ['job/A=1'], 'rows rolled back')
  t.equal((await readCheckpoint(db, 'event_counts'))!.position, first.at(-1)!.position, 'checkpoint rolled back')
})

t.test('a checkpoint write that fails rolls back the batch\'s rows: rows and checkpoint commit together', async (t) => {
  const { db, store } = await setup(t)
  const projections = new Projections({ db, store }, [eventCounts])
  await projections.rebuild('event_counts')
  await store.append('job-1', [{ type: 'A', data: {} }])
  const first = await store.readAll()
  const live = { schema: 'rm_event_counts', checkpoint: 'event_counts' }
  await applyBatch(db, eventCounts, live, first, first.at(-1)!.position)
  await store.append('job-1', [{ type: 'A', data: {} }, { type: 'B', data: {} }])
  const second = await store.readAll(first.at(-1)!.position)
  // the rows are written, then the database refuses the checkpoint (a full disk, a lost connection)
  await sql`create function refuse_checkpoint() returns trigger language plpgsql as $$
    begin raise exception 'checkpoint write refused'; end $$`.execute(db)
  await sql`create trigger refuse_checkpoint before insert or update on public.projection_checkpoints
    for each row when (new.name = 'event_counts' and new.position::text = ${sql.lit(second.at(-1)!.position.toString())}) execute function refuse_checkpoint()`.execute(db)
  await t.rejects(applyBatch(db, eventCounts, live, second, second.at(-1)!.position), /checkpoint write refused/)
  t.same(await counts(db), ['job/A=1'], 'the batch\'s rows rolled back with the checkpoint')
  t.equal((await readCheckpoint(db, 'event_counts'))!.position, first.at(-1)!.position, 'the checkpoint did not move')
  // the database takes checkpoints again: the batch is applied whole, once
  await sql`drop trigger refuse_checkpoint on public.projection_checkpoints`.execute(db)
  await applyBatch(db, eventCounts, live, second, second.at(-1)!.position)
  t.same(await counts(db), ['job/A=2', 'job/B=1'])
  t.equal((await readCheckpoint(db, 'event_counts'))!.position, second.at(-1)!.position)
})

t.test('audit names every row changed, removed or added behind its back', async (t) => {
  const { db, store } = await setup(t)
  await store.append('device-1', [{ type: 'DeviceRegistered', data: {} }])
  await store.append('model-1', [{ type: 'ModelUploaded', data: {} }])
  await store.append('job-1', [{ type: 'JobSubmitted', data: {} }])
  const projections = new Projections({ db, store }, [eventCounts])
  await projections.rebuild('event_counts')
  const clean = await projections.audit('event_counts')
  t.ok(clean.ok, 'a faithful read model passes')
  t.equal(clean.tables[0]!.liveRows, 3)

  await sql`update rm_event_counts.event_counts set count = 999 where category = 'device'`.execute(db)
  await sql`delete from rm_event_counts.event_counts where category = 'model'`.execute(db)
  await sql`insert into rm_event_counts.event_counts values ('ghost', 'Invented', 1, 1)`.execute(db)
  const report = await projections.audit('event_counts')
  t.notOk(report.ok)
  const table = report.tables[0]!
  t.equal(table.differenceCount, 3)
  const byCategory = Object.fromEntries(table.differences.map((d) => [String(d.key.category), d]))
  t.equal(byCategory.device?.live?.count, 999)
  t.equal(byCategory.device?.replayed?.count, 1)
  t.equal(byCategory.model?.live, null)
  t.same(byCategory.model?.key, { category: 'model', type: 'ModelUploaded' })
  t.equal(byCategory.ghost?.replayed, null)
  const { rows } = await sql`select nspname from pg_namespace where nspname like 'rm_%'`.execute(db)
  t.same(rows, [{ nspname: 'rm_event_counts' }], 'the shadow schema is gone afterwards')
})

t.test('rebuild swaps a fresh copy in while a runner keeps writing', async (t) => {
  const { db, store } = await setup(t)
  const projections = new Projections({ db, store, retryMs: 50 }, [eventCounts])
  projections.start()
  t.teardown(() => projections.stop())
  let stop = false
  const writer = (async () => {
    let n = 0
    while (!stop) await store.append(`job-${n++ % 5}`, [{ type: 'Tick', data: {} }])
    return n
  })()
  await new Promise((r) => setTimeout(r, 200))
  await projections.waitFor(await store.headPosition())
  await sql`update rm_event_counts.event_counts set count = -1`.execute(db) // damage that a rebuild must repair
  await projections.rebuild('event_counts')
  await new Promise((r) => setTimeout(r, 200))
  stop = true
  const written = await writer
  await projections.waitFor(await store.headPosition())
  t.same(await counts(db), ['job/Tick=' + written], 'every event counted once across the swap')
  t.ok((await projections.audit('event_counts')).ok)
})

t.test('a new projection version is rebuilt on start; one writer per projection', async (t) => {
  const { db, store } = await setup(t)
  await store.append('device-1', [{ type: 'DeviceRegistered', data: {} }])
  const v1 = new Projections({ db, store, retryMs: 50 }, [eventCounts])
  await v1.rebuild('event_counts')
  await sql`update rm_event_counts.event_counts set count = 42`.execute(db)
  const v2: Projection = { ...eventCounts, version: 2 }
  const a = new ProjectionRunner(v2, { db, store, retryMs: 50 })
  const b = new ProjectionRunner(v2, { db, store, retryMs: 50 })
  a.start()
  await a.waitFor(await store.headPosition())
  b.start()
  await eventually(async () => b.state === 'standby', 10_000, 'the second runner to find the lock taken')
  t.equal(a.state, 'live')
  t.equal(b.state, 'standby', 'the second runner waits for the lock')
  t.same(await counts(db), ['device/DeviceRegistered=1'], 'rebuilt from the log')
  // read-your-writes on the standby's node: it follows the leader's checkpoints
  const seen = await store.append('device-1', [{ type: 'DeviceSeen', data: {} }])
  // (the leader never stops here, so a standby that only caught up by taking over would fail `still on standby`)
  await b.waitFor(seen.position, 20_000)
  t.equal(b.state, 'standby', 'still on standby: it saw the leader\'s progress')
  t.same(await counts(db), ['device/DeviceRegistered=1', 'device/DeviceSeen=1'], 'the leader wrote it')
  t.equal((await readCheckpoint(db, 'event_counts'))!.version, 2)
  await a.stop()
  const more = await store.append('device-1', [{ type: 'HeartbeatReceived', data: {} }])
  await b.waitFor(more.position, 5000)
  t.equal(b.state, 'live', 'the standby takes over')
  t.same(await counts(db), ['device/DeviceRegistered=1', 'device/DeviceSeen=1', 'device/HeartbeatReceived=1'])
  await b.stop()
})

t.test('events are applied with their recorded data', async (t) => {
  const { db, store } = await setup(t)
  const seen: RecordedEvent[] = []
  const spy: Projection = { ...eventCounts, async apply(trx, events) { seen.push(...events); await eventCounts.apply(trx, events) } }
  const projections = new Projections({ db, store }, [spy])
  await store.append('x-1', [{ type: 'T', data: { a: 1 }, metadata: { customerId: 'c' } }])
  await projections.rebuild('event_counts')
  t.same(seen.map((e) => [e.streamId, e.type, e.data, e.metadata.customerId]), [['x-1', 'T', { a: 1 }, 'c']])
  t.ok(await rebuild({ db, store }, spy) > 0n)
  t.ok((await audit({ db, store }, spy)).ok)
})

/** A second read model for the group tests: the number of events of each stream whose type starts with "A". */
const aCounts: Projection = {
  name: 'a_counts',
  version: 1,
  filter: { types: ['A1', 'A2'] },
  tables: [{ name: 'a_counts', primaryKey: ['stream_id'] }],
  async createTables(db) {
    await db.schema.createTable('a_counts').addColumn('stream_id', 'text', (c) => c.primaryKey()).addColumn('n', 'integer', (c) => c.notNull()).execute()
  },
  async apply(trx, events) {
    for (const e of events) {
      if (!e.type.startsWith('A')) throw new Error(`a_counts got ${e.type}, which its filter leaves out`)
      await sql`insert into a_counts values (${e.streamId}, 1) on conflict (stream_id) do update set n = a_counts.n + 1`.execute(trx)
    }
  },
}

t.test('one runner keeps several read models, each with the events it handles and its own checkpoint', async (t) => {
  const { db, store } = await setup(t)
  await store.append('s-1', [{ type: 'A1', data: {} }, { type: 'B', data: {} }])
  const projections = new Projections({ db, store, retryMs: 50 }, [eventCounts, aCounts])
  // a_counts exists already and is ahead of event_counts: the runner must not apply its events twice
  await projections.rebuild('a_counts')
  projections.start()
  t.teardown(() => projections.stop())
  await store.append('s-1', [{ type: 'A2', data: {} }])
  const last = await store.append('s-2', [{ type: 'B', data: {} }, { type: 'A1', data: {} }, { type: 'C', data: {} }])
  await projections.waitFor(last.position)
  t.same(await counts(db), ['s/A1=2', 's/A2=1', 's/B=2', 's/C=1'])
  const { rows } = await sql<{ stream_id: string; n: number }>`select stream_id, n from rm_a_counts.a_counts order by stream_id`.execute(db)
  t.same(rows, [{ stream_id: 's-1', n: 2 }, { stream_id: 's-2', n: 1 }], 'each A event counted once, across the rebuild')
  const status = await projections.status()
  t.same(status.map((s) => [s.name, s.state, s.lag]), [['event_counts', 'live', 0], ['a_counts', 'live', 0]])
  // a batch with nothing for a_counts moves its stored checkpoint along (a restart does not scan it again)
  await projections.waitFor((await store.append('s-3', [{ type: 'B', data: {} }])).position)
  t.equal((await readCheckpoint(db, 'a_counts'))!.position, await store.headPosition())
  t.equal((await readCheckpoint(db, 'event_counts'))!.position, await store.headPosition())
  // ... unless its lock is held (an audit or a rebuild of it): the batch goes through without waiting for it
  let held!: () => void
  let locked!: () => void
  const isLocked = new Promise<void>((resolve) => (locked = resolve))
  const holder = db.transaction().execute(async (trx) => {
    await lockProjection(trx, 'a_counts')
    locked()
    await new Promise<void>((resolve) => (held = resolve))
  })
  await isLocked
  const before = (await readCheckpoint(db, 'a_counts'))!.position
  await projections.waitFor((await store.append('s-3', [{ type: 'B', data: {} }])).position)
  t.equal((await readCheckpoint(db, 'a_counts'))!.position, before, 'locked elsewhere: left where it was')
  t.equal((await readCheckpoint(db, 'event_counts'))!.position, await store.headPosition())
  held()
  await holder
  await projections.waitFor((await store.append('s-3', [{ type: 'C', data: {} }])).position)
  t.equal((await readCheckpoint(db, 'a_counts'))!.position, await store.headPosition(), 'moved with the next batch')
  t.ok((await projections.audit('a_counts')).ok)
  t.ok((await projections.audit('event_counts')).ok)
})

t.test('a cached read is kept until its read model changes, and is never kept without a live runner', async (t) => {
  const { db, store } = await setup(t)
  const projections = new Projections({ db, store, retryMs: 50 }, [eventCounts, aCounts])
  let reads = 0
  const read = () => projections.cached('a_counts', 's-1', async () => ++reads)
  t.equal(await read(), 1)
  t.equal(await read(), 2, 'no runner: every call reads')
  projections.start()
  t.teardown(() => projections.stop())
  await projections.waitFor(await store.headPosition())
  const first = await read()
  t.equal(await read(), first, 'live and unchanged: remembered')
  await projections.waitFor((await store.append('s-1', [{ type: 'B', data: {} }])).position)
  t.equal(await read(), first, 'a batch that does not touch a_counts keeps it')
  await projections.waitFor((await store.append('s-1', [{ type: 'A1', data: {} }])).position)
  t.equal(await read(), first + 1, 'a batch applied to a_counts drops it')
  let failures = 0
  await t.rejects(projections.cached('a_counts', 'bad', async () => { failures++; throw new Error('down') }))
  await t.rejects(projections.cached('a_counts', 'bad', async () => { failures++; throw new Error('down') }))
  t.equal(failures, 2, 'a failed read is not remembered')
})

t.test('a read model that fails on an event goes on alone; the others keep up', async (t) => {
  const { db, store } = await setup(t)
  const fragile: Projection = {
    ...aCounts,
    filter: { types: ['A1', 'A2', 'Poison'] },
    async apply(trx, events) {
      if (events.some((e) => e.type === 'Poison')) throw new Error('cannot read a Poison event')
      await aCounts.apply(trx, events)
    },
  }
  const logs: string[] = []
  const projections = new Projections({ db, store, retryMs: 50, log: (line) => logs.push(line) }, [eventCounts, fragile])
  projections.start()
  t.teardown(() => projections.stop())
  const before = await store.append('s-1', [{ type: 'A1', data: {} }])
  await projections.waitFor(before.position)
  await store.append('s-1', [{ type: 'Poison', data: {} }])
  const last = await store.append('s-2', [{ type: 'A1', data: {} }, { type: 'B', data: {} }])
  await projections.waitFor(last.position, 5000)
  t.same(await counts(db), ['s/A1=2', 's/B=1', 's/Poison=1'], 'event_counts went past the poison')
  // the fragile one retries, then gives up on its own
  await eventually(async () => (await projections.status()).find((s) => s.name === 'a_counts')?.state === 'failed' || undefined, 10_000, 'a_counts to fail')
  const status = Object.fromEntries((await projections.status()).map((s) => [s.name, s]))
  t.equal(status.event_counts!.state, 'live')
  t.equal(status.event_counts!.lag, 0)
  t.equal(status.a_counts!.state, 'failed')
  t.match(status.a_counts!.lastError, /Poison/)
  t.equal(status.a_counts!.checkpoint, before.position.toString(), 'it stays before the event it cannot apply')
  t.ok(logs.some((line) => /a_counts: .*goes on alone/.test(line)), 'the log says so')
  const { rows } = await sql<{ n: number }>`select n from rm_a_counts.a_counts`.execute(db)
  t.same(rows, [{ n: 1 }], 'nothing of the failed batch was applied to it')
})

t.test('following the log live, batches gather for liveIntervalMs while nobody waits; a read-your-writes wait ends the gathering at once', async (t) => {
  const { db, store } = await setup(t)
  let batches = 0
  const counting: Projection = {
    ...eventCounts,
    async apply(trx, events) {
      batches++
      await eventCounts.apply(trx, events)
    },
  }
  // an interval no test would wait out: only a wait for the read models moves the runner on
  const projections = new Projections({ db, store, liveIntervalMs: 600_000 }, [counting])
  projections.start()
  t.teardown(() => projections.stop())
  await projections.waitFor((await store.append('job-0', [{ type: 'Tick', data: {} }])).position)
  // a live batch, after which the runner gathers
  let last = await store.append('job-1', [{ type: 'Tick', data: {} }])
  await projections.waitFor(last.position)
  const before = batches
  for (let i = 2; i <= 21; i++) {
    last = await store.append(`job-${i}`, [{ type: 'Tick', data: {} }])
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
  t.equal(batches, before, 'twenty commits over some 200 ms, nobody waiting: no batch yet')
  const started = Date.now()
  await projections.waitFor(last.position, 10_000)
  t.ok(Date.now() - started < 5000, `a wait is answered at once (${Date.now() - started} ms), not after the interval`)
  t.equal(batches, before + 1, 'the twenty in one batch')
  t.same(await counts(db), ['job/Tick=22'])
})
