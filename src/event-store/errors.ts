import type { ExpectedRevision } from './port.js'

/** The stream was not where the writer expected it: someone else appended first. Safe to re-read and retry. */
export class WrongExpectedRevisionError extends Error {
  readonly code = 'WRONG_EXPECTED_REVISION'
  constructor(
    readonly streamId: string,
    readonly expected: ExpectedRevision,
    /** The stream's actual last revision, or `'no_stream'`. */
    readonly actual: number | 'no_stream',
  ) {
    super(`stream ${streamId}: expected revision ${String(expected)}, actual ${String(actual)}`)
    this.name = 'WrongExpectedRevisionError'
  }
}

/** Some but not all of an append's event ids are already stored: not a retry of one append, so refused. */
export class DuplicateEventIdError extends Error {
  readonly code = 'DUPLICATE_EVENT_ID'
  constructor(readonly streamId: string, readonly eventIds: string[]) {
    super(`stream ${streamId}: event ids already stored by another append: ${eventIds.join(', ')}`)
    this.name = 'DuplicateEventIdError'
  }
}

export class EventStoreUnavailableError extends Error {
  readonly code = 'EVENT_STORE_UNAVAILABLE'
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'EventStoreUnavailableError'
  }
}

/**
 * An event that cannot be stored as it is: its JSON holds U+0000, which Postgres text (every read model, and
 * the Postgres log) cannot hold. Refused by both adapters alike, before it can reach a read model.
 */
export class UnstorableEventError extends Error {
  readonly code = 'UNSTORABLE_EVENT'
  constructor(readonly eventType: string) {
    super(`event ${eventType}: a value holds the NUL character (\\u0000), which dcp cannot store`)
    this.name = 'UnstorableEventError'
  }
}

/**
 * An append larger than the store takes in one write: EventStoreDB refuses appends above its
 * `MaxAppendSize` (1 MiB by default; docker-compose.yml sets it). The request that made it is too large:
 * the HTTP layer answers 413 PAYLOAD_TOO_LARGE.
 */
export class PayloadTooLargeError extends Error {
  readonly code = 'PAYLOAD_TOO_LARGE'
  constructor(readonly streamId: string, readonly maxBytes: number | undefined) {
    super(`stream ${streamId}: the append is larger than the event store takes in one write${maxBytes ? ` (${maxBytes} bytes)` : ''}`)
    this.name = 'PayloadTooLargeError'
  }
}
