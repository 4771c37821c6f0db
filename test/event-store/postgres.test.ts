import { randomUUID } from 'node:crypto'
import pg from 'pg'
import t, { type Test } from 'tap'
import { DuplicateEventIdError, UnstorableEventError, WrongExpectedRevisionError } from '../../src/event-store/errors.js'
import type { RecordedEvent, Subscription } from '../../src/event-store/port.js'
import { contendedStream, PostgresEventStore } from '../../src/event-store/postgres.js'
import { CopyAppend } from '../../src/event-store/copy-append.js'
import { connect, type Database } from '../../src/postgres/database.js'
import { freshDatabase } from '../helpers/database.js'
import { eventually } from '../helpers/device.js'
import { eventStoreContract } from './contract.js'

/** Two stores on one database, each with its own pool: two processes. */
async function twoStores(t: Test, database: Database, max: number) {
  const other = connect(database.url, { max })
  t.teardown(() => other.close())
  const a = new PostgresEventStore(database.pool)
  const b = new PostgresEventStore(other.pool)
  t.teardown(async () => {
    await a.close()
    await b.close()
  })
  return { a, b }
}

/**
 * Checks the log against what was acknowledged: each acknowledged append stored once, where it was
 * acknowledged, nothing else, and every stream's revisions 0, 1, 2... in position order. Returns the rows.
 */
async function checkLog(t: Test, database: Database, acknowledged: readonly { id: string; stream: string; position: bigint }[]) {
  const rows = await database.pool.query<{ event_id: string; stream_id: string; revision: string; position: string; recorded_at: Date }>(
    'select event_id, stream_id, revision, position, recorded_at from events order by position',
  )
  t.equal(rows.rowCount, acknowledged.length, `${acknowledged.length} acknowledged appends, each stored once, and nothing else`)
  const byId = new Map(rows.rows.map((r) => [r.event_id, r]))
  t.ok(acknowledged.every((e) => byId.get(e.id)?.position === e.position.toString() && byId.get(e.id)?.stream_id === e.stream), 'every append is stored where it was acknowledged')
  t.same(streamsOutOfOrder(rows.rows), [], 'in position order, every stream reads 0, 1, 2, ...')
  return byId
}

/** The streams whose revisions, in the order of the rows given (position order), are not 0, 1, 2, ... */
function streamsOutOfOrder(rows: readonly { stream_id: string; revision: string }[]): string[] {
  const next = new Map<string, number>()
  const wrong = new Set<string>()
  for (const r of rows) {
    const expected = next.get(r.stream_id) ?? 0
    if (Number(r.revision) !== expected) wrong.add(r.stream_id)
    next.set(r.stream_id, Number(r.revision) + 1)
  }
  return [...wrong]
}

/**
 * A writing store and a store "in another process" (a pool of its own), both with minute-long idle polls:
 * only a wake-up delivers in time. Subscriptions pushed to `subscriptions` are closed before the stores.
 */
function writerAndOtherProcess(t: Test, database: Database) {
  const otherPool = new pg.Pool({ connectionString: database.url, max: 2 })
  const writer = new PostgresEventStore(database.pool, { idlePollMs: 60_000 })
  const other = new PostgresEventStore(otherPool, { idlePollMs: 60_000 })
  const subscriptions: Subscription[] = []
  t.teardown(async () => {
    for (const subscription of subscriptions) await subscription.close()
    await writer.close()
    await other.close()
    await otherPool.end()
  })
  return { writer, other, subscriptions }
}

/**
 * Counts which form each batch took: `copy ...` on a transaction already open (one round trip) or
 * `begin; ...`; and how many of the first kind a unique violation failed.
 */
function watchBatchForms(database: Database) {
  const forms = { open: 0, fresh: 0, openFailed: 0 }
  const connectA = database.pool.connect.bind(database.pool) as (...a: unknown[]) => Promise<pg.PoolClient>
  ;(database.pool as unknown as { connect: (...a: unknown[]) => Promise<pg.PoolClient> }).connect = async (...a: unknown[]) => {
    if (a.length > 0) return connectA(...a) // pool.query's own checkout (with a callback)
    const client = await connectA()
    const query = client.query
    client.query = ((config: unknown, ...rest: unknown[]) => {
      if (config instanceof CopyAppend) {
        const open = config.text.startsWith('copy events')
        if (open) forms.open++
        else forms.fresh++
        config.done.catch((error: { code?: string }) => void (open && error.code === '23505' && forms.openFailed++))
      }
      return (query as (...a: unknown[]) => unknown).call(client, config, ...rest)
    }) as typeof client.query
    const release = client.release
    client.release = (error?: Error | boolean) => {
      client.query = query
      client.release = release
      return release.call(client, error)
    }
    return client
  }
  return forms
}

/** How many idle-in-transaction connections the database has, once that is 0 or after 2 s. */
async function openTransactions(database: Database): Promise<number> {
  let open = -1
  for (let waited = 0; waited < 2000; waited += 20) {
    const idle = await database.pool.query(`select count(*)::int as n from pg_stat_activity where datname = current_database() and state like 'idle in transaction%'`)
    open = idle.rows[0].n
    if (open === 0) break
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  return open
}

t.test('contract', async (t) => {
  const database = await freshDatabase(t, { max: 30 })
  eventStoreContract(t, async (t) => {
    const store = new PostgresEventStore(database.pool)
    t.teardown(() => store.close())
    return store
  })
})

t.test('the gap test: a subscriber never passes a transaction that may still commit below it', async (t) => {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  await store.append('gap-0', [{ type: 'Before', data: {} }])
  const from = await store.headPosition()

  // A slow writer takes a position and keeps its transaction open (as a stalled writer on another node would).
  const slow = new pg.Client({ connectionString: database.url })
  await slow.connect()
  t.teardown(() => slow.end())
  await slow.query('begin')
  const slowRow = await slow.query(
    `insert into events (stream_id, revision, event_id, type, data, metadata)
     values ('gap-slow', 0, $1, 'Slow', '{}', '{}') returning position`,
    [randomUUID()],
  )
  // A later append commits above it.
  const fast = await store.append('gap-fast', [{ type: 'Fast', data: {} }])
  t.ok(fast.position > BigInt(slowRow.rows[0].position), 'the later append has the higher position')

  const received: RecordedEvent[] = []
  const subscription = store.subscribe({ from })
  const consuming = (async () => {
    for await (const batch of subscription) received.push(...batch.events)
  })()
  await new Promise((r) => setTimeout(r, 300))
  t.same(received, [], 'nothing delivered past the open transaction')
  t.same(await store.readAll(from), [], 'readAll stops there too')

  await slow.query('commit')
  const deadline = Date.now() + 5000
  while (received.length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10))
  await subscription.close()
  await consuming
  t.same(received.map((e) => e.type), ['Slow', 'Fast'], 'both delivered, in position order, once it commits')
})

t.test('an append whose ids are partly stored is refused alone; the rest of its batch commits', async (t) => {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  const stored = randomUUID()
  await store.append('p-1', [{ id: stored, type: 'A', data: {} }])
  const [mixed, other] = await Promise.allSettled([
    store.append('p-1', [{ id: randomUUID(), type: 'B', data: {} }, { id: stored, type: 'A', data: {} }]),
    store.append('p-2', [{ type: 'C', data: {} }]),
  ])
  t.equal(mixed.status, 'rejected')
  t.type((mixed as PromiseRejectedResult).reason, DuplicateEventIdError)
  t.equal(other.status, 'fulfilled')
  t.same((await store.readAll()).map((e) => e.type), ['A', 'C'])
})

t.test('bad events are refused before they reach a shared batch', async (t) => {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  const results = await Promise.allSettled([
    store.append('b-1', [{ type: 'Nul', data: { text: 'a\u0000b' } }]),
    store.append('b-1', [{ id: 'not-a-uuid', type: 'X', data: {} }]),
    store.append('b-2', [{ type: 'Fine', data: { text: 'a\\u0000b is only text' } }]),
  ])
  t.same(results.map((r) => r.status), ['rejected', 'rejected', 'fulfilled'])
  t.type((results[0] as PromiseRejectedResult).reason, UnstorableEventError)
  t.match((results[0] as PromiseRejectedResult).reason.message, /event Nul: a value holds the NUL character/)
  // a read may be held back for a moment by a transaction of another test file that could still commit
  let events = await store.readAll()
  for (let i = 0; i < 100 && events.length === 0; i++) {
    await new Promise((r) => setTimeout(r, 20))
    events = await store.readAll()
  }
  t.same(events.map((e) => e.type), ['Fine'])
  t.same(events[0]!.data, { text: 'a\\u0000b is only text' })
})

t.test('group commit: concurrent appends share transactions', async (t) => {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  await Promise.all(Array.from({ length: 200 }, (_, i) => store.append(`g-${i}`, [{ type: 'G', data: { i } }])))
  // made in one turn of the event loop, they are queued before the first batch starts: the queue is shared
  // between the store's batch slots (maxConcurrentBatches, default 3), so at most 3 transactions write them
  const tx = await database.pool.query('select count(distinct position >> 20)::int as n from events')
  t.ok(tx.rows[0].n <= 3, `200 appends took ${tx.rows[0].n} transactions`)
})

t.test('an unreachable database rejects appends and reads with a clear error', async (t) => {
  const pool = new pg.Pool({ connectionString: 'postgres://nobody:x@127.0.0.1:1/none', connectionTimeoutMillis: 2000 })
  const store = new PostgresEventStore(pool)
  await t.rejects(store.append('x', [{ type: 'A', data: {} }]), { code: 'EVENT_STORE_UNAVAILABLE' })
  await t.rejects(store.readAll(), { code: 'EVENT_STORE_UNAVAILABLE' })
  await store.close()
  await pool.end()
})

t.test('under load a batch takes one round trip on a transaction left open by the one before; conflicts on it and the end of the load leave nothing open', async (t) => {
  const database = await freshDatabase(t, { max: 10 })
  const forms = watchBatchForms(database)
  // a second process (its own pool and store), appending to streams the first has cached
  const { a, b } = await twoStores(t, database, 10)
  const acknowledged: { id: string; stream: string; position: bigint; calledAt: number }[] = []
  const append = async (store: PostgresEventStore, stream: string, data: object) => {
    const id = randomUUID()
    const calledAt = Date.now()
    const { position } = await store.append(stream, [{ id, type: 'E', data }])
    acknowledged.push({ id, stream, position, calledAt })
  }
  // the load: 24 writers on streams of their own
  const load = async (w: number) => {
    for (let i = 0; i < 80; i++) await append(a, `own-${w}`, { w, i })
  }
  // the conflicts: each of these streams is written by the two stores in turn, so each store's cached head
  // is stale at its next append there, whose batch then fails on the unique (stream, revision) and is retried
  const turns = async (k: number) => {
    for (let i = 0; i < 12; i++) {
      await append(a, `shared-${k}`, { k, i, by: 'a' })
      await append(b, `shared-${k}`, { k, i, by: 'b' })
    }
  }
  // streams the first store has never seen, started by the second: the first reads their heads inside the
  // transaction its writer opened earlier, whose id may be below the head's (it must not write there)
  const crossings = async (k: number) => {
    for (let i = 0; i < 12; i++) {
      await append(b, `cross-${k}-${i}`, { k, i, by: 'b' })
      await append(a, `cross-${k}-${i}`, { k, i, by: 'a' })
    }
  }
  await Promise.all([...Array.from({ length: 24 }, (_, w) => load(w)), ...Array.from({ length: 6 }, (_, k) => turns(k)), ...Array.from({ length: 4 }, (_, k) => crossings(k))])

  const byId = await checkLog(t, database, acknowledged)
  // the time of the statement that wrote the batch, not of a transaction opened before the append was made
  const early = acknowledged.filter((e) => byId.get(e.id)!.recorded_at.getTime() < e.calledAt)
  t.equal(early.length, 0, 'no event is recorded before its append was called')
  t.ok(forms.open > forms.fresh, `most batches took one round trip (${forms.open} on an open transaction, ${forms.fresh} opening one)`)
  t.ok(forms.openFailed > 0, `batches on an open transaction failed on a stale head and were retried (${forms.openFailed})`)

  // the load is over: the open transactions are rolled back, so readers are not held below them
  t.equal(await openTransactions(database), 0, 'no transaction is left open once the appends stop')
  const bound = await database.pool.query('select dcp_position_bound() > (select max(position) from events) as past')
  t.ok(bound.rows[0].past, 'the position bound is past every stored event')
})

t.test('a trickle of appends, one at a time, is written on transactions left open for it; the last one is rolled back within ms', async (t) => {
  const database = await freshDatabase(t)
  const forms = watchBatchForms(database)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  // one writer, each append made once the one before is acknowledged: never two queued, one batch in flight
  const acknowledged: { id: string; stream: string; position: bigint }[] = []
  for (let i = 0; i < 200; i++) {
    const id = randomUUID()
    const { position } = await store.append(`trickle-${i % 7}`, [{ id, type: 'E', data: { i } }])
    acknowledged.push({ id, stream: `trickle-${i % 7}`, position })
  }
  await checkLog(t, database, acknowledged)
  // how many find one open depends on the next append coming within the writer's grace (2 ms): on a loaded
  // machine fewer do, and those open their own (one more round trip, nothing lost)
  t.ok(forms.open > 0, `batches are written on transactions left open for them (${forms.open} on an open transaction, ${forms.fresh} opening one)`)
  t.equal(forms.open + forms.fresh, 200, 'one batch per append: each waited for the one before')
  // no append comes: the writer's grace (ms) runs out and it rolls back, with nothing more from the test
  await eventually(async () => (await openTransactions(database)) === 0, 10_000, 'the transaction left open for an append that did not come to be rolled back')
  const bound = await database.pool.query('select dcp_position_bound() > (select max(position) from events) as past')
  t.ok(bound.rows[0].past, 'the position bound is past every stored event')
  // appends far apart (more than the writer waits for the next) leave nothing open between them
  await new Promise((resolve) => setTimeout(resolve, 50))
  await store.append('apart', [{ type: 'E', data: {} }])
  await new Promise((resolve) => setTimeout(resolve, 50))
  await store.append('apart', [{ type: 'E', data: {} }])
  t.equal(await openTransactions(database), 0, 'appends far apart leave no transaction open')
  // a store closed while its writer waits for more appends closes at once
  await store.append('closing', [{ type: 'E', data: {} }])
  let timer: NodeJS.Timeout | undefined
  const closed = await Promise.race([store.close().then(() => 'closed'), new Promise((resolve) => (timer = setTimeout(resolve, 20_000, 'waiting')))])
  clearTimeout(timer)
  t.equal(closed, 'closed', 'close does not wait for appends that will not come')
})

t.test('commits in quick succession share NOTIFYs; a subscriber in another process still sees every event', async (t) => {
  const database = await freshDatabase(t)
  const { writer, other, subscriptions } = writerAndOtherProcess(t, database)
  // the notifications themselves, as a third process sees them
  const listener = new pg.Client({ connectionString: database.url })
  await listener.connect()
  t.teardown(() => listener.end())
  let notifications = 0
  listener.on('notification', () => notifications++)
  await listener.query('listen dcp_events')
  const remote = other.subscribe({ from: await writer.headPosition() })
  subscriptions.push(remote)
  await new Promise((r) => setTimeout(r, 300)) // the other store's LISTEN connects
  const started = Date.now()
  const appends = 300
  await Promise.all(
    Array.from({ length: 6 }, async (_, w) => {
      for (let i = 0; i < appends / 6; i++) await writer.append(`burst-${w}`, [{ type: 'Burst', data: { i } }])
    }),
  )
  const took = Date.now() - started
  let seen = 0
  const deadline = Date.now() + 5000
  for await (const batch of remote) {
    seen += batch.events.length
    if (seen >= appends || Date.now() > deadline) break
  }
  t.equal(seen, appends, 'the other process\'s subscriber gets every event, without its minute-long idle poll')
  t.ok(notifications >= 1 && notifications <= Math.ceil(took / 10) + 2, `${notifications} NOTIFYs for ${appends} commits in ${took} ms (one per 10 ms at most)`)
})

t.test('a transaction a writer opened before a stream\'s last commit is not used to write that stream', async (t) => {
  const database = await freshDatabase(t)
  const { a, b } = await twoStores(t, database, 2)
  // a writer of store a, as a batch under load leaves it: a transaction open, its id taken (white box: the
  // timing that leads here cannot be forced from outside)
  const client = await database.pool.connect()
  await client.query('begin')
  const early = BigInt((await client.query('select pg_current_xact_id()::text as xid')).rows[0].xid)
  // another process starts a stream after that id was taken: its event's position is above the id's
  const first = await b.append('late', [{ type: 'First', data: {} }])
  t.ok(first.position > early << 20n, 'the other process wrote above the open transaction')
  const written = new Promise<{ position: bigint }>((resolve, reject) => {
    const batch = [{ streamId: 'late', expected: 'any', events: [{ id: randomUUID(), type: 'Second', data: '{}', metadata: '{}' }], resolve, reject }]
    const writer = { client, xid: early }
    void (a as unknown as { writeBatch(w: unknown, b: unknown[]): Promise<void> }).writeBatch(writer, batch).finally(() => client.release())
  })
  const second = await written
  t.ok(second.position > first.position, 'the next event of the stream is written above its last, in a fresh transaction')
  t.same((await a.readAll()).filter((e) => e.streamId === 'late').map((e) => e.type), ['First', 'Second'], 'the log reads the stream in order')
})

t.test('a stream written by one writer after another keeps its revisions in position order (a transaction opened early is not used for a stream written since)', async (t) => {
  const database = await freshDatabase(t, { max: 10 })
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  // 48 writers over 6 streams: each stream's consecutive appends go out through different connections,
  // each with a transaction it opened at its previous commit
  await Promise.all(
    Array.from({ length: 48 }, async (_, w) => {
      for (let i = 0; i < 40; i++) await store.append(`shared-${(w + i) % 6}`, [{ type: 'E', data: { w, i } }])
    }),
  )
  const rows = await database.pool.query<{ stream_id: string; revision: string }>('select stream_id, revision from events order by position')
  t.equal(rows.rowCount, 48 * 40)
  t.same(streamsOutOfOrder(rows.rows), [], 'in position order, every stream reads 0, 1, 2, ...')
})

t.test('two processes racing on the same streams: an append is stored or refused as a conflict, never failed by the database error', async (t) => {
  const database = await freshDatabase(t, { max: 10 })
  const { a, b } = await twoStores(t, database, 10)
  const stored: { id: string; stream: string; position: bigint }[] = []
  const refused: WrongExpectedRevisionError[] = []
  const others: unknown[] = []
  // 32 writers over two stores; every fifth append goes to one of four streams both write: their heads move
  // between a writer's read and its COPY, over and over
  const writer = async (store: PostgresEventStore, w: number) => {
    for (let i = 0; i < 60; i++) {
      const stream = i % 5 === 0 ? `hot-${(w + i) % 4}` : `own-${w}`
      const id = randomUUID()
      try {
        const { position } = await store.append(stream, [{ id, type: 'E', data: { w, i } }])
        stored.push({ id, stream, position })
      } catch (error) {
        if (error instanceof WrongExpectedRevisionError) refused.push(error)
        else others.push(error)
      }
    }
  }
  await Promise.all([...Array.from({ length: 24 }, (_, w) => writer(a, w)), ...Array.from({ length: 8 }, (_, w) => writer(b, 100 + w))])
  t.same(others.map((e) => (e as Error).message), [], 'no append failed with anything but a conflict')
  t.ok(refused.every((e) => e.streamId.startsWith('hot-')), `only appends to the contended streams were refused (${refused.length} of ${32 * 60})`)
  await checkLog(t, database, stored)
})

t.test('the contended stream is read off the unique violation, whatever characters its id holds', async (t) => {
  const violation = (streamId: string, revision: number) => ({ code: '23505', constraint: 'events_stream_id_revision_key', detail: `Key (stream_id, revision)=(${streamId}, ${revision}) already exists.` })
  t.same(contendedStream(violation('task-1', 6)), { streamId: 'task-1', revision: 6 })
  t.same(contendedStream(violation('odd, 5) (name', 12)), { streamId: 'odd, 5) (name', revision: 12 })
  t.equal(contendedStream({ code: '23505', constraint: 'events_event_id_key', detail: 'Key (event_id)=(x) already exists.' }), undefined, 'an event id taken is not contention')
  t.equal(contendedStream(new Error('boom')), undefined)
})

t.test('two stores on one database (two processes): cached stream heads never decide wrongly', async (t) => {
  const database = await freshDatabase(t)
  const a = new PostgresEventStore(database.pool)
  const b = new PostgresEventStore(database.pool)
  t.teardown(async () => {
    await a.close()
    await b.close()
  })
  await a.append('shared-1', [{ type: 'A0', data: {} }], { expectedRevision: 'no_stream' })
  await a.append('shared-1', [{ type: 'A1', data: {} }], { expectedRevision: 0 }) // a now caches head 1
  await b.append('shared-1', [{ type: 'B2', data: {} }], { expectedRevision: 1 })
  await b.append('shared-1', [{ type: 'B3', data: {} }], { expectedRevision: 2 })
  // a's cache says 1, the stream is at 3: an exact expectation of 3 must pass, 1 must fail, 'any' must land at 4
  t.equal((await a.append('shared-1', [{ type: 'A4', data: {} }], { expectedRevision: 3 })).nextRevision, 4)
  await t.rejects(a.append('shared-1', [{ type: 'Stale', data: {} }], { expectedRevision: 1 }), WrongExpectedRevisionError)
  await b.append('shared-1', [{ type: 'B5', data: {} }])
  t.equal((await a.append('shared-1', [{ type: 'A6', data: {} }])).nextRevision, 6)
  const retryId = randomUUID()
  await a.append('shared-1', [{ id: retryId, type: 'A7', data: {} }])
  const retry = await b.append('shared-1', [{ id: retryId, type: 'A7', data: {} }])
  t.equal(retry.nextRevision, 7, 'a retry through the other store finds the stored event')
  t.same((await a.readStream('shared-1')).map((e) => e.type), ['A0', 'A1', 'B2', 'B3', 'A4', 'B5', 'A6', 'A7'])
})

t.test('appendMany: several streams all or nothing, each with its own expected revision', async (t) => {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  await store.append('m-1', [{ type: 'A', data: {} }])
  // m-2 is new, m-1 is at revision 0: both pass, in one transaction, in the order given
  const jobId = randomUUID()
  const [first, second] = await store.appendMany([
    { streamId: 'm-2', events: [{ id: jobId, type: 'Job', data: {} }], options: { expectedRevision: 'no_stream' } },
    { streamId: 'm-1', events: [{ type: 'B', data: {} }, { type: 'C', data: {} }], options: { expectedRevision: 0 } },
  ])
  t.equal(first!.nextRevision, 0)
  t.equal(second!.nextRevision, 2)
  t.ok(second!.position > first!.position)
  t.equal(first!.position >> 20n, second!.position >> 20n, 'one transaction')
  // one refused (m-1 is not new): nothing of the lot is written, every part rejects; other appends go on
  const [many, alone] = await Promise.allSettled([
    store.appendMany([
      { streamId: 'm-3', events: [{ type: 'D', data: {} }], options: { expectedRevision: 'no_stream' } },
      { streamId: 'm-1', events: [{ type: 'E', data: {} }], options: { expectedRevision: 'no_stream' } },
    ]),
    store.append('m-4', [{ type: 'F', data: {} }]),
  ])
  t.equal(many.status, 'rejected')
  t.type((many as PromiseRejectedResult).reason, WrongExpectedRevisionError)
  t.equal(alone.status, 'fulfilled')
  t.same((await store.readStream('m-3')).length, 0, 'the accepted part was not written either')
  t.same((await store.readAll()).map((e) => `${e.streamId}/${e.type}`), ['m-1/A', 'm-2/Job', 'm-1/B', 'm-1/C', 'm-4/F'])
  // a retried appendMany (same event ids) answers with the first run's positions, and writes nothing new
  const again = await store.appendMany([{ streamId: 'm-2', events: [{ id: jobId, type: 'Job', data: {} }], options: { expectedRevision: 'no_stream' } }])
  t.equal(again[0]!.position, first!.position)
  t.equal((await store.readAll()).length, 5)
})

t.test('appendMany under concurrency: every lot lands whole', async (t) => {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool, { maxBatchEvents: 7 })
  t.teardown(() => store.close())
  const lots = Array.from({ length: 60 }, (_, i) => store.appendMany(
    Array.from({ length: 1 + (i % 4) }, (_, j) => ({ streamId: `lot-${i}-${j}`, events: [{ type: 'L', data: { i, j } }], options: { expectedRevision: 'no_stream' as const } })),
  ))
  const results = await Promise.all(lots)
  const spread = results.filter((result) => new Set(result.map((r) => r.position >> 20n)).size !== 1)
  t.equal(spread.length, 0, 'no lot spread over several transactions')
  t.equal((await store.readAll(undefined, 1000)).length, results.reduce((n, r) => n + r.length, 0), 'every event of every lot stored')
})

t.test('appends go in by COPY: every character of ids, types and JSON comes back as it was written', async (t) => {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  const awkward = 'tab\there, new\nline, cr\rreturn, back\\slash, \\N, \\., quote " and \' ünïcödé 🚀 \u2028'
  const streams = [`stream ${awkward}`, 'plain', '\\N']
  const data = { text: awkward, nested: { list: [awkward, 1.5, null, true], empty: '' }, escapes: '\\\\t \\n' }
  const metadata = { note: awkward }
  const written = await Promise.all(streams.map((s, i) => store.append(s, [{ type: `Type ${awkward} ${i}`, data, metadata }, { type: 'Second', data: { i } }], { expectedRevision: 'no_stream' })))
  t.same(written.map((w) => w.nextRevision), [1, 1, 1])
  for (const [i, stream] of streams.entries()) {
    const read = await store.readStream(stream)
    t.equal(read.length, 2, `stream ${i} has its two events`)
    t.equal(read[0]!.streamId, stream)
    t.equal(read[0]!.type, `Type ${awkward} ${i}`)
    t.same(read[0]!.data, data)
    t.match(read[0]!.metadata, metadata)
    t.same(read[1]!.data, { i })
    t.ok(read[1]!.position > read[0]!.position, 'positions follow the revisions')
  }
  // the log holds them in position order with each batch's positions contiguous from its transaction's id
  const all = await store.readAll(0n, 100)
  t.equal(all.length, 6)
  t.same(all.map((e) => e.position), [...all.map((e) => e.position)].sort((a, b) => (a < b ? -1 : 1)))
})

t.test('readAll waits a moment for a transaction below its page to end, then returns everything up to it', async (t) => {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  const from = await store.headPosition()
  const slow = new pg.Client({ connectionString: database.url })
  await slow.connect()
  t.teardown(() => slow.end())
  await slow.query('begin')
  await slow.query(`insert into events (stream_id, revision, event_id, type, data, metadata) values ('held-slow', 0, $1, 'Slow', '{}', '{}')`, [randomUUID()])
  await store.append('held-fast', [{ type: 'Fast', data: {} }])
  const started = Date.now()
  const reading = store.readAll(from)
  const committing = new Promise((r) => setTimeout(r, 150)).then(() => slow.query('commit'))
  const events = await reading
  await committing
  t.same(events.map((e) => e.type), ['Slow', 'Fast'], 'both, in position order, once the slow one committed')
  t.ok(Date.now() - started >= 100, 'it waited for the commit')
})

t.test('subscribers wake on a commit, not on their idle poll: in the same store, and in another process by NOTIFY', async (t) => {
  const database = await freshDatabase(t)
  const { writer, other, subscriptions } = writerAndOtherProcess(t, database)
  const from = await writer.headPosition()
  const own = writer.subscribe({ from })
  const remote = other.subscribe({ from })
  subscriptions.push(own, remote)
  // the first events a subscription delivers, or none after 5 s
  const first = (subscription: AsyncIterable<{ events: RecordedEvent[] }>) =>
    Promise.race([
      (async () => {
        for await (const batch of subscription) if (batch.events.length > 0) return batch.events
        return []
      })(),
      new Promise<RecordedEvent[]>((r) => setTimeout(() => r([]), 5000)),
    ])
  const reading = Promise.all([first(own), first(remote)])
  // let both read an empty first page and wait, and the other store's LISTEN connect
  await new Promise((r) => setTimeout(r, 500))
  const started = Date.now()
  await writer.append('wake-1', [{ type: 'Woken', data: {} }])
  const [mine, theirs] = await reading
  t.same(mine.map((e) => e.type), ['Woken'], 'the writing store wakes its own subscriber')
  t.same(theirs.map((e) => e.type), ['Woken'], 'a store in another process is woken by NOTIFY')
  t.ok(Date.now() - started < 5000, `both within seconds (${Date.now() - started} ms), not after the minute's poll`)
})

t.test("a subscriber takes its own store's recent events from memory, reads another process's from the log, and delivers what the log holds", async (t) => {
  const database = await freshDatabase(t)
  const { a, b } = await twoStores(t, database, 5)
  await a.append('own-start', [{ type: 'Start', data: {} }])
  const from = await a.headPosition()
  // the rows a's subscribers read in full (payloads and all), by stream
  const readInFull: string[] = []
  const query = database.pool.query.bind(database.pool) as (...args: unknown[]) => Promise<pg.QueryResult>
  ;(database.pool as unknown as { query: typeof query }).query = async (...args: unknown[]) => {
    const result = await query(...args)
    if (typeof args[0] === 'string' && args[0].includes('data, metadata')) readInFull.push(...result.rows.map((r) => String(r.stream_id)))
    return result
  }
  t.teardown(() => void ((database.pool as unknown as { query: typeof query }).query = query))
  const data = (i: number) => ({ i, text: 'tab\there, ünïcödé 🚀', nested: { list: [i, 1.5, null, true] } })
  for (let i = 0; i < 10; i++) {
    await Promise.all([
      a.append(`own-${i}`, [{ type: 'Own', data: data(i), metadata: { customerId: 'c' } }, { type: 'Skipped', data: {} }]),
      b.append(`theirs-${i}`, [{ type: 'Theirs', data: data(i) }]),
    ])
  }
  const collect = async (filter?: { types: string[] }) => {
    const subscription = a.subscribe({ from, batchSize: 7, ...(filter ? { filter } : {}) })
    const received: RecordedEvent[] = []
    const deadline = Date.now() + 5000
    for await (const batch of subscription) {
      received.push(...batch.events)
      if (received.length >= (filter ? 20 : 30) || Date.now() > deadline) break
    }
    await subscription.close()
    return received
  }
  const all = await collect()
  const filtered = await collect({ types: ['Own', 'Theirs'] })
  const ownReadBack = readInFull.filter((s) => s.startsWith('own-'))
  const theirsRead = readInFull.filter((s) => s.startsWith('theirs-'))
  ;(database.pool as unknown as { query: typeof query }).query = query
  // the truth: the log read in full by a store that wrote none of it
  const reader = new PostgresEventStore(database.pool)
  t.teardown(() => reader.close())
  const log = await reader.readAll(from, 1000)
  t.equal(log.length, 30)
  t.same(all, log, 'every event, in position order, each as the log holds it (ids, revisions, data, metadata, recorded_at)')
  t.same(filtered, log.filter((e) => e.type !== 'Skipped'), 'a filtered subscription too')
  t.same(ownReadBack, [], "none of its own store's events is read back in full")
  t.ok(theirsRead.length >= 10, `another process's events are read from the log (${theirsRead.length} rows)`)
})

t.test('no NOTIFY while no other process listens; a process that starts listening is woken again', async (t) => {
  const database = await freshDatabase(t)
  const otherPool = new pg.Pool({ connectionString: database.url, max: 2 })
  const writer = new PostgresEventStore(database.pool, { idlePollMs: 60_000, listenerCheckMs: 100 })
  const other = new PostgresEventStore(otherPool, { idlePollMs: 60_000 })
  const subscriptions: Subscription[] = []
  t.teardown(async () => {
    for (const subscription of subscriptions) await subscription.close()
    await writer.close()
    await other.close()
    await otherPool.end()
  })
  let notifies = 0
  const query = database.pool.query.bind(database.pool) as (...args: unknown[]) => Promise<pg.QueryResult>
  ;(database.pool as unknown as { query: typeof query }).query = (...args: unknown[]) => {
    if (typeof args[0] === 'string' && args[0].includes('pg_notify')) notifies++
    return query(...args)
  }
  t.teardown(() => void ((database.pool as unknown as { query: typeof query }).query = query))
  const listeners = async () => (await query(`select count(*)::int as n from pg_stat_activity where datname = current_database() and query = 'listen dcp_events'`)).rows[0].n as number
  // the writer's own subscriber: its store listens, and is the only one
  subscriptions.push(writer.subscribe({ from: await writer.headPosition() }))
  await eventually(async () => (await listeners()) === 1, 5000)
  for (let i = 0; i < 20; i++) {
    await writer.append(`alone-${i}`, [{ type: 'Alone', data: { i } }])
    await new Promise((r) => setTimeout(r, 10))
  }
  t.equal(notifies, 0, 'twenty commits over some 200 ms with nobody else listening: no NOTIFY')

  const remote = other.subscribe({ from: await writer.headPosition() })
  subscriptions.push(remote)
  await eventually(async () => (await listeners()) === 2, 5000)
  await new Promise((r) => setTimeout(r, 200)) // past the writer's check interval
  const first = (async () => {
    for await (const batch of remote) if (batch.events.length > 0) return batch.events
    return []
  })()
  const started = Date.now()
  await writer.append('heard', [{ type: 'Heard', data: {} }])
  const events = await Promise.race([first, new Promise<RecordedEvent[]>((r) => setTimeout(() => r([]), 5000))])
  t.same(events.map((e) => e.type), ['Heard'], 'the other process is woken by NOTIFY, not its minute-long idle poll')
  t.ok(notifies >= 1, `${notifies} NOTIFY once another process listens (${Date.now() - started} ms)`)
})
