/**
 * The EventStoreDB adapter without a server: its pure mappings, its subscription batching over a stand-in
 * for the client's subscription stream, and its behaviour when the server cannot be reached. The contract
 * suite (contract.ts) covers the rest where EVENTSTORE_URL points at a real server.
 */
import { PassThrough, Readable } from 'node:stream'
import {
  DeadlineExceededError,
  type EventStoreDBClient,
  MaxAppendSizeExceededError,
  StreamDeletedError,
  UnavailableError,
  WrongExpectedVersionError,
} from '@eventstore/db-client'
import type { AllStreamResolvedEvent, ResolvedEvent, SubscribeToAllOptions } from '@eventstore/db-client'
import t from 'tap'
import { DuplicateEventIdError, EventStoreUnavailableError, PayloadTooLargeError, UnstorableEventError, WrongExpectedRevisionError } from '../../src/event-store/errors.js'
import {
  assembleBatch,
  CheckpointMarker,
  EventStoreDbEventStore,
  fromEsdbCurrentRevision,
  fromEsdbExpectedRevision,
  fromEsdbPosition,
  mapAppendError,
  mapError,
  matchStoredAppend,
  toEsdbEvent,
  toEsdbExpectedRevision,
  toEsdbPosition,
  toRecordedEvent,
} from '../../src/event-store/eventstoredb.js'
import type { SubscriptionBatch } from '../../src/event-store/port.js'
import { START } from '../../src/event-store/port.js'

const ID = '0b6c1c1e-6a43-4f0e-9d51-3f4d9a8e2c71'

/** An event as the client hands it over from `$all` (convertGrpcEvent's shape). */
function allEvent(position: bigint, overrides: Partial<{ streamId: string; type: string; revision: bigint; data: unknown; metadata: unknown }> = {}): AllStreamResolvedEvent {
  return {
    event: {
      streamId: overrides.streamId ?? 'device-1',
      id: `00000000-0000-4000-8000-${position.toString().padStart(12, '0')}`,
      isJson: true,
      revision: overrides.revision ?? 0n,
      type: overrides.type ?? 'DeviceRegistered',
      created: new Date('2025-01-02T03:04:05.000Z'),
      data: (overrides.data ?? { n: Number(position) }) as Record<string, unknown>,
      metadata: ('metadata' in overrides ? overrides.metadata : { customerId: 'c1' }) as Record<string, unknown>,
      position: { commit: position, prepare: position },
    },
    commitPosition: position,
  }
}

t.test('expected revisions map to the client constants and back', async (t) => {
  t.equal(toEsdbExpectedRevision('no_stream'), 'no_stream')
  t.equal(toEsdbExpectedRevision('stream_exists'), 'stream_exists')
  t.equal(toEsdbExpectedRevision('any'), 'any')
  t.equal(toEsdbExpectedRevision(0), 0n)
  t.equal(toEsdbExpectedRevision(41), 41n)
  t.equal(toEsdbExpectedRevision(-1), 'no_stream', '-1 means no events yet, as in the Postgres adapter')
  t.throws(() => toEsdbExpectedRevision(-2), RangeError)
  t.throws(() => toEsdbExpectedRevision(1.5), RangeError)
  t.equal(fromEsdbExpectedRevision(7n), 7)
  t.equal(fromEsdbExpectedRevision('stream_exists'), 'stream_exists')
  t.equal(fromEsdbCurrentRevision(3n), 3)
  t.equal(fromEsdbCurrentRevision('no_stream'), 'no_stream')
})

t.test('positions: the commit position, and {p, p} going back', async (t) => {
  t.equal(fromEsdbPosition({ commit: 1056n, prepare: 1000n }), 1056n, 'the commit position is the port position')
  t.equal(toEsdbPosition(START), 'start')
  t.same(toEsdbPosition(0n), { commit: 0n, prepare: 0n })
  t.same(toEsdbPosition(2n ** 40n), { commit: 2n ** 40n, prepare: 2n ** 40n }, 'large positions stay exact')
  t.equal(fromEsdbPosition(toEsdbPosition(123_456n) as { commit: bigint; prepare: bigint }), 123_456n)
  t.throws(() => toEsdbPosition(-2n), RangeError)
})

t.test('append errors map to the port errors', async (t) => {
  // 1. a conflict, as batchAppend builds it from the server's WrongExpectedVersion details
  const conflict = new WrongExpectedVersionError(undefined, { streamName: 'job-1', expected: 3n, current: 5n })
  const mapped = mapAppendError(conflict, 'job-1', 3)
  t.type(mapped, WrongExpectedRevisionError)
  t.match(mapped, { streamId: 'job-1', expected: 3, actual: 5, code: 'WRONG_EXPECTED_REVISION' })

  const missing = new WrongExpectedVersionError(undefined, { streamName: 'job-2', expected: 'stream_exists', current: 'no_stream' })
  t.match(mapAppendError(missing, 'job-2', 'stream_exists'), { expected: 'stream_exists', actual: 'no_stream' })
  t.match(mapAppendError(missing, 'job-2'), { expected: 'stream_exists' }, "without the caller's, the server's expected revision")
  const numeric = new WrongExpectedVersionError(undefined, { streamName: 'job-3', expected: 0n, current: 9n })
  t.match(mapAppendError(numeric, 'job-3'), { expected: 0, actual: 9 })

  // 2. the store cannot be reached: the client's classes, and the raw gRPC error it sometimes lets through
  const unavailable = mapAppendError(new UnavailableError(), 'job-1', 'any')
  t.type(unavailable, EventStoreUnavailableError)
  t.type(mapAppendError(new DeadlineExceededError(), 'job-1', 'any'), EventStoreUnavailableError)
  const raw = Object.assign(new Error('14 UNAVAILABLE: No connection established'), { code: 14, details: 'No connection established' })
  const fromRaw = mapAppendError(raw, 'job-1', 'any')
  t.type(fromRaw, EventStoreUnavailableError)
  t.equal((fromRaw as EventStoreUnavailableError).cause, raw, 'the original error is the cause')
  t.match((fromRaw as Error).message, /No connection established/)
  const deadline = Object.assign(new Error('4 DEADLINE_EXCEEDED'), { code: 4, details: 'Deadline exceeded' })
  t.type(mapAppendError(deadline, 'job-1', 'any'), EventStoreUnavailableError)
  t.type(mapError(new Error('Failed to discover after 10 attempts.')), EventStoreUnavailableError)

  // 3. anything else keeps its own class
  const deleted = new StreamDeletedError(undefined, 'job-9')
  t.equal(mapAppendError(deleted, 'job-9', 'any'), deleted)
  const bug = new TypeError('not a store problem')
  t.equal(mapAppendError(bug, 'job-1', 'any'), bug)
  t.equal(mapError('a string'), 'a string')
})

t.test('recorded events come back in the port shape; system events are skipped', async (t) => {
  const recorded = toRecordedEvent(allEvent(4096n, { revision: 2n, data: { cores: 8 } }))
  t.same(recorded, {
    id: '00000000-0000-4000-8000-000000004096',
    streamId: 'device-1',
    revision: 2,
    position: 4096n,
    type: 'DeviceRegistered',
    data: { cores: 8 },
    metadata: { customerId: 'c1' },
    recordedAt: new Date('2025-01-02T03:04:05.000Z'),
  })
  t.equal(typeof recorded!.revision, 'number')

  t.equal(toRecordedEvent(allEvent(1n, { type: '$metadata' })), undefined, 'system event type')
  t.equal(toRecordedEvent(allEvent(2n, { streamId: '$stats-127.0.0.1:2113', type: 'StatsCollected' })), undefined, 'system stream')
  t.equal(toRecordedEvent(allEvent(3n, { streamId: '$ce-device', type: '$>' })), undefined, 'link in a projection stream')
  t.equal(toRecordedEvent({ commitPosition: 5n }), undefined, 'a link whose event could not be resolved')

  t.same(toRecordedEvent(allEvent(6n, { metadata: undefined }))!.metadata, {}, 'no metadata reads as {}')
  t.same(toRecordedEvent(allEvent(7n, { metadata: new Uint8Array([1, 2]) }))!.metadata, {}, 'binary metadata reads as {}')

  // a stream read (ResolvedEvent): the record may lack a position while the commit position is there
  const fromStream = allEvent(8n) as ResolvedEvent
  delete (fromStream.event as { position?: unknown }).position
  t.equal(toRecordedEvent(fromStream)!.position, 8n)
  delete (fromStream as { commitPosition?: bigint }).commitPosition
  t.throws(() => toRecordedEvent(fromStream), /without a \$all position/)
})

t.test('new events become JSON events carrying the port id', async (t) => {
  const event = toEsdbEvent({ id: ID.toUpperCase(), type: 'JobSubmitted', data: { a: 1 }, metadata: { correlationId: 'k' } })
  t.same(event, { id: ID, contentType: 'application/json', type: 'JobSubmitted', data: { a: 1 }, metadata: { correlationId: 'k' } })
  const bare = toEsdbEvent({ type: 'Ping', data: undefined })
  t.match(bare.id, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/, 'a fresh UUID when none is given')
  t.equal(bare.data, null)
  t.same(bare.metadata, {})
  t.throws(() => toEsdbEvent({ id: 'retry-1', type: 'X', data: {} }), TypeError)
  // what the Postgres log refuses, this one refuses too: read models are Postgres tables either way
  t.throws(() => toEsdbEvent({ type: 'Nul', data: { text: 'a\u0000b' } }), UnstorableEventError)
  t.throws(() => toEsdbEvent({ type: 'Nul', data: {}, metadata: { ['k\u0000']: 1 } }), UnstorableEventError)
  t.same(toEsdbEvent({ type: 'Fine', data: { text: 'a\\u0000b is only text' } }).data, { text: 'a\\u0000b is only text' })
})

t.test('assembleBatch: checkpoint over filtered and system events, nothing at or before `after`', async (t) => {
  const items = [
    allEvent(100n), // at `after`: a re-delivery, dropped
    allEvent(110n, { type: 'DeviceRegistered' }),
    allEvent(120n, { type: '$metadata' }),
    allEvent(130n, { streamId: 'job-7', type: 'JobSubmitted' }),
    new CheckpointMarker({ commit: 125n, prepare: 125n }),
    allEvent(140n, { type: 'DeviceRegistered' }),
  ]
  const batch = assembleBatch(items, 100n, { streamPrefixes: ['device-'] })
  t.same(batch!.events.map((e) => e.position), [110n, 140n])
  t.equal(batch!.checkpoint, 140n)

  const filteredLast = assembleBatch([allEvent(150n), allEvent(160n, { type: 'Other' })], 140n, { types: ['DeviceRegistered'] })
  t.same(filteredLast!.events.map((e) => e.position), [150n])
  t.equal(filteredLast!.checkpoint, 160n, 'the checkpoint passes a filtered-out event')

  const onlyMarker = assembleBatch([new CheckpointMarker({ commit: 900n, prepare: 0n })], 160n, undefined)
  t.same(onlyMarker, { events: [], checkpoint: 900n }, 'a server checkpoint alone moves the checkpoint')

  t.equal(assembleBatch([allEvent(50n), new CheckpointMarker({ commit: 60n, prepare: 60n })], 160n, undefined), undefined, 'nothing new')
})

/** Stands in for the client's subscription: an object-mode stream the adapter reads, plus `unsubscribe`. */
function fakeClient() {
  const opened: { options: SubscribeToAllOptions; stream: PassThrough & { unsubscribe(): Promise<void> } }[] = []
  const client = {
    subscribeToAll(options: SubscribeToAllOptions, readable: { highWaterMark?: number }) {
      const stream = Object.assign(new PassThrough({ objectMode: true, highWaterMark: readable.highWaterMark }), {
        unsubscribe: async () => void stream.end(),
      })
      opened.push({ options, stream })
      return stream
    },
    dispose: async () => {},
  }
  return { client: client as unknown as EventStoreDBClient, opened }
}

t.test('a subscription batches what is buffered, keeps server checkpoints in order, and closes', async (t) => {
  const { client, opened } = fakeClient()
  const store = new EventStoreDbEventStore(client)
  const subscription = store.subscribe({ batchSize: 3, filter: { streamPrefixes: ['device-'] } })
  const iterator = subscription[Symbol.asyncIterator]()

  const firstPull = iterator.next()
  await new Promise((r) => setImmediate(r))
  t.equal(opened.length, 1)
  const { options, stream } = opened[0]!
  t.equal(options.fromPosition, 'start')
  t.match(options.filter, { filterOn: 'eventType', regex: '^[^$].*' }, 'system events are filtered on the server')

  // five events arrive at once: batches of at most three, in order
  for (const p of [10n, 20n, 30n, 40n, 50n]) stream.write(allEvent(p, { revision: p / 10n - 1n }))
  const first = (await firstPull).value as SubscriptionBatch
  t.same(first.events.map((e) => e.position), [10n, 20n, 30n])
  t.equal(first.checkpoint, 30n)
  const second = (await iterator.next()).value as SubscriptionBatch
  t.same(second.events.map((e) => e.position), [40n, 50n])

  // a filtered-out event then a server checkpoint: the checkpoint moves without events
  stream.write(allEvent(60n, { streamId: 'job-1' }))
  const filtered = (await iterator.next()).value as SubscriptionBatch
  t.same(filtered, { events: [], checkpoint: 60n })
  const checkpointReached = options.filter!.checkpointReached!
  await checkpointReached(stream as never, { commit: 75n, prepare: 75n })
  const marker = (await iterator.next()).value as SubscriptionBatch
  t.same(marker, { events: [], checkpoint: 75n })

  // close() ends a pull that is waiting for the server
  const waiting = iterator.next()
  setTimeout(() => void subscription.close(), 20)
  t.same(await waiting, { done: true, value: undefined })
  t.ok(stream.destroyed, 'the client subscription is stopped')
  await store.close()
})

t.test('an unreachable EventStoreDB fails fast with EventStoreUnavailableError', async (t) => {
  const started = Date.now()
  const store = EventStoreDbEventStore.fromConnectionString('esdb://127.0.0.1:1?tls=false&defaultDeadline=2000', {
    resubscribeAttempts: 1,
    resubscribeDelayMs: 10,
  })
  const append = await store.append('job-1', [{ type: 'JobSubmitted', data: {} }]).catch((e: unknown) => e)
  t.type(append, EventStoreUnavailableError)
  t.equal((append as EventStoreUnavailableError).code, 'EVENT_STORE_UNAVAILABLE')
  await t.rejects(store.readStream('job-1'), EventStoreUnavailableError)
  await t.rejects(store.readAll(START, 10), EventStoreUnavailableError)
  await t.rejects(store.headPosition(), EventStoreUnavailableError)
  const subscription = store.subscribe({ from: START })
  await t.rejects(
    (async () => {
      for await (const _ of subscription) void _
    })(),
    EventStoreUnavailableError,
    'a subscription gives up after its retries',
  )
  await store.close()
  await t.rejects(store.append('job-1', [{ type: 'JobSubmitted', data: {} }]), EventStoreUnavailableError, 'closed store')
  t.ok(Date.now() - started < 10_000, `bounded time (${Date.now() - started} ms)`)
})

t.test('close() ends a subscription that is retrying an unreachable server', async (t) => {
  const store = new EventStoreDbEventStore('esdb://127.0.0.1:1?tls=false&defaultDeadline=2000', {
    resubscribeAttempts: 1000,
    resubscribeDelayMs: 200,
  })
  const subscription = store.subscribe({ from: 12_345n })
  const done = (async () => {
    for await (const _ of subscription) void _
    return 'ended'
  })()
  await new Promise((r) => setTimeout(r, 300))
  const started = Date.now()
  await store.close()
  t.equal(await done, 'ended')
  t.ok(Date.now() - started < 2000, 'promptly')
})

// ---------------------------------------------------------------------------------------------------------
// Appends the server leaves unanswered or half answered, and bounded reads: over a stand-in for the client
// that keeps a log in memory and answers reads as the client does (from a position inclusively).

/** `log`: `$all` in position order. Reads record the options they were given. */
function logClient(log: AllStreamResolvedEvent[], append: () => Promise<never>) {
  const reads: { kind: 'all' | 'stream'; options: Record<string, unknown> }[] = []
  const stream = (items: unknown[]) => Object.assign(Readable.from(items), { cancel: async () => {} })
  const client = {
    appendToStream: append,
    readAll(options: { direction: string; fromPosition: 'start' | 'end' | { commit: bigint }; maxCount: number }) {
      reads.push({ kind: 'all', options })
      const { direction, fromPosition: from, maxCount } = options
      const at = (e: AllStreamResolvedEvent) => e.event!.position.commit
      const items =
        direction === 'forwards'
          ? log.filter((e) => from === 'start' || (from !== 'end' && at(e) >= from.commit))
          : log.filter((e) => from === 'end' || (from !== 'start' && at(e) <= from.commit)).reverse()
      return stream(items.slice(0, maxCount))
    },
    readStream(streamId: string, options: { direction?: string; fromRevision: bigint | 'end'; maxCount?: number }) {
      reads.push({ kind: 'stream', options })
      const mine = log.filter((e) => e.event!.streamId === streamId)
      const items = options.direction === 'backwards' ? mine.reverse() : mine.filter((e) => e.event!.revision >= (options.fromRevision as bigint))
      return stream(items.slice(0, options.maxCount ?? Infinity))
    },
    dispose: async () => {},
  }
  return { client: client as unknown as EventStoreDBClient, reads }
}

const idOf = (n: number) => `00000000-0000-4000-8000-${n.toString().padStart(12, '0')}`

/** Stream `job-1` at revisions 0..4 (positions 100, 200, ...), event ids idOf(0..4). */
function jobLog(): AllStreamResolvedEvent[] {
  return Array.from({ length: 5 }, (_, r) => {
    const e = allEvent(BigInt(100 * (r + 1)), { streamId: 'job-1', revision: BigInt(r) })
    ;(e.event as { id: string }).id = idOf(r)
    return e
  })
}

t.test('matchStoredAppend: all in order, some, or none of the ids sent', async (t) => {
  const window = jobLog().map((e) => toRecordedEvent(e)!)
  t.match(matchStoredAppend([idOf(2), idOf(3)], window), { kind: 'all', last: { revision: 3, position: 400n } })
  t.match(matchStoredAppend([idOf(3).toUpperCase()], window), { kind: 'all', last: { revision: 3 } }, 'ids compare without case')
  t.same(matchStoredAppend([idOf(3), idOf(2)], window), { kind: 'some', ids: [idOf(3), idOf(2)] }, 'out of order is not the same append')
  t.same(matchStoredAppend([idOf(4), ID], window), { kind: 'some', ids: [idOf(4)] }, 'past the window end')
  t.same(matchStoredAppend([ID, idOf(1)], window), { kind: 'some', ids: [idOf(1)] })
  t.same(matchStoredAppend([ID], window), { kind: 'none' })
  t.same(matchStoredAppend([ID], []), { kind: 'none' })
})

t.test('an append whose deadline passed is answered from the stream when its events are there', async (t) => {
  const timeout = async (): Promise<never> => {
    throw new DeadlineExceededError()
  }
  // 1. the original (revisions 2 and 3) was written: the retry that timed out gets its result
  const { client, reads } = logClient(jobLog(), timeout)
  const store = new EventStoreDbEventStore(client)
  const retried = await store.append('job-1', [{ id: idOf(2), type: 'A', data: {} }, { id: idOf(3), type: 'B', data: {} }], { expectedRevision: 1 })
  t.same(retried, { nextRevision: 3, position: 400n })
  t.match(reads, [{ kind: 'stream', options: { fromRevision: 2n, maxCount: 2 } }], 'one read of the two revisions after the expected one')

  // 2. 'any': the stream's recent events are read (bounded)
  const any = await store.append('job-1', [{ id: idOf(4), type: 'A', data: {} }])
  t.same(any, { nextRevision: 4, position: 500n })
  t.match(reads.at(-1), { kind: 'stream', options: { direction: 'backwards', maxCount: 1000 } })

  // 3. not there (or only in part): the store is unavailable, as before
  await t.rejects(store.append('job-1', [{ id: ID, type: 'A', data: {} }], { expectedRevision: 4 }), EventStoreUnavailableError)
  await t.rejects(store.append('job-1', [{ id: idOf(4), type: 'A', data: {} }, { id: ID, type: 'B', data: {} }], { expectedRevision: 3 }), EventStoreUnavailableError)
  await store.close()
})

t.test('a wrong expected version over ids already stored: a retry, a duplicate id, or a conflict', async (t) => {
  const conflict = async (): Promise<never> => {
    throw new WrongExpectedVersionError(undefined, { streamName: 'job-1', expected: 1n, current: 4n })
  }
  const { client, reads } = logClient(jobLog(), conflict)
  const store = new EventStoreDbEventStore(client)
  // some of the ids are stored (CorruptedIdempotency, which the server answers as a wrong version)
  const partial = await store.append('job-1', [{ id: idOf(2), type: 'A', data: {} }, { id: ID, type: 'B', data: {} }], { expectedRevision: 1 }).catch((e: unknown) => e)
  t.type(partial, DuplicateEventIdError)
  t.same((partial as DuplicateEventIdError).eventIds, [idOf(2)])
  // all of them: the original's result, as the Postgres store answers a retry
  t.same(await store.append('job-1', [{ id: idOf(2), type: 'A', data: {} }], { expectedRevision: 1 }), { nextRevision: 2, position: 300n })
  // none: a plain conflict
  await t.rejects(store.append('job-1', [{ id: ID, type: 'A', data: {} }], { expectedRevision: 1 }), WrongExpectedRevisionError)
  const before = reads.length
  await t.rejects(store.append('job-1', [{ type: 'A', data: {} }], { expectedRevision: 1 }), WrongExpectedRevisionError)
  t.equal(reads.length, before, 'fresh ids: a conflict costs no read')
  await store.close()
})

t.test('an append above MaxAppendSize is PayloadTooLargeError', async (t) => {
  const tooLarge = MaxAppendSizeExceededError.fromMaxAppendSize(1_048_576)
  const mapped = mapAppendError(tooLarge, 'job-1', 'any')
  t.type(mapped, PayloadTooLargeError)
  t.match(mapped, { code: 'PAYLOAD_TOO_LARGE', streamId: 'job-1', maxBytes: 1_048_576, message: /1048576 bytes/ })
  const raw = Object.assign(new Error('3 INVALID_ARGUMENT: Maximum Append Size of 1048576 Exceeded.'), { code: 3, details: 'Maximum Append Size of 1048576 Exceeded.' })
  t.match(mapAppendError(raw, 'job-2'), { code: 'PAYLOAD_TOO_LARGE', streamId: 'job-2', maxBytes: 1_048_576 }, 'the raw gRPC refusal too')
  const { client } = logClient([], async () => {
    throw tooLarge
  })
  const store = new EventStoreDbEventStore(client)
  await t.rejects(store.append('job-1', [{ type: 'Big', data: {} }]), PayloadTooLargeError)
  await store.close()
})

t.test('readAll and headPosition read bounded windows and pass system records', async (t) => {
  const log = [
    allEvent(10n),
    allEvent(20n, { type: '$metadata' }),
    allEvent(30n, { streamId: '$stats-1' }),
    allEvent(40n),
    allEvent(50n),
    allEvent(60n, { type: '$metadata' }),
    allEvent(70n),
    ...Array.from({ length: 70 }, (_, i) => allEvent(BigInt(80 + i), { type: '$metadata' })),
  ]
  const { client, reads } = logClient(log, async () => {
    throw new Error('no appends here')
  })
  const store = new EventStoreDbEventStore(client)
  t.same((await store.readAll(START, 2)).map((e) => e.position), [10n, 40n], 'a window of system records is followed by the next')
  t.same((await store.readAll(10n, 3)).map((e) => e.position), [40n, 50n, 70n])
  t.same((await store.readAll(70n, 3)).map((e) => e.position), [], 'only system records to the end')
  t.ok(reads.every((r) => typeof r.options.maxCount === 'number' && (r.options.maxCount as number) <= 4), 'every read names a small maxCount')

  reads.length = 0
  t.equal(await store.headPosition(), 70n, 'the last event past 70 system records')
  t.same(reads.map((r) => r.options.maxCount), [1, 64, 64], 'one record first, then windows')
  const quiet = logClient([allEvent(10n), allEvent(20n)], async () => {
    throw new Error('no appends here')
  })
  const head = new EventStoreDbEventStore(quiet.client)
  t.equal(await head.headPosition(), 20n)
  t.same(quiet.reads.map((r) => r.options), [{ direction: 'backwards', fromPosition: 'end', maxCount: 1 }], 'one backward read of one record')
  t.equal(await new EventStoreDbEventStore(logClient([], async () => { throw new Error('none') }).client).headPosition(), START, 'an empty log')
  await store.close()
  await head.close()
})
