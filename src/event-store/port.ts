/**
 * The EventStore port: the one interface that every part of dcp uses to write and read the log.
 * Two adapters implement it (Postgres, the default, and EventStoreDB) and pass the same contract suite
 * (test/event-store/contract.ts).
 */
import { appendThroughIntent } from './intents.js'

/** A global position in the log. Positions only grow; `START` is before the first event. */
export type Position = bigint
export const START: Position = -1n

/**
 * What the writer expects the stream to look like before its append:
 * - `'no_stream'`: the stream has no events yet;
 * - `'stream_exists'`: the stream has at least one event;
 * - `'any'`: no check;
 * - a number: the revision of the stream's last event (revisions start at 0).
 */
export type ExpectedRevision = 'no_stream' | 'stream_exists' | 'any' | number

export interface EventMetadata {
  customerId?: string
  correlationId?: string
  causationId?: string
  /** ISO-8601 time the fact happened, given by the command (domain code has no clock). */
  occurredAt?: string
  /** Version of the event's data schema, for upcasters. Defaults to 1. */
  schemaVersion?: number
  [key: string]: unknown
}

export interface NewEvent {
  /** A UUID. Give a deterministic one (see `eventIdFor`) to make a retried append a no-op. */
  id?: string
  type: string
  data: unknown
  metadata?: EventMetadata
}

export interface RecordedEvent {
  id: string
  streamId: string
  revision: number
  position: Position
  type: string
  data: unknown
  metadata: EventMetadata
  recordedAt: Date
}

export interface AppendOptions {
  /** Defaults to `'any'`. */
  expectedRevision?: ExpectedRevision
}

export interface AppendResult {
  /** Revision of the stream's last event after the append. */
  nextRevision: number
  /** Position of the append's last event. */
  position: Position
}

export interface ReadStreamOptions {
  /** First revision to return (inclusive). Defaults to 0. */
  fromRevision?: number
  /** Defaults to all. */
  maxCount?: number
}

export interface EventFilter {
  /** Only these event types. */
  types?: readonly string[]
  /** Only streams whose id starts with one of these prefixes (e.g. `'device-'`). */
  streamPrefixes?: readonly string[]
}

export interface SubscribeOptions {
  /** Deliver events after this position (exclusive). Defaults to `START`. */
  from?: Position
  filter?: EventFilter
  /** Most events in one delivered batch. Defaults to 1000. */
  batchSize?: number
}

/**
 * One delivery of a subscription. `checkpoint` is how far the log has been scanned: every event at or
 * below it that matches the filter has been delivered, in this batch or an earlier one. It can pass the
 * last event of `events` (filtered-out events) and can come with no events at all.
 */
export interface SubscriptionBatch {
  events: RecordedEvent[]
  checkpoint: Position
}

/**
 * Pull-based: the next batch is read only when the consumer asks for it, so a slow consumer slows the
 * reads rather than filling memory (backpressure). Catch-up and live use the same read, so there is no
 * switch-over where an event could be lost or repeated.
 */
export interface Subscription extends AsyncIterable<SubscriptionBatch> {
  close(): Promise<void>
}

/** One stream's part of an `appendMany`. */
export interface StreamAppend {
  streamId: string
  events: readonly NewEvent[]
  options?: AppendOptions
}

export interface EventStore {
  append(streamId: string, events: readonly NewEvent[], options?: AppendOptions): Promise<AppendResult>
  /**
   * Optional: appends to several streams all or nothing (one transaction): each keeps its own expected
   * revision, and if one is refused, none is written and every one rejects with that error. A store that
   * cannot (EventStoreDB appends to one stream at a time) leaves it out, and `appendAll` records an intent
   * there instead.
   */
  appendMany?(appends: readonly StreamAppend[]): Promise<AppendResult[]>
  /** Events of one stream in revision order; an empty array for a stream that does not exist. */
  readStream(streamId: string, options?: ReadStreamOptions): Promise<RecordedEvent[]>
  /** Up to `limit` events after position `after` (exclusive), in position order. */
  readAll(after?: Position, limit?: number): Promise<RecordedEvent[]>
  subscribe(options?: SubscribeOptions): Subscription
  /**
   * Optional: a page of the log after `after` covering up to `limit` events, of which only those matching
   * `filter` are read in full and returned; `last` is the position of the page's last event, matching or not.
   * `held`: the page stopped early below a transaction that may still commit (read again soon). A store that
   * cannot filter while reading leaves it out, and replays filter `readAll`'s events instead.
   */
  readFilteredPage?(after: Position, limit: number, filter: EventFilter): Promise<{ events: RecordedEvent[]; scanned: number; last: Position; held: boolean }>
  /** Position of the last event that readers may see (`START` for an empty log). */
  headPosition(): Promise<Position>
  close(): Promise<void>
}

export function matchesFilter(event: { type: string; streamId: string }, filter: EventFilter | undefined): boolean {
  if (!filter) return true
  if (filter.types && !filter.types.includes(event.type)) return false
  if (filter.streamPrefixes && !filter.streamPrefixes.some((p) => event.streamId.startsWith(p))) return false
  return true
}

/**
 * Appends to several streams all or nothing, on every store: with `appendMany` where the store has it (one
 * transaction), else through a recorded intent that recovery completes after a crash (`intents.ts`; readers
 * may see the set partly written until it is complete). A stream refused before anything is written refuses
 * the lot with its error, as `appendMany` does.
 */
export async function appendAll(store: EventStore, appends: readonly StreamAppend[]): Promise<AppendResult[]> {
  if (store.appendMany) return store.appendMany(appends)
  return appendThroughIntent(store, appends)
}
