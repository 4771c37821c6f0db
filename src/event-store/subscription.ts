import { matchesFilter, type Position, type RecordedEvent, START, type SubscribeOptions, type Subscription, type SubscriptionBatch } from './port.js'
import type { Signal } from './signal.js'

export interface Page {
  events: RecordedEvent[]
  /** True when the read stopped early below a transaction that may still commit: read again soon. */
  held: boolean
}

export interface PollingSource {
  readPage(after: Position, limit: number): Promise<Page>
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
      const page = await this.source.readPage(position, batchSize)
      if (this.closed) return
      const last = page.events.at(-1)
      if (last) {
        position = last.position
        yield { events: page.events.filter((e) => matchesFilter(e, this.options.filter)), checkpoint: position }
        if (page.events.length === batchSize) continue
      }
      await this.source.signal.wait(page.held ? this.source.heldPollMs : this.source.idlePollMs, seen)
    }
  }
}
