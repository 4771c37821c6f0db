import { type EventFilter, matchesFilter, type Position, type RecordedEvent, START, type SubscribeOptions, type Subscription, type SubscriptionBatch } from './port.js'
import type { Signal } from './signal.js'

export interface Page {
  /** The events of the page that match the filter (a source may filter before reading them in full). */
  events: RecordedEvent[]
  /** How many events the page covered, matching or not. */
  scanned: number
  /** The position of the page's last event, matching or not (when `scanned` > 0). */
  last: Position
  /** True when the read stopped early below a transaction that may still commit: read again soon. */
  held: boolean
}

export interface PollingSource {
  readPage(after: Position, limit: number, filter: EventFilter | undefined): Promise<Page>
  /** Notified when new events may have been committed. */
  signal: Signal
  /** Longest wait without a notification before reading again (a missed notification costs this). */
  idlePollMs: number
  /** Wait before re-reading a page that was held back by an open transaction. */
  heldPollMs: number
}

/**
 * A subscription that reads pages from its position on demand. Catch-up and live are the same keyset
 * read, so there is no hand-over between them to lose or repeat an event; a read happens only when the
 * consumer pulls the next batch (backpressure).
 */
export class PollingSubscription implements Subscription {
  private closed = false

  constructor(private readonly source: PollingSource, private readonly options: SubscribeOptions) {}

  async close(): Promise<void> {
    this.closed = true
    this.source.signal.notify()
  }

  async *[Symbol.asyncIterator](): AsyncIterator<SubscriptionBatch> {
    const batchSize = this.options.batchSize ?? 1000
    let position = this.options.from ?? START
    while (!this.closed) {
      const seen = this.source.signal.version
      const page = await this.source.readPage(position, batchSize, this.options.filter)
      if (this.closed) return
      if (page.scanned > 0) {
        position = page.last
        yield { events: page.events.filter((e) => matchesFilter(e, this.options.filter)), checkpoint: position }
        if (page.scanned === batchSize) continue
      }
      await this.source.signal.wait(page.held ? this.source.heldPollMs : this.source.idlePollMs, seen)
    }
  }
}
