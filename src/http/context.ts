import type { Kysely } from 'kysely'
import type { Adapters } from '../adapters/runtime.js'
import type { BlobCollector } from '../blobs/blob-gc.js'
import type { BlobStore } from '../blobs/blob-store.js'
import type { TaskScheduler } from '../commands/scheduler.js'
import type { BenchmarkRunner } from '../commands/benchmarks.js'
import type { TrainingCoordinator } from '../commands/training.js'
import type { DeviceHub } from '../device-hub/hub.js'
import { type CommandOptions, type CommandResult, handleCommand, type KnownState } from '../commands/handle-command.js'
import type { Decider, DomainEvent } from '../domain/decider.js'
import type { PriceTable } from '../domain/pricing.js'
import type { EventStore, Position } from '../event-store/port.js'
import { ProjectionTimeoutError } from '../projections/runner.js'
import type { Projections } from '../projections/projections.js'
import type { StreamTickets } from './stream-tickets.js'

/** What the routes work with; built once by `buildApp` from its deps. */
export interface Services {
  store: EventStore
  projections: Projections
  db: Kysely<any>
  blobs: BlobStore
  /** Deletes the blobs nothing holds (run by a timer in `dcp start`, and by `POST /admin/blobs/gc`). */
  blobCollector: BlobCollector
  hub: DeviceHub
  scheduler: TaskScheduler
  training: TrainingCoordinator
  /** What compute costs, for estimated costs. */
  prices: PriceTable
  /** Pre- and post-processing adapters (in-process, or AWS Lambda). */
  adapters: Adapters
  limits: { maxModelBytes: number; maxQueuedInputs: number; maxQueuedBytes: number; maxQueuedBytesPerCustomer: number; minPerfDurationS: number; validationSpotRate: number; maxPageValues: number; maxStorageBytes: number }
  /** Live project streams: their tickets, the most one customer may hold open, how often each re-checks its key. */
  streams: { tickets: StreamTickets; maxPerCustomer: number; credentialCheckMs: number }
  /** Runs the dashboard's benchmarks. */
  benchmarks: BenchmarkRunner
  /** Marks a benchmark's own requests (they pass the rate limit); random per process, never leaves it. */
  loadToken: string
  /** The time, for commands (domain code has none of its own). */
  now(): Date
}

/**
 * Runs a command and waits until the read models include its events, so the response and any GET after it
 * see what was written (read-your-writes).
 */
export async function execute<C, E extends DomainEvent, S>(
  services: Services,
  streamId: string,
  decider: Decider<C, E, S>,
  command: C,
  options: CommandOptions & { known?: KnownState<S> } = {},
): Promise<CommandResult<E, S>> {
  const result = await handleCommand(services.store, streamId, decider, command, options)
  await readYourWrites(services, result.position)
  return result
}

/**
 * Waits until the read models include `position`. A read model that lags past the wait
 * does not fail the request: what was written is written; a read right after may just not show it yet.
 */
export async function readYourWrites(services: Services, position: Position): Promise<void> {
  try {
    await services.projections.waitFor(position, 10_000)
  } catch (error) {
    if (!(error instanceof ProjectionTimeoutError)) throw error
  }
}
