import { type Kysely, sql } from 'kysely'
import type { EventStore, Position, Subscription } from '../event-store/port.js'
import { START } from '../event-store/port.js'
import { applyBatch, readCheckpoint, releaseLeadership, tryLeadership } from './checkpoints.js'
import { checkProjectionName, liveSchema, type Projection } from './projection.js'
import { rebuild } from './replay.js'

export type RunnerState = 'starting' | 'standby' | 'rebuilding' | 'live' | 'failed' | 'stopped'

export interface RunnerDeps {
  db: Kysely<any>
  store: EventStore
  log?: (message: string) => void
  /** Events per delivered batch (and per transaction). Default 1000. */
  batchSize?: number
  /** Wait before trying again after an error, and between leadership attempts. Default 1000 ms. */
  retryMs?: number
}

export class ProjectionTimeoutError extends Error {
  readonly code = 'PROJECTION_TIMEOUT'
  constructor(name: string, position: Position, reached: Position) {
    super(`projection ${name} did not reach position ${position} in time (it is at ${reached})`)
  }
}

/**
 * Keeps one projection's live copy up to date: becomes its one writer (advisory lock on a connection of
 * its own), creates or rebuilds the copy when it is missing or its version changed, then follows the log
 * from the checkpoint, catch-up and live alike.
 */
export class ProjectionRunner {
  state: RunnerState = 'starting'
  lastError: string | undefined
  /** Below START until the live copy exists, so that waiting for START means waiting until it is ready. */
  private horizon: Position = START - 1n
  private waiters = new Set<{ position: Position; resolve: () => void }>()
  private subscription: Subscription | undefined
  private running: Promise<void> | undefined
  private stopping = false
  private wake: (() => void) | undefined

  constructor(readonly projection: Projection, private readonly deps: RunnerDeps) {
    checkProjectionName(projection.name)
  }

  /** Every event at or below this position has been applied (or was not for this projection). */
  get position(): Position {
    return this.horizon
  }

  start(): void {
    this.running ??= this.run()
  }

  async stop(): Promise<void> {
    this.stopping = true
    this.wake?.()
    await this.subscription?.close()
    await this.running
    this.state = 'stopped'
  }

  /** Resolves once every event up to `position` is in the read model. */
  waitFor(position: Position, timeoutMs = 10_000): Promise<void> {
    if (this.horizon >= position) return Promise.resolve()
    return new Promise((resolve, reject) => {
      const waiter = {
        position,
        resolve: () => {
          clearTimeout(timer)
          resolve()
        },
      }
      const timer = setTimeout(() => {
        this.waiters.delete(waiter)
        reject(new ProjectionTimeoutError(this.projection.name, position, this.horizon))
      }, timeoutMs)
      this.waiters.add(waiter)
    })
  }

  private advance(position: Position): void {
    if (position <= this.horizon) return
    this.horizon = position
    for (const waiter of this.waiters) {
      if (waiter.position <= position) {
        this.waiters.delete(waiter)
        waiter.resolve()
      }
    }
  }

  private async run(): Promise<void> {
    const { db } = this.deps
    const name = this.projection.name
    await db.connection().execute(async (connection) => {
      while (!this.stopping) {
        try {
          if (!(await tryLeadership(connection, name))) {
            this.state = 'standby'
            await this.pause()
            continue
          }
          try {
            await this.ensureLiveCopy()
            await this.follow()
          } finally {
            await releaseLeadership(connection, name).catch(() => {})
          }
        } catch (error) {
          if (this.stopping) break
          this.state = 'failed'
          this.lastError = (error as Error).message
          this.deps.log?.(`projection ${name}: ${this.lastError}; retrying`)
          await this.pause()
        }
      }
    })
  }

  private pause(): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, this.deps.retryMs ?? 1000)
      this.wake = () => {
        clearTimeout(timer)
        resolve()
      }
    })
  }

  /** Builds the live copy when there is none or it was built by another version of the projection. */
  private async ensureLiveCopy(): Promise<void> {
    const checkpoint = await readCheckpoint(this.deps.db, this.projection.name)
    const { rows } = await sql`select 1 from pg_namespace where nspname = ${liveSchema(this.projection.name)}`.execute(this.deps.db)
    if (checkpoint?.version === this.projection.version && rows.length > 0) return
    this.state = 'rebuilding'
    this.deps.log?.(`projection ${this.projection.name}: building version ${this.projection.version} from the log`)
    await rebuild(this.deps, this.projection)
  }

  private async follow(): Promise<void> {
    const target = { schema: liveSchema(this.projection.name), checkpoint: this.projection.name }
    const from = (await readCheckpoint(this.deps.db, this.projection.name))?.position ?? START
    this.advance(from)
    this.state = 'live'
    this.lastError = undefined
    this.subscription = this.deps.store.subscribe({ from, filter: this.projection.filter, batchSize: this.deps.batchSize ?? 1000 })
    if (this.stopping) await this.subscription.close()
    for await (const batch of this.subscription) {
      // Batches with nothing for this projection move only the in-memory position: the stored
      // checkpoint lags behind, and a restart scans those events again and skips them again.
      if (batch.events.length > 0) await applyBatch(this.deps.db, this.projection, target, batch.events, batch.checkpoint)
      this.advance(batch.checkpoint)
    }
  }
}
