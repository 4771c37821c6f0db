/**
 * The EventStore contract: every adapter runs this same suite (postgres.test.ts, eventstoredb.test.ts).
 * Stream names are unique per test, so the suite also runs against a shared server that holds other data.
 */
import { randomUUID } from 'node:crypto'
import type { Test } from 'tap'
import { PayloadTooLargeError, WrongExpectedRevisionError } from '../../src/event-store/errors.js'
import type { EventStore, Position, RecordedEvent, Subscription } from '../../src/event-store/port.js'
import { appendAll, START } from '../../src/event-store/port.js'

export type StoreFactory = (t: Test) => Promise<EventStore>

/** What differs between stores, as each documents it (docs/event-store.md). */
export interface StoreTraits {
  /** Largest append the store takes, in bytes (EventStoreDB: its MaxAppendSize); larger ones are PayloadTooLargeError. Unset: no limit the suite reaches. */
  maxAppendBytes?: number
  /** Writes a few system (`$`) events to the log, which readers never see. Unset where a store has none. */
  writeSystemEvents?: () => Promise<void>
  /** Restarts the server under a running subscription (and resolves once it answers again). Unset: not tested. */
  restartServer?: () => Promise<void>
}

const unique = (prefix: string) => `${prefix}-${randomUUID().slice(0, 8)}`

export function eventStoreContract(t: Test, makeStore: StoreFactory, traits: StoreTraits = {}): void {
  t.test('50 concurrent appends with one exact expected revision: exactly one winner per revision', async (t) => {
    const store = await makeStore(t)
    const stream = unique('race')
    const writers = 50
    const winners: number[] = []
    // Every writer races for every revision; losers re-read and race for the next one.
    const pending = new Set(Array.from({ length: writers }, (_, i) => i))
    let expected: 'no_stream' | number = 'no_stream'
    while (pending.size > 0) {
      const attempt: 'no_stream' | number = expected
      const results = await Promise.allSettled(
        [...pending].map((w) => store.append(stream, [{ type: 'Raced', data: { writer: w } }], { expectedRevision: attempt }).then(() => w)),
      )
      const won = results.filter((r): r is PromiseFulfilledResult<number> => r.status === 'fulfilled').map((r) => r.value)
      const lost = results.filter((r) => r.status === 'rejected')
      t.equal(won.length, 1, `one winner at expected revision ${String(attempt)}`)
      const wrongKind = lost.filter((l) => !((l as PromiseRejectedResult).reason instanceof WrongExpectedRevisionError))
      if (wrongKind.length > 0) t.fail(`losers must get WrongExpectedRevisionError: ${String((wrongKind[0] as PromiseRejectedResult).reason)}`)
      winners.push(...won)
      for (const w of won) pending.delete(w)
      expected = attempt === 'no_stream' ? 0 : attempt + 1
    }
    const events = await store.readStream(stream)
    t.same(events.map((e) => e.revision), Array.from({ length: writers }, (_, i) => i), 'revisions are contiguous from 0')
    t.same(events.map((e) => (e.data as { writer: number }).writer), winners, 'each revision holds its winner')
    t.equal(new Set(winners).size, writers, 'every writer won exactly once')
  })

  t.test('expected revision checks', async (t) => {
    const store = await makeStore(t)
    const stream = unique('expect')
    await t.rejects(store.append(stream, [{ type: 'A', data: {} }], { expectedRevision: 'stream_exists' }), WrongExpectedRevisionError)
    await t.rejects(store.append(stream, [{ type: 'A', data: {} }], { expectedRevision: 0 }), WrongExpectedRevisionError)
    const first = await store.append(stream, [{ type: 'A', data: {} }, { type: 'B', data: {} }], { expectedRevision: 'no_stream' })
    t.equal(first.nextRevision, 1)
    const error = await store.append(stream, [{ type: 'C', data: {} }], { expectedRevision: 'no_stream' }).catch((e: unknown) => e)
    t.type(error, WrongExpectedRevisionError)
    t.equal((error as WrongExpectedRevisionError).actual, 1, 'the error names the actual revision')
    await t.rejects(store.append(stream, [{ type: 'C', data: {} }], { expectedRevision: 0 }), WrongExpectedRevisionError)
    t.equal((await store.append(stream, [{ type: 'C', data: {} }], { expectedRevision: 1 })).nextRevision, 2)
    t.equal((await store.append(stream, [{ type: 'D', data: {} }], { expectedRevision: 'stream_exists' })).nextRevision, 3)
    t.equal((await store.append(stream, [{ type: 'E', data: {} }], { expectedRevision: 'any' })).nextRevision, 4)
    t.equal((await store.append(stream, [{ type: 'F', data: {} }])).nextRevision, 5, "'any' is the default")
    const read = await store.readStream(stream)
    t.same(read.map((e) => e.type), ['A', 'B', 'C', 'D', 'E', 'F'])
    t.same(read.map((e) => e.streamId), Array(6).fill(stream))
  })

  t.test('a duplicate event id is stored once and answers with the original position', async (t) => {
    const store = await makeStore(t)
    const stream = unique('dup')
    const id = randomUUID()
    const event = { id, type: 'Once', data: { n: 1 } }
    const first = await store.append(stream, [event], { expectedRevision: 'no_stream' })
    // a retry whose expected revision is now stale must still succeed: it is the same append
    const retry = await store.append(stream, [event], { expectedRevision: 'no_stream' })
    t.equal(retry.position, first.position)
    t.equal(retry.nextRevision, first.nextRevision)
    const concurrentId = randomUUID()
    const concurrent = await Promise.all(
      Array.from({ length: 10 }, () => store.append(stream, [{ id: concurrentId, type: 'Twice', data: {} }], { expectedRevision: 'any' })),
    )
    t.equal(new Set(concurrent.map((r) => r.position.toString())).size, 1, 'concurrent retries agree on one position')
    const events = await store.readStream(stream)
    t.same(events.map((e) => e.id), [id, concurrentId])
  })

  t.test('readStream: from a revision, a count, and a missing stream', async (t) => {
    const store = await makeStore(t)
    const stream = unique('read')
    await store.append(stream, Array.from({ length: 10 }, (_, i) => ({ type: 'N', data: { i }, metadata: { customerId: 'c1' } })))
    const tail = await store.readStream(stream, { fromRevision: 7 })
    t.same(tail.map((e) => (e.data as { i: number }).i), [7, 8, 9])
    const some = await store.readStream(stream, { fromRevision: 2, maxCount: 3 })
    t.same(some.map((e) => e.revision), [2, 3, 4])
    t.equal(some[0]!.metadata.customerId, 'c1', 'metadata round-trips')
    t.ok(some[0]!.recordedAt instanceof Date)
    t.same(await store.readStream(unique('missing')), [])
  })

  t.test('readAll is in position order and pages without gaps or repeats', async (t) => {
    const store = await makeStore(t)
    const prefix = unique('all')
    const before = await store.headPosition()
    await Promise.all(Array.from({ length: 20 }, (_, w) => appendMany(store, `${prefix}-${w}`, 10)))
    const seen: RecordedEvent[] = []
    let after: Position = before
    for (;;) {
      const page = await store.readAll(after, 7)
      if (page.length === 0) break
      for (let i = 1; i < page.length; i++) t.ok(page[i]!.position > page[i - 1]!.position || t.fail('positions must increase'))
      seen.push(...page)
      after = page.at(-1)!.position
    }
    const mine = seen.filter((e) => e.streamId.startsWith(prefix))
    t.equal(mine.length, 200)
    t.equal(new Set(mine.map((e) => e.id)).size, 200, 'no repeats')
    t.equal(await store.headPosition(), seen.at(-1)!.position, 'head is the last event')
    for (let w = 0; w < 20; w++) {
      const stream = mine.filter((e) => e.streamId === `${prefix}-${w}`)
      t.same(stream.map((e) => e.revision), [...Array(10).keys()], `stream ${w} in revision order within the log`)
    }
  })

  t.test('a subscription switches from catch-up to live without loss or repeat', async (t) => {
    const store = await makeStore(t)
    const prefix = unique('sub')
    const from = await store.headPosition()
    await Promise.all(Array.from({ length: 5 }, (_, w) => appendMany(store, `${prefix}-${w}`, 100)))
    const subscription = store.subscribe({ from, batchSize: 50, filter: { streamPrefixes: [prefix] } })
    // live writers start while the subscriber is still catching up
    const live = Promise.all(Array.from({ length: 5 }, (_, w) => appendMany(store, `${prefix}-live-${w}`, 100, 3)))
    const received = await collect(subscription, 1000)
    await live
    await subscription.close()
    t.equal(received.length, 1000)
    t.equal(new Set(received.map((e) => e.id)).size, 1000, 'nothing repeated')
    for (let i = 1; i < received.length; i++) {
      if (received[i]!.position <= received[i - 1]!.position) t.fail(`out of order at ${i}`)
    }
    const expected = new Set<string>()
    let after = from
    for (;;) {
      const page = await store.readAll(after, 500)
      if (page.length === 0) break
      for (const e of page) if (e.streamId.startsWith(prefix)) expected.add(e.id)
      after = page.at(-1)!.position
    }
    t.same(new Set(received.map((e) => e.id)), expected, 'exactly the stored events')
  })

  t.test('a subscription filters by event type and its checkpoint passes filtered-out events', async (t) => {
    const store = await makeStore(t)
    const stream = unique('filter')
    const from = await store.headPosition()
    const type = unique('Wanted')
    await store.append(stream, [
      { type, data: { i: 1 } },
      { type: 'Other', data: {} },
      { type, data: { i: 2 } },
      { type: 'Other', data: {} },
    ])
    const subscription = store.subscribe({ from, filter: { types: [type] } })
    const got: RecordedEvent[] = []
    let checkpoint: Position = START
    for await (const batch of subscription) {
      got.push(...batch.events)
      checkpoint = batch.checkpoint
      const last = (await store.readStream(stream)).at(-1)!
      if (checkpoint >= last.position) break
    }
    await subscription.close()
    t.same(got.map((e) => (e.data as { i: number }).i), [1, 2])
    t.ok(checkpoint > got.at(-1)!.position, 'checkpoint moved past the last filtered-out event')
  })

  t.test('a 2 MiB payload is stored and read back whole, or refused as too large where the store says so', async (t) => {
    const store = await makeStore(t)
    const stream = unique('large')
    const text = 'x'.repeat(2 * 1024 * 1024)
    const before = await store.headPosition()
    const append = store.append(stream, [{ type: 'Large', data: { text } }], { expectedRevision: 'no_stream' })
    if (traits.maxAppendBytes !== undefined && traits.maxAppendBytes < text.length) {
      await t.rejects(append, PayloadTooLargeError)
      t.same(await store.readStream(stream), [], 'nothing stored')
      return
    }
    const { position } = await append
    const [stored] = await store.readStream(stream)
    t.equal((stored!.data as { text: string }).text, text, 'read back whole from the stream')
    const fromLog = (await store.readAll(before, 100)).find((e) => e.streamId === stream)
    t.equal(fromLog?.position, position)
    t.equal((fromLog?.data as { text: string } | undefined)?.text.length, text.length, 'and from the log')
  })

  t.test('a retry racing its original: ten concurrent appends of the same ids give one result and one copy', async (t) => {
    const store = await makeStore(t)
    const stream = unique('racing-retry')
    const events = [
      { id: randomUUID(), type: 'First', data: {} },
      { id: randomUUID(), type: 'Second', data: {} },
    ]
    const results = await Promise.all(Array.from({ length: 10 }, () => store.append(stream, events, { expectedRevision: 'no_stream' })))
    t.same(new Set(results.map((r) => `${r.nextRevision}@${r.position}`)).size, 1, 'one result')
    const stored = await store.readStream(stream)
    t.same(stored.map((e) => e.id), events.map((e) => e.id), 'one copy')
    t.same(results[0], { nextRevision: 1, position: stored[1]!.position })
  })

  t.test("a multi-event append's position is its last event's", async (t) => {
    const store = await makeStore(t)
    const stream = unique('multi')
    await store.append(stream, [{ type: 'Before', data: {} }])
    const events = Array.from({ length: 3 }, (_, i) => ({ id: randomUUID(), type: 'Many', data: { i } }))
    const result = await store.append(stream, events, { expectedRevision: 0 })
    const stored = await store.readStream(stream, { fromRevision: 1 })
    t.same(stored.map((e) => e.id), events.map((e) => e.id))
    t.same(result, { nextRevision: 3, position: stored.at(-1)!.position })
    t.same(await store.append(stream, events, { expectedRevision: 0 }), result, 'and its retry answers the same')
  })

  t.test('a subscription resumed from its checkpoint across system ($) events misses and repeats nothing', { skip: traits.writeSystemEvents ? false : 'the store has no system events' }, async (t) => {
    const store = await makeStore(t)
    const stream = unique('resume')
    const from = await store.headPosition()
    await store.append(stream, [{ type: 'Before', data: {} }])
    const first = store.subscribe({ from, filter: { streamPrefixes: [stream] } })
    const before = await collect(first, 1)
    await first.close()
    t.same(before.map((e) => e.type), ['Before'])
    await traits.writeSystemEvents!()
    await store.append(stream, [{ type: 'After', data: {} }])
    await traits.writeSystemEvents!()
    const resumed = store.subscribe({ from: before[0]!.position, filter: { streamPrefixes: [stream] } })
    const after = await collect(resumed, 1)
    await resumed.close()
    t.same(after.map((e) => e.type), ['After'])
  })

  t.test('a subscription survives the server restarting', { skip: traits.restartServer ? false : 'no way to restart the server here' }, async (t) => {
    const store = await makeStore(t)
    const stream = unique('restart')
    const from = await store.headPosition()
    await store.append(stream, [{ type: 'Before', data: {} }])
    const subscription = store.subscribe({ from, filter: { streamPrefixes: [stream] } })
    const received: RecordedEvent[] = []
    const reading = (async () => {
      for await (const batch of subscription) {
        received.push(...batch.events)
        if (received.length >= 2) break
      }
    })()
    await traits.restartServer!()
    await store.append(stream, [{ type: 'After', data: {} }])
    const timer = setTimeout(() => void subscription.close(), 60_000)
    await reading
    clearTimeout(timer)
    await subscription.close()
    t.same(received.map((e) => e.type), ['Before', 'After'], 'nothing lost or repeated')
  })

  t.test('close() ends a waiting subscription', async (t) => {
    const store = await makeStore(t)
    const subscription = store.subscribe({ from: await store.headPosition() })
    const done = (async () => {
      for await (const _ of subscription) void _
      return 'ended'
    })()
    setTimeout(() => void subscription.close(), 50)
    t.equal(await done, 'ended')
  })

  multiStreamContract(t, makeStore)
}

/**
 * Writes across streams (`appendAll`): all or nothing on every store, with `appendMany` where the store has
 * it, else through a recorded intent (src/event-store/intents.ts). Also run by intents.test.ts against a
 * store without `appendMany`.
 */
export function multiStreamContract(t: Test, makeStore: StoreFactory): void {
  t.test('appendAll: a multi-stream write with one refused stream writes nothing', async (t) => {
    const store = await makeStore(t)
    const prefix = unique('all-or-nothing')
    await store.append(`${prefix}-2`, [{ type: 'There', data: {} }], { expectedRevision: 'no_stream' })
    const set = [0, 1, 2, 3].map((j) => ({ streamId: `${prefix}-${j}`, events: [{ type: 'Part', data: { j } }], options: { expectedRevision: 'no_stream' as const } }))
    await t.rejects(appendAll(store, set), WrongExpectedRevisionError)
    for (const j of [0, 1, 3]) t.same(await store.readStream(`${prefix}-${j}`), [], `stream ${j} has nothing`)
    t.same((await store.readStream(`${prefix}-2`)).map((e) => e.type), ['There'], 'the refusing stream is as it was')
  })

  t.test('appendAll: a multi-stream write lands whole; repeated with the same ids, it answers the same and writes nothing', async (t) => {
    const store = await makeStore(t)
    const prefix = unique('whole')
    const set = [0, 1, 2].map((j) => ({
      streamId: `${prefix}-${j}`,
      events: [0, 1].map((k) => ({ id: randomUUID(), type: 'Part', data: { j, k } })),
      options: { expectedRevision: 'no_stream' as const },
    }))
    const results = await appendAll(store, set)
    for (const [j, append] of set.entries()) {
      const stored = await store.readStream(append.streamId)
      t.same(stored.map((e) => e.id), append.events.map((e) => e.id), `stream ${j} holds its events`)
      t.same(results[j], { nextRevision: 1, position: stored.at(-1)!.position }, `stream ${j}: its result`)
    }
    t.same(await appendAll(store, set), results, 'the repeat answers with the first results')
    for (const append of set) t.equal((await store.readStream(append.streamId)).length, 2, `${append.streamId}: nothing written twice`)
  })
}

export async function appendMany(store: EventStore, stream: string, count: number, pauseEvery = 0): Promise<void> {
  for (let i = 0; i < count; i++) {
    await store.append(stream, [{ type: 'Numbered', data: { i, pad: 'x'.repeat(200) } }], { expectedRevision: i === 0 ? 'no_stream' : i - 1 })
    if (pauseEvery && i % pauseEvery === 0) await new Promise((r) => setTimeout(r, 1))
  }
}

/** Reads from a subscription until `count` events have come, or closes it after `timeoutMs`. */
export async function collect(subscription: Subscription, count: number, timeoutMs = 20_000): Promise<RecordedEvent[]> {
  const received: RecordedEvent[] = []
  const timer = setTimeout(() => void subscription.close(), timeoutMs)
  try {
    for await (const batch of subscription) {
      received.push(...batch.events)
      if (received.length >= count) break
    }
  } finally {
    clearTimeout(timer)
  }
  return received
}
