import { type Kysely, sql, type Transaction } from 'kysely'
import type { EventStore, Position, RecordedEvent, Subscription } from '../event-store/port.js'
import { matchesFilter, START } from '../event-store/port.js'
import { lockProjections, readCheckpoint, readCheckpoints, releaseLeadership, tryLeadership, tryLockProjection } from './checkpoints.js'
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
  /**
   * Least time from the start of one live batch to the read of the next while no read waits for the read
   * models (`waitFor`; a wait ends it at once). Default 100 ms. Under load every batch costs the same few
   * dozen statements and a commit, and writes the same rows again (checkpoints, devices, hourly usage),
   * whatever its size, and a task queued and finished within one batch is written once, not twice.
   */
  liveIntervalMs?: number
}

/**
 * Called when one projection of a set fails on events that the others apply: the set goes on without it
 * (its writer lock released), and the callee runs it on its own (retrying at the failing batch).
 */
export type DetachHandler = (projection: Projection, error: Error) => void

export class ProjectionTimeoutError extends Error {
  readonly code = 'PROJECTION_TIMEOUT'
  constructor(name: string, position: Position, reached: Position) {
    super(`projection ${name} did not reach position ${position} in time (it is at ${reached})`)
  }
}

/**
 * Keeps the live copies of a set of projections up to date with one reader and one transaction per batch:
 * becomes the one writer of every projection of the set (advisory locks on a connection of its own),
 * creates or rebuilds each copy that is missing or whose version changed, then follows the log from the
 * lowest checkpoint. Each batch of the log is read once; the events each projection handles are applied to
 * it, and every projection that got events moves its checkpoint, all in the same transaction. So the cost
 * of a batch (a read, a commit) is paid once for all read models, not once per read model.
 */
export class ProjectionRunner {
  state: RunnerState = 'starting'
  lastError: string | undefined
  projections: readonly Projection[]
  /** Below START until every live copy exists, so that waiting for START means waiting until they are ready. */
  private horizon: Position = START - 1n
  /** Each projection's checkpoint as this runner last wrote or read it. */
  private readonly checkpoints = new Map<string, Position>()
  /** Per projection, how many batches changed it since this runner went live. */
  private readonly changes = new Map<string, number>()
  private waiters = new Set<{ position: Position; resolve: () => void }>()
  private subscription: Subscription | undefined
  private running: Promise<void> | undefined
  private stopping = false
  private wake: (() => void) | undefined
  /** Ends the wait between two live batches (see `liveIntervalMs`). */
  private gathered: (() => void) | undefined

  private leaderConnection: Kysely<any> | undefined

  constructor(projections: Projection | readonly Projection[], private readonly deps: RunnerDeps, private readonly onDetach?: DetachHandler) {
    this.projections = Array.isArray(projections) ? projections : [projections as Projection]
    for (const projection of this.projections) checkProjectionName(projection.name)
  }

  /** Every event at or below this position has been applied (or was not for these projections). */
  get position(): Position {
    return this.horizon
  }

  /**
   * A number that moves whenever this runner changes the projection's live copy, while it is its writer
   * (live); undefined otherwise (another process may be changing it unseen). Caches of reads compare it.
   */
  generation(name: string): number | undefined {
    return this.state === 'live' ? (this.changes.get(name) ?? 0) : undefined
  }

  private get label(): string {
    return this.projections.length === 1 ? `projection ${this.projections[0]!.name}` : `projections (${this.projections.map((p) => p.name).join(', ')})`
  }

  start(): void {
    this.running ??= this.run()
  }

  async stop(): Promise<void> {
    this.stopping = true
    this.wake?.()
    this.gathered?.()
    await this.subscription?.close()
    await this.running
    this.state = 'stopped'
  }

  /** Resolves once every event up to `position` is in the read models. */
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
        reject(new ProjectionTimeoutError(this.projections.map((p) => p.name).join(', '), position, this.horizon))
      }, timeoutMs)
      this.waiters.add(waiter)
      this.gathered?.()
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
    await db.connection().execute(async (connection) => {
      this.leaderConnection = connection
      while (!this.stopping) {
        try {
          if (!(await this.lead(connection))) {
            this.state = 'standby'
            await this.followLeader()
            // soon again while a request waits for the read models (read-your-writes on this node)
            await this.pause(this.waiters.size > 0 ? Math.min(50, this.deps.retryMs ?? 1000) : undefined)
            continue
          }
          try {
            for (const projection of this.projections) await this.ensureLiveCopy(projection)
            await this.follow()
          } finally {
            await Promise.all(this.projections.map((p) => releaseLeadership(connection, p.name).catch(() => {})))
          }
        } catch (error) {
          if (this.stopping) break
          this.state = 'failed'
          this.lastError = (error as Error).message
          this.deps.log?.(`${this.label}: ${this.lastError}; retrying`)
          await this.pause()
        }
      }
    })
  }

  /** Takes the writer lock of every projection of the set, or none (another process is their writer). */
  private async lead(connection: Kysely<any>): Promise<boolean> {
    const taken: string[] = []
    for (const projection of this.projections) {
      if (await tryLeadership(connection, projection.name)) taken.push(projection.name)
      else break
    }
    if (taken.length === this.projections.length) return true
    await Promise.all(taken.map((name) => releaseLeadership(connection, name)))
    return false
  }

  /**
   * On standby another process writes the read models: what they hold is what its checkpoints say, so
   * `waitFor` here follows them (else every read-your-writes wait on this node ran to its timeout).
   */
  private async followLeader(): Promise<void> {
    const checkpoints = await readCheckpoints(this.deps.db, this.projections.map((p) => p.name))
    if (checkpoints.some((c, i) => c === undefined || c.version !== this.projections[i]!.version)) return // not built yet, or by another version
    this.advance(checkpoints.reduce((low, c) => (c!.position < low ? c!.position : low), checkpoints[0]!.position))
  }

  private pause(ms = this.deps.retryMs ?? 1000): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms)
      this.wake = () => {
        clearTimeout(timer)
        resolve()
      }
    })
  }

  /** Builds the live copy when there is none or it was built by another version of the projection. */
  private async ensureLiveCopy(projection: Projection): Promise<void> {
    const checkpoint = await readCheckpoint(this.deps.db, projection.name)
    const { rows } = await sql`select 1 from pg_namespace where nspname = ${liveSchema(projection.name)}`.execute(this.deps.db)
    if (checkpoint?.version === projection.version && rows.length > 0) return
    this.state = 'rebuilding'
    this.deps.log?.(`projection ${projection.name}: building version ${projection.version} from the log`)
    await rebuild(this.deps, projection)
  }

  private async follow(): Promise<void> {
    let from: Position | undefined
    for (const projection of this.projections) {
      const position = (await readCheckpoint(this.deps.db, projection.name))?.position ?? START
      this.checkpoints.set(projection.name, position)
      if (from === undefined || position < from) from = position
    }
    from ??= START
    this.advance(from)
    // After a failure it counts as live again only once a batch went through: a retry that fails again must
    // not show it live (with no error) in between.
    const live = () => {
      this.state = 'live'
      this.lastError = undefined
    }
    if (this.state !== 'failed') live()
    // One projection alone reads only what it handles; a set reads every event once.
    const filter = this.projections.length === 1 ? this.projections[0]!.filter : undefined
    const batchSize = this.deps.batchSize ?? 1000
    this.subscription = this.deps.store.subscribe({ from, ...(filter ? { filter } : {}), batchSize })
    if (this.stopping) await this.subscription.close()
    for await (const batch of this.subscription) {
      const started = performance.now()
      // Projections with nothing in a batch have their checkpoints moved along in the same transaction
      // (see applyTogether): one that never gets an event (no training on this platform) would otherwise
      // keep the whole set reading the log from the start after every restart.
      const work = this.projections
        .map((projection) => ({ projection, events: this.fresh(projection, batch.events) }))
      if (work.some((w) => w.events.length > 0)) {
        const moved = await this.applyBatch(work, batch.checkpoint)
        for (const { name, position, changed } of moved) {
          this.checkpoints.set(name, position)
          if (changed) this.changes.set(name, (this.changes.get(name) ?? 0) + 1)
        }
      }
      if (this.state === 'failed') live()
      this.advance(batch.checkpoint)
      // following the log live (not a full page of a catch-up): let the next batch gather a moment
      if (batch.events.length < batchSize) await this.gather(started)
    }
  }

  /** Waits until `liveIntervalMs` after `started`, unless a read waits for the read models or the runner stops. */
  private gather(started: number): Promise<void> {
    const left = started + (this.deps.liveIntervalMs ?? 100) - performance.now()
    if (left <= 0 || this.waiters.size > 0 || this.stopping) return Promise.resolve()
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer)
        this.gathered = undefined
        resolve()
      }
      const timer = setTimeout(done, left)
      this.gathered = done
    })
  }

  /**
   * Applies a batch in one transaction. When that fails for a reason of the data (not the connection), each
   * projection is tried alone: one that fails alone is detached (when some other one succeeds and there is
   * a handler), so a bad event or a bug in one read model does not stop the others.
   */
  private async applyBatch(work: { projection: Projection; events: RecordedEvent[] }[], checkpoint: Position) {
    const inOne = (part: typeof work) => this.deps.db.transaction().execute((trx) => this.applyTogether(trx, part, checkpoint))
    try {
      return await inOne(work)
    } catch (error) {
      if (!this.onDetach || this.projections.length < 2 || transient(error)) throw error
      const moved: Awaited<ReturnType<typeof inOne>> = []
      const failed: { projection: Projection; error: Error }[] = []
      for (const part of work.filter((w) => w.events.length > 0)) {
        try {
          moved.push(...(await inOne([part])))
        } catch (alone) {
          if (transient(alone)) throw alone
          failed.push({ projection: part.projection, error: alone as Error })
        }
      }
      if (moved.length === 0) throw error // every one: nothing to tell them apart
      for (const { projection, error: cause } of failed) await this.detach(projection, cause)
      return moved
    }
  }

  private async detach(projection: Projection, error: Error): Promise<void> {
    this.projections = this.projections.filter((p) => p !== projection)
    this.checkpoints.delete(projection.name)
    if (this.leaderConnection) await releaseLeadership(this.leaderConnection, projection.name).catch(() => {})
    this.deps.log?.(`projection ${projection.name}: ${error.message}; it goes on alone, retrying that batch`)
    this.onDetach!(projection, error)
  }

  /** The events of a batch that this projection handles and has not applied yet (as far as this runner knows). */
  private fresh(projection: Projection, events: readonly RecordedEvent[]): RecordedEvent[] {
    const after = this.checkpoints.get(projection.name) ?? START
    return events.filter((e) => e.position > after && matchesFilter(e, projection.filter))
  }

  /**
   * One transaction for the batch: the batch locks of the projections that have events (a rebuild or an
   * audit of one of them waits, or is waited for), their stored checkpoints read again under the locks (a
   * rebuild may have swapped a copy in that is ahead), each one's new events applied in its own schema, and
   * their checkpoints moved in one statement. The checkpoints of the projections with nothing in the batch
   * move too, each only when its lock is free at once (an audit or a rebuild of a read model that has
   * nothing to do with this batch never holds the others up; its checkpoint moves with a later batch).
   */
  private async applyTogether(trx: Transaction<any>, work: { projection: Projection; events: RecordedEvent[] }[], checkpoint: Position) {
    const busy = work.filter((w) => w.events.length > 0).map((w) => w.projection.name)
    const idle = work.filter((w) => w.events.length === 0).map((w) => w.projection.name)
    await lockProjections(trx, busy)
    const { rows } = await sql<{ name: string; position: string | null }>`
      with idle as materialized (select n from unnest(${idle}::text[]) n where ${tryLockProjection(sql.ref('n'))})
      select u.n as name, c.position from (select unnest(${busy}::text[]) union all select n from idle) u(n)
      left join public.projection_checkpoints c on c.name = u.n`.execute(trx)
    const stored = new Map(rows.map((r) => [r.name, r.position === null ? START : BigInt(r.position)]))
    const next: { name: string; position: Position; version: number; changed: boolean }[] = []
    for (const { projection, events } of work) {
      const current = stored.get(projection.name)
      if (current === undefined) continue // idle, and its lock is held elsewhere
      const fresh = events.filter((e) => e.position > current)
      if (fresh.length > 0) {
        await sql`set local search_path to ${sql.id(liveSchema(projection.name))}, public`.execute(trx)
        await projection.apply(trx, fresh)
      }
      next.push({ name: projection.name, position: checkpoint > current ? checkpoint : current, version: projection.version, changed: fresh.length > 0 })
    }
    await sql`
      insert into public.projection_checkpoints (name, position, version)
      select * from unnest(${next.map((n) => n.name)}::text[], ${next.map((n) => n.position.toString())}::bigint[], ${next.map((n) => n.version)}::int[])
      on conflict (name) do update set position = excluded.position, version = excluded.version, updated_at = now()`.execute(trx)
    return next
  }
}

/** An error of the connection or the server's state (retry the same batch), not of the events or the code. */
function transient(error: unknown): boolean {
  const code = (error as { code?: unknown }).code
  if (typeof code !== 'string') return error instanceof Error && /connect|terminat|timeout|ECONN/i.test(error.message)
  return /^(08|53|57|58|40)/.test(code) || code.startsWith('E')
}
