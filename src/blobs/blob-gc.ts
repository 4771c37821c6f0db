import type { Kysely } from 'kysely'
import type { EventStore, Position } from '../event-store/port.js'
import { liveBlobReferences } from '../projections/blob-references.js'
import type { BlobStore } from './blob-store.js'

/** A day's grace: far longer than any upload or append takes. Collected hourly. */
export const BLOB_GC_DEFAULTS = { graceMs: 24 * 3600_000, intervalMs: 3600_000 }

export interface BlobCollectorOptions {
  blobs: BlobStore
  store: EventStore
  db: Kysely<any>
  /** Read-your-writes on the read models (`Projections.waitFor`); the references check their checkpoints anyway. */
  waitFor: (position: Position, timeoutMs: number) => Promise<void>
  /** A blob, or a temporary file, younger than this is never collected, nor one released more recently (default 24 h). */
  graceMs?: number
  now?: () => Date
  log?: (message: string) => void
}

export interface BlobCollection {
  /** Blobs looked at. */
  scanned: number
  /** Blobs and temporary files deleted. */
  deleted: number
  freed_bytes: number
}

/**
 * Deletes the blobs nothing holds any more (src/projections/blob-references.ts says what holds one), and the
 * temporary files of writes that never finished. Why it never deletes one that is needed:
 * - a blob written less than the grace period ago is kept, so one whose event is still being appended, or an
 *   upload in progress, survives; an upload of content already stored writes the file again (`keep`), and the
 *   store deletes a file only if it was not written since the collector looked (`removeIfOlder`);
 * - every other new reference copies one that was live less than the grace period ago, which kept the file;
 * - references come from read models that have applied the whole log up to a position read before them
 *   (if not, the run deletes nothing).
 * Deleting is one unlink per blob: a crash part way leaves blobs that the next run deletes.
 */
export class BlobCollector {
  private readonly graceMs: number
  private readonly now: () => Date
  private running: Promise<BlobCollection> | undefined
  private timer: NodeJS.Timeout | undefined

  constructor(private readonly options: BlobCollectorOptions) {
    this.graceMs = options.graceMs ?? BLOB_GC_DEFAULTS.graceMs
    this.now = options.now ?? (() => new Date())
  }

  /** One collection; a call while one runs gets that one's result (one run at a time per process). */
  collect(): Promise<BlobCollection> {
    this.running ??= this.run().finally(() => { this.running = undefined })
    return this.running
  }

  /** Collects every `intervalMs` (the first run one interval after start); failures are logged, never thrown. */
  start(intervalMs: number): void {
    this.timer = setInterval(() => {
      this.collect().catch((error: Error) => this.options.log?.(`blob gc: ${error.message}`))
    }, intervalMs)
    this.timer.unref()
  }

  /** Stops the timer and waits for a run in progress. */
  async stop(): Promise<void> {
    clearInterval(this.timer)
    await this.running?.catch(() => {})
  }

  private async run(): Promise<BlobCollection> {
    // 1. the cutoff first: anything written or released after it is kept
    const cutoff = this.now().getTime() - this.graceMs
    // 2. what is referenced, from read models that have caught up with the log
    const head = await this.options.store.headPosition()
    // a timeout is not an error here: the checkpoints below decide
    await this.options.waitFor(head, 60_000).catch(() => {})
    const live = await liveBlobReferences(this.options.db, this.options.store, head, new Date(cutoff).toISOString())
    // 3. delete the rest that is older than the cutoff
    const result: BlobCollection = { scanned: 0, deleted: 0, freed_bytes: 0 }
    for await (const blob of this.options.blobs.list()) {
      result.scanned += 1
      if (live.has(blob.sha256) || blob.mtimeMs > cutoff) continue
      const freed = await this.options.blobs.removeIfOlder(blob.sha256, cutoff)
      if (freed === undefined) continue
      result.deleted += 1
      result.freed_bytes += freed
    }
    const temporary = await this.options.blobs.removeStaleTemporary(cutoff)
    result.deleted += temporary.count
    result.freed_bytes += temporary.bytes
    this.options.log?.(`blob gc: scanned ${result.scanned} blobs, deleted ${result.deleted} (${temporary.count} unfinished uploads), freed ${result.freed_bytes} bytes`)
    return result
  }
}
