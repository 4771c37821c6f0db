/**
 * The EventStoreDB adapter of the EventStore port, on `@eventstore/db-client` 6.2.1 (gRPC, server 20+;
 * deployed with the 24.10 LTS image, see docker-compose.yml).
 *
 * Positions. The port's `Position` is a single bigint; ESDB's is `{ commit, prepare }`. We use the commit
 * position. Every event appended over gRPC is written as a self-committed prepare record, whose `$all`
 * position is `{ commit: p, prepare: p }` with `p` its own log position, so commit positions are unique and
 * grow with the log. Going back we use `{ commit: p, prepare: p }`. Legacy explicit transactions (TCP client
 * only, gone from 24.x) share one commit position between events: a log holding them is not supported.
 * Positions handed to `readAll`/`subscribe` must come from this store (they are log offsets, not counters).
 *
 * Idempotency. The port's event id is the ESDB event id, so ESDB's own idempotency check answers a retried
 * append with the original revision; its position is then looked up. ESDB does not enforce globally unique
 * event ids the way the Postgres adapter does, and with `expectedRevision: 'any'` the server's check is best
 * effort (a cache of recent ids). Two answers of the server are not the port's, and the adapter reads the
 * stream to give the port's answer (`settleAppend`):
 * - a retry that arrives while its original is not yet committed (IdempotentNotReady) is dropped without a
 *   reply ("just drop the write and wait for the client to retry", StorageWriterService.cs), so the client
 *   sees its deadline pass (`DeadlineExceededError`: the server's `Timeout` answer to a batch append,
 *   unpackError.js, or gRPC's DEADLINE_EXCEEDED on the unary append; the deadline is the connection string's
 *   `defaultDeadline`, 10 s by default);
 * - an append some of whose ids are stored (CorruptedIdempotency) is answered as a wrong expected version.
 * If the ids sent are there, in order, the append is answered with the original result; if only some are,
 * with `DuplicateEventIdError` (as the Postgres adapter). An append above the server's MaxAppendSize
 * becomes `PayloadTooLargeError`.
 *
 * Bounded reads. Every `$all` read names a `maxCount`, so none is left open and cancelled. The client's
 * `readAll` cannot filter on the server (6.2.1 sends `no_filter` whatever it is given, readAll.js), and a
 * filtered `subscribeToAll` reports what it skipped only through checkpoints every 32 scanned records or so,
 * so it cannot say how many records a page covered: `readFilteredPage` is left out and replays filter
 * `readAll`'s pages here (see docs/event-store.md).
 *
 * System events (type or stream starting with `$`) are never returned.
 */
import {
  ANY,
  BACKWARDS,
  END,
  EventStoreDBClient,
  FORWARDS,
  NO_STREAM,
  START as ESDB_START,
  STREAM_EXISTS,
  StreamNotFoundError,
  WrongExpectedVersionError,
  CancelledError,
  DeadlineExceededError,
  MaxAppendSizeExceededError,
  NotLeaderError,
  TimeoutError,
  UnavailableError,
  convertToCommandError,
  excludeSystemEvents,
  jsonEvent,
} from '@eventstore/db-client'
import type {
  AllStreamResolvedEvent,
  AllStreamSubscription,
  AppendExpectedRevision,
  CurrentRevision,
  JSONEventData,
  JSONType,
  Position as EsdbPosition,
  ReadPosition,
  ResolvedEvent,
  StreamingRead,
} from '@eventstore/db-client'
import { DuplicateEventIdError, EventStoreUnavailableError, PayloadTooLargeError, WrongExpectedRevisionError } from './errors.js'
import { assertStorable, storedId } from './storable.js'
import type {
  AppendOptions,
  AppendResult,
  EventFilter,
  EventMetadata,
  EventStore,
  ExpectedRevision,
  NewEvent,
  Position,
  ReadStreamOptions,
  RecordedEvent,
  SubscribeOptions,
  Subscription,
  SubscriptionBatch,
} from './port.js'
import { START, matchesFilter } from './port.js'

export interface EventStoreDbEventStoreOptions {
  /** Dispose the client in `close()`. Default true (also for a client passed in). */
  disposeClient?: boolean
  /** Consecutive failed (re)subscriptions before a subscription gives up. Default 5. */
  resubscribeAttempts?: number
  /** Wait before the n-th resubscription is n times this. Default 500 ms. */
  resubscribeDelayMs?: number
}

/** Most records one backward read of `$all` asks for while it passes system events. */
const BACKWARD_WINDOW = 64
/** Most events of a stream read back to settle an append made with `'any'` or `'stream_exists'` (ESDB's own check of such retries only sees recent ids too). */
const RECENT_EVENTS = 1000

export class EventStoreDbEventStore implements EventStore {
  private readonly client: EventStoreDBClient
  private readonly subscriptions = new Set<EsdbSubscription>()
  private closed = false

  /** `client`: a client, or a connection string such as `esdb://eventstore:2113?tls=false`. */
  constructor(client: EventStoreDBClient | string, private readonly options: EventStoreDbEventStoreOptions = {}) {
    this.client = typeof client === 'string' ? EventStoreDBClient.connectionString(client) : client
  }

  static fromConnectionString(url: string, options?: EventStoreDbEventStoreOptions): EventStoreDbEventStore {
    return new EventStoreDbEventStore(EventStoreDBClient.connectionString(url), options)
  }

  async append(streamId: string, events: readonly NewEvent[], options: AppendOptions = {}): Promise<AppendResult> {
    if (this.closed) throw new EventStoreUnavailableError('event store is closed')
    const expected = options.expectedRevision ?? 'any'
    if (events.length === 0) return this.checkOnly(streamId, expected)
    const proposed = events.map(toEsdbEvent)
    let result
    try {
      result = await this.client.appendToStream(streamId, proposed, { expectedRevision: toEsdbExpectedRevision(expected) })
    } catch (error) {
      const chosenIds = events.some((e) => e.id !== undefined)
      const settled = await this.settleAppend(error, streamId, proposed.map((e) => e.id), expected, chosenIds)
      if (settled) return settled
      throw mapAppendError(error, streamId, expected)
    }
    const nextRevision = Number(result.nextExpectedRevision)
    // An idempotent retry comes back without a position: the original one is that of its last event.
    const position = hasPosition(result.position) ? fromEsdbPosition(result.position) : await this.positionOf(streamId, nextRevision)
    return { nextRevision, position }
  }

  async readStream(streamId: string, options: ReadStreamOptions = {}): Promise<RecordedEvent[]> {
    if (options.maxCount !== undefined && options.maxCount <= 0) return []
    const read = this.client.readStream(streamId, {
      direction: FORWARDS,
      fromRevision: BigInt(options.fromRevision ?? 0),
      ...(options.maxCount !== undefined ? { maxCount: options.maxCount } : {}),
    })
    try {
      const events: RecordedEvent[] = []
      for await (const resolved of read) {
        const event = toRecordedEvent(resolved)
        if (event) events.push(event)
      }
      return events
    } catch (error) {
      if (error instanceof StreamNotFoundError) return []
      throw mapError(error)
    }
  }

  /**
   * Windows of at most `limit + 1` records: ESDB reads from a position inclusively (the record at `after`
   * comes back first and is skipped), and system records count in a window but are not returned, so a
   * window that brought fewer than `limit` events is followed by the next one until the log ends.
   */
  async readAll(after: Position = START, limit = 1000): Promise<RecordedEvent[]> {
    if (limit <= 0) return []
    const events: RecordedEvent[] = []
    let from = after
    while (events.length < limit) {
      const asked = limit - events.length + 1
      const records = await readAllWindow(this.client, FORWARDS, toEsdbPosition(from), asked)
      const start = from
      for (const resolved of records) {
        const position = resolvedPosition(resolved)
        if (position === undefined || position <= from) continue
        from = position
        const event = toRecordedEvent(resolved)
        if (event) events.push(event)
      }
      if (records.length < asked || from === start) break // the end of the log (or a window with nothing new)
    }
    return events
  }

  subscribe(options: SubscribeOptions = {}): Subscription {
    const subscription = new EsdbSubscription(this.client, options, {
      attempts: this.options.resubscribeAttempts ?? 5,
      delayMs: this.options.resubscribeDelayMs ?? 500,
      onClose: () => this.subscriptions.delete(subscription),
    })
    if (this.closed) void subscription.close()
    else this.subscriptions.add(subscription)
    return subscription
  }

  /** The newest non-system event's position: one backward read of one record, more only past system records. */
  async headPosition(): Promise<Position> {
    return (await lastEventAtOrBefore(this.client, 'end')) ?? START
  }

  async close(): Promise<void> {
    if (this.closed) return
    this.closed = true
    await Promise.all([...this.subscriptions].map((s) => s.close()))
    if (this.options.disposeClient ?? true) await this.client.dispose()
  }

  /** An empty append: nothing to write, but the expected revision is still checked, as in Postgres. */
  private async checkOnly(streamId: string, expected: ExpectedRevision): Promise<AppendResult> {
    const head = await this.lastEvent(streamId)
    const current = head ? head.revision : -1
    if (!revisionAccepts(expected, current)) throw new WrongExpectedRevisionError(streamId, expected, head ? current : 'no_stream')
    return { nextRevision: current, position: head?.position ?? START }
  }

  private async lastEvent(streamId: string): Promise<RecordedEvent | undefined> {
    const read = this.client.readStream(streamId, { direction: BACKWARDS, fromRevision: END, maxCount: 1 })
    try {
      for await (const resolved of read) return toRecordedEvent(resolved)
      return undefined
    } catch (error) {
      if (error instanceof StreamNotFoundError) return undefined
      throw mapError(error)
    } finally {
      await cancelRead(read)
    }
  }

  /**
   * The port's answer to an append the server failed in a way that may hide a retry (see the header): the
   * original result when the ids sent are stored in order, `DuplicateEventIdError` when only some are
   * (after a wrong expected version), undefined when the failure stands. A read that fails leaves the
   * append's own failure standing.
   */
  private async settleAppend(error: unknown, streamId: string, ids: readonly string[], expected: ExpectedRevision, chosenIds: boolean): Promise<AppendResult | undefined> {
    const converted = error instanceof Error ? convertToCommandError(error) : error
    const timedOut = converted instanceof DeadlineExceededError
    // fresh ids cannot be stored by another append: a conflict then is only a conflict (no read on that path).
    // After a timeout the ids sent are looked for either way: if they are there, the append was made.
    if (!timedOut && !(chosenIds && converted instanceof WrongExpectedVersionError)) return undefined
    const window = await this.readSettleWindow(streamId, expected, ids.length).catch(() => undefined)
    if (!window) return undefined
    const stored = matchStoredAppend(ids, window)
    if (stored.kind === 'all') return { nextRevision: stored.last.revision, position: stored.last.position }
    if (stored.kind === 'some' && !timedOut) throw new DuplicateEventIdError(streamId, stored.ids)
    return undefined
  }

  /** Where an append expecting `expected` put its `count` events, if it did: just after that revision, or the stream's recent events. */
  private async readSettleWindow(streamId: string, expected: ExpectedRevision, count: number): Promise<RecordedEvent[]> {
    if (expected === 'no_stream' || typeof expected === 'number') {
      const fromRevision = expected === 'no_stream' ? 0 : expected + 1
      return this.readStream(streamId, { fromRevision, maxCount: count })
    }
    const read = this.client.readStream(streamId, { direction: BACKWARDS, fromRevision: END, maxCount: Math.max(count, RECENT_EVENTS) })
    try {
      const events: RecordedEvent[] = []
      for await (const resolved of read) {
        const event = toRecordedEvent(resolved)
        if (event) events.push(event)
      }
      return events.reverse()
    } catch (error) {
      if (error instanceof StreamNotFoundError) return []
      throw mapError(error)
    } finally {
      await cancelRead(read)
    }
  }

  private async positionOf(streamId: string, revision: number): Promise<Position> {
    const [event] = await this.readStream(streamId, { fromRevision: revision, maxCount: 1 })
    if (!event) throw new Error(`stream ${streamId}: revision ${revision} acknowledged by EventStoreDB but not readable`)
    return event.position
  }
}

// ---------------------------------------------------------------------------------------------------------
// Subscription

/** A server checkpoint, pushed into the subscription's own stream so that it stays in order with events. */
export class CheckpointMarker {
  constructor(readonly position: EsdbPosition) {}
}

type SubscriptionItem = AllStreamResolvedEvent | CheckpointMarker

interface RetryPolicy {
  attempts: number
  delayMs: number
  onClose(): void
}

/**
 * `subscribeToAll` from the last checkpoint, consumed as an async iterable: each pull takes what the stream
 * has buffered (at most `batchSize` events) as one batch, so a slow consumer leaves events in the stream's
 * buffer, which stops the gRPC reads (backpressure). Only system events are filtered on the server; the
 * port's filter is applied here, so the checkpoint passes filtered-out events as soon as they are seen
 * (server checkpoints come only every 32 scanned events). A dropped subscription (server gone, consumer too
 * slow) is reopened from the checkpoint, so nothing is lost or repeated.
 */
class EsdbSubscription implements Subscription {
  private closed = false
  private current: AllStreamSubscription | undefined
  private wake!: () => void
  private readonly closing = new Promise<void>((resolve) => (this.wake = resolve))

  constructor(
    private readonly client: EventStoreDBClient,
    private readonly options: SubscribeOptions,
    private readonly retry: RetryPolicy,
  ) {}

  async close(): Promise<void> {
    if (this.closed) return
    this.closed = true
    this.wake()
    this.retry.onClose()
    const current = this.current
    this.current = undefined
    await stopSubscription(current)
  }

  async *[Symbol.asyncIterator](): AsyncIterator<SubscriptionBatch> {
    let after = this.options.from ?? START
    let failures = 0
    while (!this.closed) {
      let subscription: AllStreamSubscription | undefined
      try {
        subscription = this.open(await this.startFrom(after))
        for await (const batch of this.batches(subscription, after)) {
          failures = 0
          after = batch.checkpoint
          yield batch
        }
        if (this.closed) return
        throw new EventStoreUnavailableError('EventStoreDB ended the subscription')
      } catch (error) {
        if (this.closed) return
        const mapped = mapError(error)
        if (!(mapped instanceof EventStoreUnavailableError) || ++failures > this.retry.attempts) throw mapped
        await sleepUnless(this.retry.delayMs * failures, this.closing)
      } finally {
        if (this.current === subscription) this.current = undefined
        await stopSubscription(subscription)
      }
    }
  }

  /**
   * Where to open `subscribeToAll` to get every event after `after`. Some servers start a subscription past
   * the first event that passes their filter at or after the given position, which loses an event when the
   * position is not one of those events (a server checkpoint can be any log record). Starting from the
   * last non-system event at or before `after` is exact either way; the events up to `after` that come
   * again are dropped by `assembleBatch`.
   */
  private async startFrom(after: Position): Promise<ReadPosition> {
    if (after === START) return ESDB_START
    const position = await lastEventAtOrBefore(this.client, after)
    return position === undefined ? ESDB_START : toEsdbPosition(position)
  }

  private open(from: ReadPosition): AllStreamSubscription {
    const batchSize = this.options.batchSize ?? 1000
    const subscription = this.client.subscribeToAll(
      {
        fromPosition: from,
        filter: excludeSystemEvents({
          // Called inside the stream's transform, before the next server message: pushing the marker
          // there keeps it behind every event the server sent before it.
          checkpointReached: (sub, position) => void sub.push(new CheckpointMarker(position)),
        }),
      },
      { highWaterMark: Math.min(Math.max(batchSize, 16), 4096) },
    )
    // The iterator sees every error; this listener only keeps one emitted after the iterator is gone
    // (while the subscription is being stopped) from crashing the process.
    subscription.on('error', () => {})
    this.current = subscription
    return subscription
  }

  private async *batches(subscription: AllStreamSubscription, from: Position): AsyncGenerator<SubscriptionBatch> {
    const batchSize = this.options.batchSize ?? 1000
    const items = subscription[Symbol.asyncIterator]() as AsyncIterator<SubscriptionItem>
    let after = from
    while (!this.closed) {
      const first = await this.nextOrClosed(items)
      if (!first || first.done) return
      const taken: SubscriptionItem[] = [first.value]
      let count = first.value instanceof CheckpointMarker ? 0 : 1
      // 2. take what is already buffered, up to batchSize events
      while (count < batchSize && subscription.readableLength > 0) {
        const next = await items.next()
        if (next.done) break
        taken.push(next.value)
        if (!(next.value instanceof CheckpointMarker)) count++
      }
      const batch = assembleBatch(taken, after, this.options.filter)
      if (batch) {
        after = batch.checkpoint
        yield batch
      }
    }
  }

  private async nextOrClosed(items: AsyncIterator<SubscriptionItem>): Promise<IteratorResult<SubscriptionItem> | undefined> {
    const next = items.next()
    next.catch(() => {}) // if close() wins the race, a later failure of this read is expected
    return Promise.race([next, this.closing.then(() => undefined)])
  }
}

/**
 * One delivery from what a subscription buffered: events after `after` that are not system events and
 * match `filter`; the checkpoint is the furthest position seen (events, filtered or not, and server
 * checkpoints). Undefined when it brings nothing new.
 */
export function assembleBatch(items: readonly SubscriptionItem[], after: Position, filter: EventFilter | undefined): SubscriptionBatch | undefined {
  const events: RecordedEvent[] = []
  let checkpoint = after
  for (const item of items) {
    if (item instanceof CheckpointMarker) {
      const position = fromEsdbPosition(item.position)
      if (position > checkpoint) checkpoint = position
      continue
    }
    const position = resolvedPosition(item)
    if (position === undefined || position <= after) continue
    if (position > checkpoint) checkpoint = position
    const event = toRecordedEvent(item)
    if (event && matchesFilter(event, filter)) events.push(event)
  }
  return events.length > 0 || checkpoint > after ? { events, checkpoint } : undefined
}

async function sleepUnless(ms: number, interrupted: Promise<void>): Promise<void> {
  let timer: NodeJS.Timeout | undefined
  await Promise.race([new Promise((resolve) => (timer = setTimeout(resolve, ms))), interrupted])
  clearTimeout(timer)
}

async function stopSubscription(subscription: AllStreamSubscription | undefined): Promise<void> {
  if (!subscription || subscription.destroyed) return
  await subscription.unsubscribe().catch(() => {})
  subscription.destroy()
}

/** One read of `$all` of at most `maxCount` records (system records included), read to its end. */
async function readAllWindow(client: EventStoreDBClient, direction: typeof FORWARDS | typeof BACKWARDS, fromPosition: ReadPosition, maxCount: number): Promise<AllStreamResolvedEvent[]> {
  const read = client.readAll({ direction, fromPosition, maxCount })
  try {
    const records: AllStreamResolvedEvent[] = []
    for await (const resolved of read) records.push(resolved)
    return records
  } catch (error) {
    throw mapError(error)
  } finally {
    await cancelRead(read)
  }
}

/**
 * The position of the last non-system event at or before `at` (`'end'`: the log's end), undefined when there
 * is none: backward reads of one record, then of BACKWARD_WINDOW records while only system records come.
 */
async function lastEventAtOrBefore(client: EventStoreDBClient, at: Position | 'end'): Promise<Position | undefined> {
  let from: ReadPosition = at === 'end' ? END : toEsdbPosition(at)
  // whatever a read gives above this was seen already (a backward read may start at `from` inclusively)
  let bound: Position | undefined = at === 'end' ? undefined : at
  let asked = 1
  for (;;) {
    const records = await readAllWindow(client, BACKWARDS, from, asked)
    let oldest: Position | undefined
    for (const resolved of records) {
      const position = resolvedPosition(resolved)
      if (position === undefined || (bound !== undefined && position > bound)) continue
      if (toRecordedEvent(resolved)) return position
      oldest = position
    }
    if (records.length < asked || oldest === undefined || oldest <= 0n) return undefined
    from = toEsdbPosition(oldest)
    bound = oldest - 1n
    asked = BACKWARD_WINDOW
  }
}

async function cancelRead(read: StreamingRead<unknown>): Promise<void> {
  if (read.readableEnded) return
  read.on('error', () => {}) // a cancelled read may still report its end; it has no reader any more
  await read.cancel().catch(() => {})
}

// ---------------------------------------------------------------------------------------------------------
// Pure mappings between the port and the client

export function toEsdbExpectedRevision(expected: ExpectedRevision): AppendExpectedRevision {
  switch (expected) {
    case 'no_stream':
      return NO_STREAM
    case 'stream_exists':
      return STREAM_EXISTS
    case 'any':
      return ANY
    default:
      // -1 is "no events yet", as the Postgres adapter reads it
      if (expected === -1) return NO_STREAM
      if (!Number.isSafeInteger(expected) || expected < 0) throw new RangeError(`expected revision ${expected} is not a revision`)
      return BigInt(expected)
  }
}

export function fromEsdbExpectedRevision(expected: AppendExpectedRevision): ExpectedRevision {
  return typeof expected === 'bigint' ? Number(expected) : expected
}

export function fromEsdbCurrentRevision(current: CurrentRevision): number | 'no_stream' {
  return typeof current === 'bigint' ? Number(current) : 'no_stream'
}

/** ESDB `{commit, prepare}` -> the port's position: the commit position (see the header comment). */
export function fromEsdbPosition(position: EsdbPosition): Position {
  return position.commit
}

/** The port's position -> where an ESDB read or subscription starts: `START` is `'start'`. */
export function toEsdbPosition(position: Position): ReadPosition {
  if (position === START) return ESDB_START
  if (position < 0n) throw new RangeError(`position ${position} is not a log position`)
  return { commit: position, prepare: position }
}

/** A server answer without a position (idempotent append), or with the unsigned -1 some servers send. */
function hasPosition(position: EsdbPosition | undefined): position is EsdbPosition {
  return position !== undefined && position.commit >= 0n && position.commit < 2n ** 63n - 1n
}

export function isSystemEvent(event: { type: string; streamId: string }): boolean {
  return event.type.startsWith('$') || event.streamId.startsWith('$')
}

function resolvedPosition(resolved: ResolvedEvent | AllStreamResolvedEvent): Position | undefined {
  const event = resolved.event
  if (event?.position) return fromEsdbPosition(event.position)
  return resolved.commitPosition
}

/** A resolved ESDB event -> the port's recorded event; undefined for system events and unresolved links. */
export function toRecordedEvent(resolved: ResolvedEvent | AllStreamResolvedEvent): RecordedEvent | undefined {
  const event = resolved.event
  if (!event || isSystemEvent(event)) return undefined
  const position = resolvedPosition(resolved)
  // Servers before 22.6 do not send positions on stream reads; the adapter targets 24.x.
  if (position === undefined) throw new Error(`event ${event.id} in ${event.streamId} came without a $all position`)
  return {
    id: event.id,
    streamId: event.streamId,
    revision: Number(event.revision),
    position,
    type: event.type,
    data: event.data,
    metadata: isPlainObject(event.metadata) ? (event.metadata as EventMetadata) : {},
    recordedAt: event.created,
  }
}

/** The port's new event -> an ESDB JSON event whose id is the port's id (so ESDB deduplicates retries). */
export function toEsdbEvent(event: NewEvent): JSONEventData {
  const id = storedId(event)
  const data = event.data ?? null
  const metadata = event.metadata ?? {}
  // what the Postgres log refuses, this one refuses too: the read models are Postgres tables either way
  assertStorable(event.type, JSON.stringify(data))
  assertStorable(event.type, JSON.stringify(metadata))
  return jsonEvent({
    id,
    type: event.type,
    // the client JSON.stringifies any value; its type only names objects, arrays and strings
    data: data as JSONType,
    metadata,
  })
}

/**
 * Where the ids an append sent stand in a window of its stream (see `settleAppend`): `all` when they are
 * there in order on consecutive revisions (a retry: `last` is the original's last event), `some` when only
 * some are stored (which ones), `none` when none is.
 */
export function matchStoredAppend(
  ids: readonly string[],
  window: readonly RecordedEvent[],
): { kind: 'all'; last: RecordedEvent } | { kind: 'some'; ids: string[] } | { kind: 'none' } {
  const wanted = ids.map((id) => id.toLowerCase())
  const start = window.findIndex((e) => e.id.toLowerCase() === wanted[0])
  if (start >= 0 && start + wanted.length <= window.length) {
    const run = window.slice(start, start + wanted.length)
    const whole = run.every((e, i) => e.id.toLowerCase() === wanted[i] && e.revision === run[0]!.revision + i)
    if (whole) return { kind: 'all', last: run.at(-1)! }
  }
  const stored = new Set(window.map((e) => e.id.toLowerCase()))
  const found = wanted.filter((id) => stored.has(id))
  return found.length > 0 ? { kind: 'some', ids: found } : { kind: 'none' }
}

/** An append's failure -> the port's errors: a concurrency conflict, too large, the store being unreachable, or as is. */
export function mapAppendError(error: unknown, streamId: string, expected?: ExpectedRevision): unknown {
  const converted = error instanceof Error ? convertToCommandError(error) : error
  // MaximumAppendSizeExceeded (unpackError.js): the server's MaxAppendSize, in bytes, comes with it
  if (converted instanceof MaxAppendSizeExceededError) return new PayloadTooLargeError(streamId, converted.maxAppendSize)
  // the same refusal without the exception metadata the client converts: gRPC INVALID_ARGUMENT "Maximum
  // Append Size of 1048576 Exceeded." (as another client's guide shows it: NFIBrokerage/spear, writing_events.md)
  const tooLarge = converted instanceof Error ? /Maximum Append Size of (\d+) Exceeded/i.exec(converted.message) : null
  if (tooLarge) return new PayloadTooLargeError(streamId, Number(tooLarge[1]))
  if (converted instanceof WrongExpectedVersionError) {
    return new WrongExpectedRevisionError(
      streamId,
      expected ?? fromEsdbExpectedRevision(converted.expectedVersion),
      fromEsdbCurrentRevision(converted.actualVersion),
    )
  }
  return mapError(error)
}

/** Transient failures (no connection, deadline, leader change, server timeout) -> EventStoreUnavailableError. */
export function mapError(error: unknown): unknown {
  if (!(error instanceof Error) || error instanceof EventStoreUnavailableError) return error
  const converted = convertToCommandError(error)
  const transient =
    converted instanceof UnavailableError ||
    converted instanceof DeadlineExceededError ||
    converted instanceof NotLeaderError ||
    converted instanceof TimeoutError ||
    converted instanceof CancelledError ||
    /^Failed to discover/.test(converted.message)
  if (!transient) return converted
  return new EventStoreUnavailableError(`cannot reach EventStoreDB: ${converted.message}`, { cause: error })
}

function revisionAccepts(expected: ExpectedRevision, current: number): boolean {
  if (expected === 'any') return true
  if (expected === 'no_stream') return current === -1
  if (expected === 'stream_exists') return current >= 0
  return expected === current
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value) && !(value instanceof Uint8Array)
}
