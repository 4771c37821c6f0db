import type { EventMetadata, Position, RecordedEvent } from './port.js'

/** An event as this store wrote it: its row, JSON text and all, and the position its commit gave it. */
export interface WrittenRow {
  position: Position
  streamId: string
  revision: number
  id: string
  type: string
  data: string
  metadata: string
}

export interface WrittenEventsOptions {
  /** Events kept at most (the oldest written are forgotten first). Default 20,000. */
  maxEvents?: number
  /** JSON text (data and metadata) kept at most, in characters. Default 32 Mi. */
  maxChars?: number
  /** An event with more JSON text than this is not kept (a batch's inputs): it is read back like another process's. Default 256 Ki. */
  maxEventChars?: number
}

/**
 * The events this store committed lately, by position, as their rows went to the database. A subscriber's
 * page asks the database which positions it may deliver (below the position bound, as always) and takes
 * the events found here instead of reading them back in full: no row to send and parse, and the JSON
 * parsed from the very text that was stored, so the event is the one a read would give (`json` keeps the
 * text as written). A position is only ever given once (it is made of the writing transaction's id), so
 * the event kept for a position is the event stored there. Anything not found here is read from the log.
 */
export class WrittenEvents {
  private readonly rows = new Map<Position, WrittenRow>()
  /** The positions kept, oldest written first, from `first` on (a queue: a Map iterated from its start walks over its deleted entries). */
  private order: Position[] = []
  private first = 0
  private chars = 0
  private readonly maxEvents: number
  private readonly maxChars: number
  private readonly maxEventChars: number

  constructor(options: WrittenEventsOptions = {}) {
    this.maxEvents = options.maxEvents ?? 20_000
    this.maxChars = options.maxChars ?? 32 * 1024 * 1024
    this.maxEventChars = options.maxEventChars ?? 256 * 1024
  }

  /** Keeps committed rows (those with a position), within the bounds. */
  add(rows: readonly WrittenRow[]): void {
    for (const row of rows) {
      const size = row.data.length + row.metadata.length
      if (size > this.maxEventChars) continue
      this.rows.set(row.position, row)
      this.order.push(row.position)
      this.chars += size
    }
    while (this.rows.size > this.maxEvents || this.chars > this.maxChars) {
      const position = this.order[this.first++]!
      const row = this.rows.get(position)!
      this.rows.delete(position)
      this.chars -= row.data.length + row.metadata.length
    }
    if (this.first > this.maxEvents) {
      this.order = this.order.slice(this.first)
      this.first = 0
    }
  }

  /** The position of the oldest event kept (in the order written, which is close to position order), if any. */
  oldest(): Position | undefined {
    return this.order[this.first]
  }

  /**
   * The event at this position as a read would give it, when this store wrote it and still keeps it; the
   * stream and type the log holds there must match (they always do: a check, not a decision).
   */
  take(position: Position, streamId: string, type: string, recordedAt: Date): RecordedEvent | undefined {
    const row = this.rows.get(position)
    if (!row || row.streamId !== streamId || row.type !== type) return undefined
    return {
      id: row.id,
      streamId: row.streamId,
      revision: row.revision,
      position,
      type: row.type,
      data: JSON.parse(row.data) as unknown,
      metadata: JSON.parse(row.metadata) as EventMetadata,
      recordedAt,
    }
  }
}
