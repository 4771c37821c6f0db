import type { Position } from '../event-store/port.js'
import { START } from '../event-store/port.js'
import { readCheckpoint } from './checkpoints.js'
import { customersProjection } from './customers.js'
import { eventCounts } from './event-counts.js'
import { devicesProjection } from './devices.js'
import { inferenceProjection } from './inference.js'
import { modelsProjection } from './models.js'
import { projectsProjection } from './projects.js'
import { tasksProjection } from './tasks.js'
import { usageProjection } from './usage.js'
import { trainingProjection } from './training.js'
import { datasetsProjection } from './datasets.js'
import { benchmarksProjection } from './benchmarks.js'
import { reputationProjection } from './reputation.js'
import { enrollmentTokensProjection } from './enrollment-tokens.js'
import type { Projection } from './projection.js'
import { type AuditReport, audit, rebuild } from './replay.js'
import { auditUsage, type UsageAuditOptions, type UsageAuditReport } from './usage-audit.js'
import { ProjectionRunner, type RunnerDeps, type RunnerState } from './runner.js'

const LAG_COUNT_LIMIT = 10_000
/** A cached read is used at most this long, even when nothing says its read model changed. */
const CACHE_TTL_MS = 5_000
const CACHE_MAX_ENTRIES = 10_000

/** Every projection of dcp. A new read model is added here. */
export const allProjections: readonly Projection[] = [eventCounts, customersProjection, modelsProjection, devicesProjection, tasksProjection, inferenceProjection, projectsProjection, usageProjection, trainingProjection, datasetsProjection, benchmarksProjection, reputationProjection, enrollmentTokensProjection]

export interface ProjectionStatus {
  name: string
  version: number
  /** How far the read model has applied the log (null before the first build). */
  checkpoint: string | null
  /** The stored version, which differs from `version` until the next start rebuilds it. */
  storedVersion: number | null
  head: string
  /** Events in the log after the checkpoint (any type), counted up to 10,000. */
  lag: number
  /** This process's runner, when it runs one. */
  state: RunnerState | 'not running'
  lastError?: string
}

export class UnknownProjectionError extends Error {
  readonly code = 'UNKNOWN_PROJECTION'
  constructor(name: string, known: readonly Projection[]) {
    super(`unknown projection ${JSON.stringify(name)}; known: ${known.map((p) => p.name).join(', ')}`)
  }
}

/** The projection of that name among dcp's own, or an UnknownProjectionError. */
export function knownProjection(name: string, list: readonly Projection[] = allProjections): Projection {
  const projection = list.find((p) => p.name === name)
  if (!projection) throw new UnknownProjectionError(name, list)
  return projection
}

/** The projections of one process: runs them (one runner, one reader, one transaction per batch for all), answers read-your-writes waits, rebuilds, audits. */
export class Projections {
  private runner: ProjectionRunner | undefined
  /** Projections that failed where the others did not, each followed by a runner of its own. */
  private readonly detached = new Map<string, ProjectionRunner>()
  private readonly caches = new Map<string, Map<string, { generation: number; at: number; value: Promise<unknown> }>>()

  constructor(private readonly deps: RunnerDeps, readonly list: readonly Projection[] = allProjections) {}

  get(name: string): Projection {
    return knownProjection(name, this.list)
  }

  start(): void {
    if (this.runner) return
    this.caches.clear() // remembered under an earlier runner, whose generations a new one does not continue
    this.runner = new ProjectionRunner(this.list, this.deps, (projection) => {
      const alone = new ProjectionRunner(projection, this.deps)
      this.detached.set(projection.name, alone)
      alone.start()
    })
    this.runner.start()
  }

  async stop(): Promise<void> {
    await this.runner?.stop()
    await Promise.all([...this.detached.values()].map((r) => r.stop()))
    this.runner = undefined
    this.detached.clear()
  }

  /** The runner that keeps this projection (the shared one, or its own after a failure of its own). */
  private runnerOf(name: string): ProjectionRunner | undefined {
    return this.detached.get(name) ?? this.runner
  }

  /** Read-your-writes: resolves once the running projections (they move together) have applied the log up to `position`. */
  async waitFor(position: Position, timeoutMs = 10_000): Promise<void> {
    await this.runner?.waitFor(position, timeoutMs)
  }

  /**
   * A read of one read model, remembered until that read model changes: while this process is its writer,
   * every batch it applies to it drops what was remembered, so a read after a write sees the write (with
   * read-your-writes). Without a live runner here, nothing is remembered. Hot reads on every request (the
   * caller's credential, the model it names) cost no query this way.
   */
  cached<V>(name: string, key: string, load: () => Promise<V>): Promise<V> {
    const generation = this.runnerOf(name)?.generation(name)
    if (generation === undefined) return load()
    let cache = this.caches.get(name)
    if (!cache) this.caches.set(name, (cache = new Map()))
    const now = Date.now()
    const hit = cache.get(key)
    if (hit && hit.generation === generation && now - hit.at < CACHE_TTL_MS) return hit.value as Promise<V>
    if (cache.size >= CACHE_MAX_ENTRIES) cache.clear()
    const value = load()
    cache.set(key, { generation, at: now, value })
    value.catch(() => {
      if (cache.get(key)?.value === value) cache.delete(key) // a failed read is not remembered
    })
    return value
  }

  rebuild(name: string): Promise<Position> {
    return rebuild(this.deps, this.get(name))
  }

  audit(name: string): Promise<AuditReport> {
    return audit(this.deps, this.get(name))
  }

  /** The billing audit (usage-audit.ts). */
  auditUsage(options: UsageAuditOptions = {}): Promise<UsageAuditReport> {
    return auditUsage(this.deps, options)
  }

  async status(): Promise<ProjectionStatus[]> {
    const head = await this.deps.store.headPosition()
    // Read models kept by one runner share its position: their lag is counted once, not once each.
    const lags = new Map<Position, Promise<number>>()
    const lagAfter = (position: Position) => {
      let lag = lags.get(position)
      if (!lag) lags.set(position, (lag = this.deps.store.readAll(position, LAG_COUNT_LIMIT).then((events) => events.length)))
      return lag
    }
    return Promise.all(
      this.list.map(async (projection) => {
        const checkpoint = await readCheckpoint(this.deps.db, projection.name)
        const runner = this.runnerOf(projection.name)
        // A running runner knows how far it has scanned; the stored checkpoint moves only when a batch is written.
        const position = runner && checkpoint && runner.position > checkpoint.position ? runner.position : checkpoint?.position
        const lag = await lagAfter(position ?? START)
        return {
          name: projection.name,
          version: projection.version,
          checkpoint: position !== undefined ? position.toString() : null,
          storedVersion: checkpoint?.version ?? null,
          head: head.toString(),
          lag,
          state: runner?.state ?? 'not running',
          ...(runner?.lastError ? { lastError: runner.lastError } : {}),
        }
      }),
    )
  }
}

