import type { z } from 'zod'
import type { Kysely } from 'kysely'
import { DomainError } from '../domain/errors.js'
import type { BlobStore } from '../blobs/blob-store.js'
import { inputCount, type LeaseGrant, type QueuedSpec, type Share, type TaskCommand, taskDecider, type TaskEvent, type TaskSpec, type TaskState, type TaskValidated, taskStream } from '../domain/task.js'
import type { Observed } from '../domain/metering.js'
import { emptyReputation, NO_VALIDATION, quarantineReason, type Reputation } from '../domain/validation.js'
import { type EventStore, type Position, START } from '../event-store/port.js'
import { newEventId } from '../event-store/event-id.js'
import { type CancelTask, MAX_HEARTBEAT_LEASES, type Metrics, type TaskAssignment, type TaskResult, type Tensor } from '../protocol/frames.js'
import { openTasks } from '../projections/tasks.js'
import { handleCommand, type KnownState, startStreams, type StreamStart } from './handle-command.js'
import { InputsUnavailableError, storeInputs, TASK_INPUTS_DEFAULTS, withInputs } from './task-inputs.js'
import { storeOutputs } from './task-outputs.js'

type CancelTaskFrame = z.infer<typeof CancelTask>
type TaskResultFrame = z.infer<typeof TaskResult>

/** What `submit` takes: a task spec whose optional parts default (attempts: the scheduler's). */
export type NewTask = Omit<TaskSpec, 'max_attempts' | 'project_id' | 'output_shape' | 'instance_type' | 'validation' | 'batching'> & Partial<Pick<TaskSpec, 'max_attempts' | 'project_id' | 'output_shape' | 'instance_type' | 'validation' | 'batching'>>

/** Why a result does not fit its task (one output per input, each filling the declared shape), or undefined. */
export function outputProblem(spec: QueuedSpec, outputs: readonly Tensor[]): string | undefined {
  if (outputs.length !== inputCount(spec)) return `the device returned ${outputs.length} outputs for ${inputCount(spec)} inputs`
  for (const [i, output] of outputs.entries()) {
    const size = output.shape.reduce((a, b) => a * b, 1)
    if (size !== output.data.length) return `output ${i}: ${output.data.length} values do not fill its shape ${JSON.stringify(output.shape)}`
    const declared = spec.output_shape
    if (declared && (declared.length !== output.shape.length || declared.some((d, j) => d !== -1 && d !== output.shape[j]))) {
      return `output ${i}: shape ${JSON.stringify(output.shape)} does not match the model's declared output shape ${JSON.stringify(declared)}`
    }
  }
  return undefined
}

/**
 * Device tasks of mergeable work a device holds beyond the ones it runs (at most what `prefetch` allows):
 * one, formed while it runs the others, so it never waits for the next; the rest wait in the queue and are
 * merged when a slot frees.
 */
export const MERGED_PREFETCH = 1

/** The most input values a merged device task carries: as many as one request may send (POST /inference). */
export const MAX_MERGED_VALUES = 1_000_000

/** What the queue may hold: inputs, and bytes of input values (4 a value) in all and per customer. */
export interface QueueLimits {
  inputs: number
  bytes: number
  bytesPerCustomer: number
}

/** Bytes of tensors' values as float32. */
export function tensorBytes(tensors: readonly { data: readonly number[] }[]): number {
  let values = 0
  for (const t of tensors) values += t.data.length
  return values * 4
}

/** A size for a message: bytes, KiB or MiB. */
const size = (bytes: number) => (bytes < 1024 ? `${bytes} B` : bytes < 1024 ** 2 ? `${Math.round(bytes / 102.4) / 10} KiB` : `${Math.round(bytes / 1024 / 102.4) / 10} MiB`)

function addTo(map: Map<string, number>, key: string, n: number): void {
  const next = (map.get(key) ?? 0) + n
  if (next === 0) map.delete(key)
  else map.set(key, next)
}

/** A connected device as the scheduler sees it. */
export interface DeviceSlot {
  deviceId: string
  formats: readonly string[]
  gpu: boolean
  maxConcurrent: number
  /** Most inputs it takes in one task. */
  maxBatchInputs: number
  /** Its SDK installation and kind (usage is billed by them). */
  sdkUuid: string
  instanceType: 'aws' | 'user'
  /** Lease ids it holds. */
  leases: Set<string>
  draining: boolean
  /** Quarantined or otherwise held back by the platform: connected, but given no work until released. */
  quarantined?: boolean
  /** Who runs it (its enrollment token, or the device itself): replicas go to another contributor. */
  contributor?: string
  /** Cores and GPUs it declared: billed compute is at most the observed wall time times these. */
  cpuCores?: number
  gpuCount?: number
  /** The training job it is working for: it takes no inference tasks meanwhile. */
  training?: string
  /** Last reported load, 0..1. */
  load: number
  /** Hands a frame to the device; false when its socket is gone. */
  send(frame: TaskAssignment | CancelTaskFrame): boolean
}

/** A task carried by a device task: its inputs are `count` of the device task's, from `offset`; `index`: its place in the dispatch. */
interface Part {
  taskId: string
  index: number
  offset: number
  count: number
}

/**
 * One device task under one lease id: one queued task, or several merged by the dynamic batcher (each of
 * them recorded as leased under this lease id, with its place in the unit).
 */
interface Lease {
  leaseId: string
  /** The id the device knows the work by: the task's own id, or for merged tasks the unit's. */
  unitId: string
  /** The tasks it carries that are still open under it (a cancelled one leaves; the others go on). */
  parts: Part[]
  /** Inputs of each task as dispatched, in order: a part's share of the measured compute is split by these. */
  sizes: number[]
  deviceId: string
  /** The device's SDK installation and kind when it was granted (what the attempt is billed by). */
  sdkUuid: string | null
  instanceType: 'aws' | 'user' | null
  /** When it was granted. */
  grantedAt: string
  /**
   * Tasks whose lease is not in the log yet: a synchronous request's task is leased in memory only and its
   * TaskLeased is appended with its outcome, in the same append (one commit fewer on the request's path; a
   * restart meanwhile finds it queued, and runs it again: the device's late result is refused).
   */
  deferred: Set<string>
  modelId: string
  deadline: number
  /** No heartbeat extends the lease past this (a device cannot hold a task forever by heartbeating). */
  expiresAt: number
  /** When the task was sent to the device (granted, for a lease recovered after a restart): metering's bound. */
  sentAt: number
}

export type TaskOutcome =
  | { status: 'completed'; taskId: string; deviceId: string; outputs: Tensor[]; metrics: Metrics; position: Position }
  | { status: 'failed'; taskId: string; reason: string; position: Position }
  | { status: 'cancelled'; taskId: string; position: Position }

export interface SchedulerOptions {
  store: EventStore
  db: Kysely<any>
  /**
   * Where inputs too large for their event go (src/commands/task-inputs.ts), and where `recover` reads them
   * back. Without it every task's inputs stay in its TaskQueued.
   */
  blobs?: BlobStore
  /**
   * Inputs whose JSON is larger than this go to `blobs`, their TaskQueued carrying a reference; so do a
   * result's outputs, their TaskCompleted carrying one (src/commands/task-outputs.ts). Default 64 KiB.
   */
  inlineInputsMaxBytes?: number
  /** A lease ends this long after it was granted or last listed in a heartbeat. Default 30 s. */
  leaseTimeoutMs?: number
  /** Attempts before a task fails for good. Default 3. */
  maxAttempts?: number
  /** Longest a lease lives whatever the heartbeats; then the task goes elsewhere. Default 10 × leaseTimeoutMs. */
  maxLeaseMs?: number
  /** Takes a device out of the work (reputation past its threshold: src/domain/validation.ts). */
  quarantine?: (deviceId: string, reason: string) => Promise<void>
  /** Reputation so far (folded from the log by the reputation read model), loaded by `recover`. */
  reputations?: () => Promise<Map<string, Reputation>>
  /**
   * Tasks a device may hold per task it runs at once (its `max_concurrent_tasks`): the ones beyond wait on
   * the device, so that it starts the next as soon as one ends instead of waiting for the next lease to be
   * recorded and sent. 1 leases only what it runs. Default 4 (Celery's prefetch multiplier).
   */
  prefetch?: number
  now?: () => Date
  log?: (message: string) => void
}

/**
 * Task leases, one mechanism for every kind of work: queued tasks go to a capable device (its format, a GPU
 * first when asked, least loaded first) under a lease id and a deadline that heartbeats extend. A result is
 * accepted only under the current lease (fencing). A lost device or an expired lease puts the task back in
 * the queue until its attempts run out. After a restart, `recover` rebuilds the queue and the leases from
 * the tasks read model (leases get a fresh deadline: their devices have that long to come back and list
 * them in a heartbeat).
 */
export class TaskScheduler {
  private readonly queue: TaskSpec[] = []
  private waitingInputs = 0
  /** Bytes of the queued inputs (4 a value, as float32 on the wire), in all and per customer; and of submissions in progress. */
  private waitingBytes = 0
  private readonly bytesByCustomer = new Map<string, number>()
  private admittingBytes = 0
  private readonly admittingByCustomer = new Map<string, number>()
  private readonly specs = new Map<string, TaskSpec>()
  /**
   * Per queued task that may be merged with others (dynamic batching): its merge key and since when it
   * waits (0: it was queued again after an attempt, and is never held back); per key, how many wait.
   */
  private readonly mergeable = new Map<string, { key: string; since: number }>()
  private readonly mergeableByKey = new Map<string, number>()
  /** When dispatch runs again for work held back by a `max_queue_delay_ms`. */
  private holdTimer: { at: number; timer: NodeJS.Timeout } | undefined
  private readonly sent = { deviceTasks: 0, tasks: 0 }
  /** The state and revision of each open task's stream, as this scheduler (its one writer) last wrote it. */
  private readonly known = new Map<string, KnownState<TaskState>>()
  private readonly leases = new Map<string, Lease>()
  private readonly devices = new Map<string, DeviceSlot>()
  /** Per device that connected holding leases from before, those leases (in grant order) until its first heartbeat. */
  private readonly inherited = new Map<string, string[]>()
  /** Who waits for each task's outcome (a map of sets: an EventEmitter keyed by task id churns its listener object). */
  private readonly outcomes = new Map<string, Set<(outcome: TaskOutcome) => void>>()
  /** Whoever waits for an outcome, to be answered at `stop`. */
  private readonly waiting = new Set<() => void>()
  private stopped = false
  /** Inputs of submissions in progress (see admit). */
  private admitting = 0
  private dispatching: Promise<void> | undefined
  private again = false
  private sweeper: NodeJS.Timeout | undefined
  readonly leaseTimeoutMs: number
  readonly maxLeaseMs: number
  readonly maxAttempts: number
  /** Each device's contributor (replicas go to another), kept after it disconnects. */
  private readonly contributors = new Map<string, string>()
  /** Each device's validated and disputed results and failures of tasks that succeeded elsewhere. */
  private readonly reputation = new Map<string, Reputation>()
  readonly prefetch: number
  readonly inlineInputsMaxBytes: number
  private readonly now: () => Date

  constructor(private readonly options: SchedulerOptions) {
    this.leaseTimeoutMs = options.leaseTimeoutMs ?? 30_000
    this.maxLeaseMs = options.maxLeaseMs ?? 10 * this.leaseTimeoutMs
    this.maxAttempts = options.maxAttempts ?? 3
    this.prefetch = options.prefetch ?? 4
    this.inlineInputsMaxBytes = options.inlineInputsMaxBytes ?? TASK_INPUTS_DEFAULTS.inlineMaxBytes
    if (!Number.isInteger(this.prefetch) || this.prefetch < 1) throw new RangeError('prefetch must be a whole number of 1 or more')
    this.now = options.now ?? (() => new Date())
  }

  /** Loads queued and leased tasks from the read model and starts the lease sweeper. */
  async recover(): Promise<void> {
    const recovered = new Map<string, { lease: Lease; leasedAt: Position }>()
    for (const [deviceId, reputation] of (await this.options.reputations?.()) ?? []) this.reputation.set(deviceId, reputation)
    for (const open of await openTasks(this.options.db)) {
      const { state, revision, leasedAt, leasedTime, unit } = await this.fold(open.task_id)
      if (!state.spec) continue
      this.known.set(open.task_id, { state, revision })
      const spec = await this.readInputs(state.spec)
      if (!spec) continue
      this.specs.set(open.task_id, spec)
      if (state.status === 'queued') this.enqueue(spec)
      else if (state.status === 'leased' && state.lease) {
        // the tasks of a merged device task share its lease: one lease again, its open parts in their places
        const now = Date.now()
        const sizes = unit?.sizes ?? [spec.inputs.length]
        const index = unit?.index ?? 0
        const part = { taskId: open.task_id, index, offset: sizes.slice(0, index).reduce((a, b) => a + b, 0), count: sizes[index]! }
        const known = recovered.get(state.lease.id)
        if (known) known.lease.parts.push(part)
        else {
          const lease: Lease = {
            leaseId: state.lease.id, unitId: unit?.id ?? open.task_id, parts: [part], sizes, deviceId: state.lease.deviceId, sdkUuid: state.lease.sdkUuid, instanceType: state.lease.instanceType,
            grantedAt: new Date(leasedTime ?? now).toISOString(), deferred: new Set(), modelId: spec.model.id, deadline: now + this.leaseTimeoutMs, expiresAt: now + this.maxLeaseMs, sentAt: leasedTime ?? now,
          }
          recovered.set(lease.leaseId, { lease, leasedAt: leasedAt ?? START })
        }
      }
    }
    // in the order they were granted: a device that comes back holds them in that order (see deviceLost)
    const granted = [...recovered.values()].sort((a, b) => (a.leasedAt < b.leasedAt ? -1 : a.leasedAt > b.leasedAt ? 1 : 0))
    for (const { lease } of granted) {
      lease.parts.sort((a, b) => a.index - b.index)
      this.leases.set(lease.leaseId, lease)
    }
    this.sweeper = setInterval(() => void this.sweep(), Math.min(1000, this.leaseTimeoutMs / 4))
    this.sweeper.unref()
    this.kick()
  }

  /**
   * The task with its inputs, read back from their blob if they are in one. A blob that is gone or damaged
   * fails the task for good (recorded, with the reason): no device could ever run it.
   */
  private async readInputs(queued: QueuedSpec): Promise<TaskSpec | undefined> {
    try {
      return await withInputs(this.options.blobs, queued)
    } catch (error) {
      if (!(error instanceof InputsUnavailableError)) throw error
      const reason = `task ${queued.task_id} cannot run after a restart: ${error.message}`
      this.options.log?.(reason)
      await this.command(queued.task_id, { type: 'FailTask', reason, at: this.now().toISOString() }, queued.customer_id)
      return undefined
    }
  }

  /**
   * Stops the sweeper and answers everyone still waiting for an outcome with SERVICE_UNAVAILABLE: the server
   * is shutting down, and a sync request must not hold the shutdown up for its timeout. Their tasks stay
   * in the log, queued or leased, and run after the restart (`recover`).
   */
  stop(): void {
    if (this.sweeper) clearInterval(this.sweeper)
    if (this.holdTimer) clearTimeout(this.holdTimer.timer)
    this.stopped = true
    for (const abandon of [...this.waiting]) abandon()
  }

  get queued(): number {
    return this.queue.length
  }

  /** Inputs waiting in the queue (a task of a batch carries several). */
  get queuedInputs(): number {
    return this.waitingInputs
  }

  /**
   * Holds room in the queue for inputs about to be submitted, or refuses them with QUEUE_FULL when the queue
   * and the submissions in progress would hold more than `limit`. Checked and held at once: requests that
   * arrive together cannot all pass one check. Call the function it returns once they are submitted (they
   * are counted in the queue then) or were not.
   */
  admit(request: { inputs: number; bytes: number; customerId: string }, limits: QueueLimits): () => void {
    const waiting = this.waitingInputs + this.admitting
    if (waiting + request.inputs > limits.inputs) throw new DomainError('QUEUE_FULL', `${waiting} inputs are waiting for a device and the queue holds at most ${limits.inputs}; retry later`)
    const bytes = this.waitingBytes + this.admittingBytes
    if (bytes + request.bytes > limits.bytes) throw new DomainError('QUEUE_FULL', `${size(bytes)} of inputs are waiting for a device and the queue holds at most ${size(limits.bytes)}; retry later`)
    const own = (this.bytesByCustomer.get(request.customerId) ?? 0) + (this.admittingByCustomer.get(request.customerId) ?? 0)
    if (own + request.bytes > limits.bytesPerCustomer) {
      throw new DomainError('QUEUE_FULL', `${size(own)} of your inputs are waiting for a device and a customer may queue at most ${size(limits.bytesPerCustomer)}; retry later`)
    }
    this.admitting += request.inputs
    this.admittingBytes += request.bytes
    addTo(this.admittingByCustomer, request.customerId, request.bytes)
    let held = true
    return () => {
      if (!held) return
      held = false
      this.admitting -= request.inputs
      this.admittingBytes -= request.bytes
      addTo(this.admittingByCustomer, request.customerId, -request.bytes)
    }
  }

  private enqueue(spec: TaskSpec, front = false): void {
    if (front) this.queue.unshift(spec)
    else this.queue.push(spec)
    this.counted(spec, 1)
    const key = this.mergeKey(spec)
    if (key === undefined) return
    this.mergeable.set(spec.task_id, { key, since: front ? 0 : Date.now() })
    addTo(this.mergeableByKey, key, 1)
  }

  /** May the task be merged with others (see mergeKey)? */
  private mayMerge(spec: TaskSpec): boolean {
    if (!spec.batching || spec.batching.max_batch_size < 2 || spec.inputs.length !== 1 || spec.validation.mode !== 'none') return false
    const state = this.known.get(spec.task_id)?.state
    return !(state && state.held.length > 0)
  }

  /**
   * What a queued task must share with others to be merged with them into one device task: the model
   * version, customer, input name and shape, placement, and the devices it failed on (fault isolation picks
   * the device by them); only single-input tasks of a model that batches, without validation (replicas have
   * device rules of their own). Undefined: it is dispatched alone.
   */
  private mergeKey(spec: TaskSpec): string | undefined {
    if (!this.mayMerge(spec)) return undefined
    const state = this.known.get(spec.task_id)?.state
    // tasks that failed on the same devices share the device rules of fault isolation (pickDevice)
    const failedOn = state ? [...new Set(state.failedOn)].sort() : []
    return JSON.stringify([spec.customer_id, spec.model.id, spec.model.checksum, spec.input_name ?? null, spec.inputs[0]!.shape, spec.output_shape, spec.prefer_gpu, spec.instance_type, failedOn])
  }

  private dequeueAt(index: number): void {
    const [spec] = this.queue.splice(index, 1)
    if (spec) this.counted(spec, -1)
  }

  /** Counts a task into (1) or out of (-1) the queue's inputs and bytes, in all and for its customer. */
  private counted(spec: TaskSpec, sign: 1 | -1): void {
    const bytes = tensorBytes(spec.inputs)
    this.waitingInputs += sign * spec.inputs.length
    this.waitingBytes += sign * bytes
    addTo(this.bytesByCustomer, spec.customer_id, sign * bytes)
    if (sign > 0) return
    const merge = this.mergeable.get(spec.task_id)
    if (!merge) return
    this.mergeable.delete(spec.task_id)
    addTo(this.mergeableByKey, merge.key, -1)
  }

  get leased(): number {
    return this.leases.size
  }

  /** Device tasks sent since this scheduler started, and the tasks they carried. */
  get dispatched(): { deviceTasks: number; tasks: number } {
    return { ...this.sent }
  }

  /** Queues one task; see `submitAll`. */
  submit(task: NewTask, metadata: { customerId: string }): Promise<Position> {
    return this.submitAll([task], metadata)
  }

  /**
   * Queues tasks (`max_attempts` defaults to the scheduler's), recorded all or nothing together with the
   * other new streams given (`alongside`: the job they belong to; `appendAll`: one transaction on Postgres,
   * a recorded intent that recovery completes on EventStoreDB), so a crash never leaves a job with half
   * its tasks for good. While nothing waits in the queue, a task that a capable device has room for now is
   * queued and leased in the same append and goes straight to that device; the others wait in the queue.
   * Resolves with the position of the last event written.
   */
  async submitAll(tasks: readonly NewTask[], metadata: { customerId: string }, alongside: readonly StreamStart[] = []): Promise<Position> {
    // 1. inputs too large for their event go to the blob store first: the event that names them never comes without them
    const blobs = await Promise.all(tasks.map((task) => storeInputs(this.options.blobs, task.inputs, this.inlineInputsMaxBytes)))
    const at = this.now().toISOString()
    const planned = tasks.map((task, i) => {
      const spec: TaskSpec = { ...task, project_id: task.project_id ?? null, output_shape: task.output_shape ?? null, instance_type: task.instance_type ?? null, max_attempts: task.max_attempts ?? this.maxAttempts, validation: task.validation ?? NO_VALIDATION, batching: task.batching ?? null }
      const { inputs, ...rest } = spec
      const blob = blobs[i]
      const queued: QueuedSpec = blob ? { ...rest, inputs_blob: blob } : spec
      // a model that holds work back for company (max_queue_delay_ms) queues it even with a device free
      const device = this.queue.length === 0 && !spec.batching?.max_queue_delay_ms ? this.pickDevice(spec) : undefined
      return { spec, queued, device, lease: device && this.reserve([spec], device) }
    })
    let results
    try {
      results = await startStreams(this.options.store, [
        ...alongside,
        ...planned.map(({ spec, queued, lease }) => ({
          streamId: taskStream(spec.task_id),
          decider: taskDecider,
          command: { type: 'QueueTask', task: queued, at, ...(lease ? { lease: grantOf(lease, 0) } : {}) } satisfies TaskCommand,
          metadata: { customerId: metadata.customerId, occurredAt: at },
        })),
      ])
    } catch (error) {
      for (const { lease } of planned) if (lease) this.release(lease)
      throw error
    }
    const deliveries: Promise<void>[] = []
    planned.forEach(({ spec, device, lease }, i) => {
      const result = results[alongside.length + i]!
      this.known.set(spec.task_id, { state: result.state as TaskState, revision: result.nextRevision })
      this.specs.set(spec.task_id, spec)
      if (lease && device) deliveries.push(this.deliver([spec], device, lease))
      else this.enqueue(spec)
    })
    this.kick()
    await Promise.all(deliveries)
    return results.reduce((last, r) => (r.position > last ? r.position : last), START)
  }

  /**
   * Resolves with the task's outcome (completed, failed for good, or cancelled). `stop` ends the wait at
   * once (e.g. the task's submission failed: no outcome will come), rejecting with its reason.
   */
  outcome(taskId: string, timeoutMs: number, stop?: AbortSignal): Promise<TaskOutcome> {
    return new Promise((resolve, reject) => {
      const end = (error?: Error, outcome?: TaskOutcome) => {
        clearTimeout(timer)
        const waiters = this.outcomes.get(taskId)
        if (waiters?.delete(done) && waiters.size === 0) this.outcomes.delete(taskId)
        this.waiting.delete(abandon)
        stop?.removeEventListener('abort', stopped)
        if (error) reject(error)
        else resolve(outcome!)
      }
      const stopped = () => end(stop?.reason instanceof Error ? stop.reason : new Error('the wait was stopped'))
      stop?.addEventListener('abort', stopped)
      const done = (outcome: TaskOutcome) => end(undefined, outcome)
      const abandon = () => end(new DomainError('SERVICE_UNAVAILABLE', `the server is shutting down before task ${taskId} finished`))
      const timer = setTimeout(() => end(new DomainError('TIMEOUT', `task ${taskId} did not finish within ${timeoutMs} ms`)), timeoutMs)
      const waiters = this.outcomes.get(taskId)
      if (waiters) waiters.add(done)
      else this.outcomes.set(taskId, new Set([done]))
      this.waiting.add(abandon)
      if (this.stopped) abandon()
      else if (stop?.aborted) stopped()
    })
  }

  /** Answers everyone waiting for the task's outcome. */
  private settle(taskId: string, outcome: TaskOutcome): void {
    const waiters = this.outcomes.get(taskId)
    if (!waiters) return
    this.outcomes.delete(taskId)
    for (const waiter of waiters) waiter(outcome)
  }

  deviceConnected(slot: DeviceSlot): void {
    this.devices.set(slot.deviceId, slot)
    this.contributors.set(slot.deviceId, slot.contributor ?? slot.deviceId)
    // past the threshold, but its quarantine was not recorded (a crash between the verdict and the record):
    // record it now; one the hub recorded comes back marked already
    const reason = quarantineReason(this.reputation.get(slot.deviceId) ?? emptyReputation())
    if (reason && !slot.quarantined) {
      slot.quarantined = true
      void this.quarantineDevice(slot.deviceId, reason)
    }
    // Leases it held before a restart or a reconnect are its again, until its first heartbeat says which
    // of them it still has (see heartbeat).
    for (const lease of this.leases.values()) if (lease.deviceId === slot.deviceId) slot.leases.add(lease.leaseId)
    if (slot.leases.size > 0) this.inherited.set(slot.deviceId, [...slot.leases])
    else this.inherited.delete(slot.deviceId)
    this.kick()
  }

  /** The device works for a training job (no inference meanwhile), or is free again (undefined). */
  setTraining(deviceId: string, jobId: string | undefined): void {
    const slot = this.devices.get(deviceId)
    if (!slot) return
    slot.training = jobId
    if (!jobId) this.kick()
  }

  /**
   * The device is gone: its leases end and their tasks go back to the queue. A device runs
   * `max_concurrent_tasks` at once and queues the rest in arrival order (the protocol, §5.1), so only the
   * first that many of the leases it still held (in the order they were granted) can have started: those
   * attempts failed. The others were never started: they are returned without using an attempt, so a device
   * that dies holding prefetched tasks does not wear out tasks it never touched.
   */
  async deviceLost(deviceId: string, reason: string, options: { returnAll?: boolean } = {}): Promise<void> {
    const slot = this.devices.get(deviceId)
    this.devices.delete(deviceId)
    this.inherited.delete(deviceId)
    const lost = [...this.leases.values()].filter((l) => l.deviceId === deviceId)
    // a device the platform removed (banned) is not the task's fault: every lease returns, no attempt used
    if (options.returnAll) await Promise.all(lost.map((lease) => this.returnLease(lease, reason)))
    else await this.endLost(slot, lost, reason)
  }

  /**
   * Leases a device no longer has. It runs `max_concurrent_tasks` at once and queues the rest in the order
   * they were granted, so only the first that many (of all it held, in that order) can have started: those
   * attempts failed; the others are returned without using an attempt.
   */
  private async endLost(slot: DeviceSlot | undefined, lost: readonly Lease[], reason: string): Promise<void> {
    const unstarted = new Set(slot ? [...slot.leases].slice(slot.maxConcurrent) : [])
    await Promise.all(lost.map((lease) => (unstarted.has(lease.leaseId) ? this.returnLease(lease, `${reason}; the task had not started`) : this.failAttempt(lease, reason, null))))
  }

  /**
   * A heartbeat lists the leases the device is working on: those are extended. The first one after the
   * device (re)connected also settles the leases it held before: those it does not list, it no longer has
   * (it restarted, or their task frames were lost with the old socket), and they end at once instead of
   * holding its slots until they expire. A list of MAX_HEARTBEAT_LEASES may have been cut short: it proves
   * nothing missing.
   */
  heartbeat(deviceId: string, leaseIds: readonly string[], load: number): void {
    const slot = this.devices.get(deviceId)
    if (slot) slot.load = load
    const deadline = Date.now() + this.leaseTimeoutMs
    for (const id of leaseIds) {
      const lease = this.leases.get(id)
      if (lease && lease.deviceId === deviceId) lease.deadline = Math.min(deadline, lease.expiresAt)
    }
    const inherited = this.inherited.get(deviceId)
    if (!inherited || !slot) return
    this.inherited.delete(deviceId)
    if (leaseIds.length >= MAX_HEARTBEAT_LEASES) return
    const listed = new Set(leaseIds)
    const lost = inherited.filter((id) => !listed.has(id)).flatMap((id) => {
      const lease = this.leases.get(id)
      return lease && lease.deviceId === deviceId ? [lease] : []
    })
    if (lost.length > 0) void this.endLost(slot, lost, 'the device came back without the task')
  }

  /** Does the device hold a lease on a task of this model (so it may download the model)? */
  holdsModel(deviceId: string, modelId: string): boolean {
    for (const lease of this.leases.values()) if (lease.deviceId === deviceId && lease.modelId === modelId) return true
    return false
  }

  /**
   * A device's result. Under a lease that is not current (expired, re-queued, given to another device)
   * it is refused with STALE_LEASE and changes nothing.
   */
  async result(deviceId: string, frame: TaskResultFrame): Promise<void> {
    const lease = this.leases.get(frame.lease_id)
    if (!lease || lease.deviceId !== deviceId || lease.unitId !== frame.task_id) {
      throw new DomainError('STALE_LEASE', `lease ${frame.lease_id} for task ${frame.task_id} is not current`)
    }
    // The device is done with the task: its slot takes new work while the outcome is being recorded (the
    // lease itself stays until then, so a second result under it is still refused).
    const device = this.devices.get(deviceId)
    if (device?.leases.delete(lease.leaseId)) this.kick()
    const observed = this.observe(lease, device)
    const outputs = frame.outputs ?? (frame.output ? [frame.output] : undefined)
    if (frame.status !== 'completed' || !outputs) {
      await this.failAttempt(lease, frame.error ?? 'the device reported a failure without an output', frame.metrics, observed)
      return
    }
    const wrong = this.outputsProblem(lease, outputs)
    if (wrong) {
      await this.failAttempt(lease, wrong, frame.metrics, observed)
      return
    }
    // each task of the device task completes on its own stream with its outputs and its share of the compute
    // (the appends go out together and share a commit)
    const at = this.now().toISOString()
    const parts = lease.parts
    const partOutputs = parts.map((part) => outputs.slice(part.offset, part.offset + part.count))
    const settled = await Promise.allSettled(parts.map(async (part, i) => {
      const share = shareOf(lease, part)
      const record = lease.deferred.has(part.taskId) ? { record: { ...grantOf(lease, part.index), at: lease.grantedAt } } : {}
      // outputs too large for their event go to the blob store first: the event that names them never comes without them
      const blob = await storeOutputs(this.options.blobs, partOutputs[i]!, this.inlineInputsMaxBytes)
      return this.command(part.taskId, { type: 'CompleteTask', leaseId: lease.leaseId, outputs: partOutputs[i]!, ...(blob ? { outputs_blob: blob } : {}), metrics: frame.metrics, ...(observed ? { observed } : {}), ...(share ? { share } : {}), ...record, at })
    }))
    let failure: unknown
    let refusal: unknown
    const unrecorded: Part[] = []
    settled.forEach((done, i) => {
      if (done.status === 'fulfilled') this.afterOutcome(parts[i]!.taskId, done.value.events, done.value.position, partOutputs[i]!)
      else if (done.reason instanceof DomainError) refusal ??= done.reason // ended meanwhile (cancelled; or this is a second copy of the result)
      else {
        // not recorded (the store failed): the lease stays for this part, which expires and runs again
        unrecorded.push(parts[i]!)
        failure ??= done.reason
      }
    })
    if (unrecorded.length > 0) {
      lease.parts = unrecorded
      throw failure
    }
    // nothing recorded by this result: a copy of one being recorded, or every task ended meanwhile
    if (refusal && settled.every((done) => done.status === 'rejected')) throw refusal
    this.release(lease)
    this.kick()
  }

  /** Why the outputs do not fit the device task (one per input of every part, each fitting its task), or undefined. */
  private outputsProblem(lease: Lease, outputs: readonly Tensor[]): string | undefined {
    const inputs = lease.sizes.reduce((a, b) => a + b, 0)
    if (outputs.length !== inputs) return `the device returned ${outputs.length} outputs for ${inputs} inputs`
    for (const part of lease.parts) {
      const spec = this.specs.get(part.taskId)
      const wrong = spec && outputProblem(spec, outputs.slice(part.offset, part.offset + part.count))
      if (wrong) return lease.parts.length > 1 ? `${wrong} (inputs ${part.offset}..${part.offset + part.count - 1} of the device task)` : wrong
    }
    return undefined
  }

  /** What the server saw of the attempt: sent to received, and the device's declared cores and GPUs. */
  private observe(lease: Lease, device: DeviceSlot | undefined): Observed | undefined {
    if (!device?.cpuCores) return undefined
    return { wall_ms: Math.max(0, Date.now() - lease.sentAt), cpu_cores: device.cpuCores, gpus: device.gpuCount ?? 0 }
  }

  /**
   * After a task's outcome was recorded: waiters get a completion or a failure for good; a held result
   * sends the task back to the queue for another run; verdicts and failures of work that succeeded
   * elsewhere go into the devices' reputations. `outputs`: the result just recorded (waiters get them from
   * here when the TaskCompleted names a blob instead of carrying them).
   */
  private afterOutcome(taskId: string, events: readonly TaskEvent[], position: Position, outputs?: Tensor[]): void {
    for (const event of events) {
      switch (event.type) {
        case 'TaskValidated':
          this.verdicts(event.data)
          break
        case 'TaskCompleted': {
          const d = event.data
          if (!d.validated) this.noteReputation(d.device_id, (r) => r.completed++)
          for (const failed of new Set(d.failed_on)) if (failed !== d.device_id) this.noteReputation(failed, (r) => r.failedElsewhereOk++)
          this.settle(taskId, { status: 'completed', taskId, deviceId: d.device_id, outputs: d.outputs ?? outputs ?? [], metrics: d.metrics, position })
          return
        }
        case 'TaskFailed':
          this.settle(taskId, { status: 'failed', taskId, reason: event.data.reason, position })
          return
        case 'TaskResultHeld': {
          const spec = this.specs.get(taskId)
          if (spec) this.enqueue(spec, true) // a replica waits behind no new work
          break
        }
      }
    }
  }

  private verdicts(validated: TaskValidated['data']): void {
    for (const run of validated.runs) {
      this.noteReputation(run.device_id, (r) => {
        if (run.verdict === 'outvoted') r.disputed++
        else {
          r.validated++
          r.completed++
        }
      })
    }
  }

  /** Changes a device's reputation; past the threshold it is quarantined (once). */
  private noteReputation(deviceId: string, change: (r: Reputation) => void): void {
    const reputation = this.reputation.get(deviceId) ?? emptyReputation()
    change(reputation)
    this.reputation.set(deviceId, reputation)
    const slot = this.devices.get(deviceId)
    const reason = quarantineReason(reputation)
    if (!reason || slot?.quarantined) return
    if (slot) slot.quarantined = true
    void this.quarantineDevice(deviceId, reason)
  }

  /**
   * Takes a device out of the work: the platform records the quarantine (the hub's), and the tasks it
   * holds go back to the queue without using attempts (a result it sends for them is refused).
   */
  private async quarantineDevice(deviceId: string, reason: string): Promise<void> {
    this.options.log?.(`scheduler: quarantining ${deviceId}: ${reason}`)
    const held = [...this.leases.values()].filter((l) => l.deviceId === deviceId)
    await Promise.all(held.map((lease) => this.returnLease(lease, `the device was quarantined (${reason})`)))
    await this.options.quarantine?.(deviceId, reason).catch((error: Error) => this.options.log?.(`scheduler: recording the quarantine of ${deviceId}: ${error.message}`))
  }

  /** The device's reputation as this scheduler knows it. */
  reputationOf(deviceId: string): Reputation {
    return { ...(this.reputation.get(deviceId) ?? emptyReputation()) }
  }

  /** A quarantined device was released: it takes work again (its reputation starts afresh). */
  deviceReleased(deviceId: string): void {
    this.reputation.set(deviceId, emptyReputation())
    const slot = this.devices.get(deviceId)
    if (slot) slot.quarantined = false
    this.kick()
  }

  /**
   * Cancels tasks (a task that ended already is refused with CANNOT_CANCEL): each cancellation is recorded
   * on its own stream, then the queue and the leases are cleared of them in one pass each, so cancelling a
   * job of 100,000 tasks is not 100,000 scans of the queue. A device holding one is told to drop it (a
   * result it sends anyway is refused: the lease is gone). Settles with each task's cancellation position.
   */
  async cancelAll(taskIds: readonly string[], customerId: string): Promise<PromiseSettledResult<Position>[]> {
    const at = this.now().toISOString()
    const settled = await Promise.allSettled(taskIds.map((taskId) => this.command(taskId, { type: 'CancelTask', at }, customerId)))
    const cancelled = new Map<string, Position>()
    settled.forEach((result, i) => {
      if (result.status === 'fulfilled') cancelled.set(taskIds[i]!, result.value.position)
    })
    if (cancelled.size > 0) {
      let kept = 0
      for (const spec of this.queue) {
        if (cancelled.has(spec.task_id)) this.counted(spec, -1)
        else this.queue[kept++] = spec
      }
      this.queue.length = kept
      for (const lease of [...this.leases.values()]) {
        const left = lease.parts.filter((part) => !cancelled.has(part.taskId))
        if (left.length === lease.parts.length) continue
        // a device task merged from several: the others go on (the device runs the cancelled part's inputs
        // too; its outputs are dropped and its share of the compute is billed to no one)
        if (left.length > 0) {
          lease.parts = left
          continue
        }
        this.devices.get(lease.deviceId)?.send({ type: 'cancel_task', task_id: lease.unitId, lease_id: lease.leaseId })
        this.release(lease)
      }
      for (const [taskId, position] of cancelled) this.settle(taskId, { status: 'cancelled', taskId, position })
      this.kick() // released slots take queued work
    }
    return settled.map((result) => (result.status === 'fulfilled' ? { status: 'fulfilled', value: result.value.position } : result))
  }

  /** Cancels one task (see cancelAll); resolves with the position of its cancellation. */
  async cancel(taskId: string, customerId: string): Promise<Position> {
    const [result] = await this.cancelAll([taskId], customerId)
    if (result!.status === 'rejected') throw result!.reason
    return result!.value
  }

  /** Fails every lease whose deadline passed. */
  async sweep(): Promise<void> {
    const now = Date.now()
    const expired = [...this.leases.values()].filter((l) => l.deadline <= now)
    await Promise.all(
      expired.map((lease) =>
        this.failAttempt(lease, lease.deadline >= lease.expiresAt ? `lease expired: the task ran past the longest a lease lives (${this.maxLeaseMs} ms)` : 'lease expired: the device stopped reporting the task', null),
      ),
    )
  }

  private failAttempt(lease: Lease, reason: string, metrics: Metrics | null, observed?: Observed): Promise<void> {
    const at = this.now().toISOString()
    return this.endLease(lease, (part) => {
      const share = metrics ? shareOf(lease, part) : undefined
      return { type: 'FailAttempt', leaseId: lease.leaseId, reason, metrics, ...(observed ? { observed } : {}), ...(share ? { share } : {}), at }
    })
  }

  private returnLease(lease: Lease, reason: string): Promise<void> {
    const at = this.now().toISOString()
    return this.endLease(lease, () => ({ type: 'ReturnLease', leaseId: lease.leaseId, reason, at }))
  }

  /**
   * Ends a lease that did not complete: the task goes back to the front of the queue, or fails for good.
   * When the end cannot be recorded (the store is unreachable for a moment), the lease stays current in the
   * log, so it is kept here too, off its device's slots, and ending it is tried again after a growing pause
   * (0.2 s doubling to 10 s): dropping it would leave the task neither queued nor leased until a restart.
   */
  private async endLease(lease: Lease, commandFor: (part: Part) => Extract<TaskCommand, { type: 'FailAttempt' | 'ReturnLease' }>, attempt = 0): Promise<void> {
    if (!this.leases.has(lease.leaseId)) return
    this.release(lease)
    // every task of the device task, each on its own stream (the appends share a commit)
    const parts = lease.parts
    const settled = await Promise.allSettled(parts.map(async (part) => {
      const command = commandFor(part)
      if (!lease.deferred.has(part.taskId)) return await this.command(part.taskId, command)
      // a lease the log does not hold: returned, there is nothing to record; failed, it is recorded with the failure
      if (command.type === 'ReturnLease') return undefined
      return await this.command(part.taskId, { ...command, record: { ...grantOf(lease, part.index), at: lease.grantedAt } })
    }))
    const requeued: TaskSpec[] = []
    const retry: Part[] = []
    settled.forEach((result, i) => {
      const part = parts[i]!
      if (result.status === 'fulfilled') {
        if (result.value?.events.some((e) => e.type === 'TaskFailed')) this.afterOutcome(part.taskId, result.value.events, result.value.position)
        else {
          const spec = this.specs.get(part.taskId)
          if (spec) requeued.push(spec)
        }
        return
      }
      const error = result.reason as Error
      // a refusal by the task's own rules (the lease had ended already, the task was cancelled) is final
      if (!(error instanceof DomainError && error.code === 'STALE_LEASE')) this.options.log?.(`scheduler: ending lease ${lease.leaseId} of ${part.taskId}: ${error.message}`)
      if (!(error instanceof DomainError) && !this.stopped) retry.push(part)
    })
    // back to the front, in their order: they have waited already
    for (const spec of requeued.reverse()) this.enqueue(spec, true)
    if (retry.length > 0) {
      const kept = { ...lease, parts: retry, deadline: Infinity } // not swept meanwhile: this retry ends it
      this.leases.set(lease.leaseId, kept)
      const again = setTimeout(() => void this.endLease(this.leases.get(lease.leaseId) ?? kept, commandFor, attempt + 1), Math.min(10_000, 200 * 2 ** attempt))
      again.unref()
    }
    this.kick()
  }

  private release(lease: Lease): void {
    this.leases.delete(lease.leaseId)
    this.devices.get(lease.deviceId)?.leases.delete(lease.leaseId)
  }

  /** Runs dispatch, once at a time; a kick during a run makes it run again. */
  private kick(): void {
    if (this.dispatching) {
      this.again = true
      return
    }
    this.dispatching = this.dispatch()
      .catch((error: Error) => this.options.log?.(`scheduler: dispatch failed: ${error.message}`))
      .finally(() => {
        this.dispatching = undefined
        if (this.again) {
          this.again = false
          this.kick()
        }
      })
  }

  /**
   * Gives every queued task a device has room for to that device. The leases are granted together (each
   * lease takes its slot at once, then their events are appended concurrently and share a group commit).
   *
   * The dynamic batcher: a task that may be merged (`mergeKey`) takes the queued tasks of its key along, in
   * queue order, up to the device's `max_batch_inputs` and the model's `max_batch_size`, as one device task.
   * Nothing waits for company while a device is free, unless the model sets `max_queue_delay_ms`: then a
   * group short of a full batch is held back until its oldest task waited that long.
   */
  private async dispatch(): Promise<void> {
    const grants: Promise<void>[] = []
    const now = Date.now()
    const held = new Set<string>()
    // keys no device can take more of in this pass (the same key, the same devices: see mergeKey)
    const blocked = new Set<string>()
    // queued tasks not yet passed that are not mergeable: once none is left and no device can take more
    // mergeable work, the rest of the queue need not be looked at (it can be long: every result runs this)
    let plainLeft = this.queue.length - this.mergeable.size
    let wakeAt = Infinity
    for (let i = 0; i < this.queue.length && this.hasRoom(); ) {
      const task = this.queue[i]!
      const merge = this.mergeable.get(task.task_id)
      if (merge && (held.has(merge.key) || blocked.has(merge.key))) {
        if (plainLeft === 0 && !this.hasMergeRoom()) break
        i++
        continue
      }
      const device = this.pickDevice(task)
      if (!device) {
        if (merge) blocked.add(merge.key)
        else plainLeft--
        i++
        continue
      }
      if (!merge) {
        plainLeft--
        this.dequeueAt(i)
        grants.push(this.lease([task], device))
        continue
      }
      const batching = task.batching!
      // merged tasks share an input shape: at most as many values as one request may send
      const limit = Math.min(device.maxBatchInputs, batching.max_batch_size, Math.max(1, Math.floor(MAX_MERGED_VALUES / task.inputs[0]!.data.length)))
      const group = this.gather(i, merge.key, limit)
      const until = merge.since + batching.max_queue_delay_ms
      if (group.length < limit && merge.since > 0 && until > now) {
        held.add(merge.key)
        wakeAt = Math.min(wakeAt, until)
        i++
        continue
      }
      grants.push(this.lease(this.take(group), device))
    }
    this.wakeAt(wakeAt)
    await Promise.all(grants)
  }

  /** Positions in the queue of the task at `first` and the next ones of its merge key, `limit` at most. */
  private gather(first: number, key: string, limit: number): number[] {
    const group = [first]
    const wanted = Math.min(limit, this.mergeableByKey.get(key) ?? 1)
    for (let j = first + 1; j < this.queue.length && group.length < wanted; j++) {
      if (this.mergeable.get(this.queue[j]!.task_id)?.key === key) group.push(j)
    }
    return group
  }

  /** Takes the tasks at these positions (ascending) out of the queue, in one pass. */
  private take(positions: readonly number[]): TaskSpec[] {
    const taken = positions.map((j) => this.queue[j]!)
    const first = positions[0]!
    if (positions.at(-1)! - first === positions.length - 1) this.queue.splice(first, positions.length) // side by side (the usual case)
    else {
      const at = new Set(positions)
      let kept = first
      for (let j = kept; j < this.queue.length; j++) if (!at.has(j)) this.queue[kept++] = this.queue[j]!
      this.queue.length = kept
    }
    for (const spec of taken) this.counted(spec, -1)
    return taken
  }

  /** Runs dispatch again at `at` (work held back for company), unless it is due to run sooner. */
  private wakeAt(at: number): void {
    if (at === Infinity || (this.holdTimer && this.holdTimer.at <= at)) return
    if (this.holdTimer) clearTimeout(this.holdTimer.timer)
    const timer = setTimeout(() => {
      this.holdTimer = undefined
      if (!this.stopped) this.kick()
    }, Math.max(0, at - Date.now()))
    timer.unref()
    this.holdTimer = { at, timer }
  }

  /** Is there a device that could take one more device task of mergeable work (see hasSpace)? */
  private hasMergeRoom(): boolean {
    for (const device of this.devices.values()) {
      if (device.draining || device.training || device.quarantined) continue
      if (device.leases.size < this.mostLeases(device, true)) return true
    }
    return false
  }

  /** Is there a device that could take one more task (so scanning the queue may find work for it)? */
  private hasRoom(): boolean {
    for (const device of this.devices.values()) if (!device.draining && !device.training && !device.quarantined && this.hasSpace(device)) return true
    return false
  }

  /**
   * May the device hold one more task (running or waiting on it)? Never more than a heartbeat can list
   * (MAX_HEARTBEAT_LEASES): a lease it cannot list is never extended, and would expire on the device.
   * Work that may be merged waits in the queue rather than on a busy device (MERGED_PREFETCH): requests that
   * arrive while its slots are busy go to it together when one frees, instead of one by one.
   */
  private hasSpace(device: DeviceSlot, task?: TaskSpec): boolean {
    return device.leases.size < this.mostLeases(device, task !== undefined && this.mayMerge(task))
  }

  /** The most device tasks the device may hold: for mergeable work, MERGED_PREFETCH beyond those it runs. */
  private mostLeases(device: DeviceSlot, mergeable: boolean): number {
    const prefetched = device.maxConcurrent * (this.prefetch - 1)
    return Math.min(device.maxConcurrent + (mergeable ? Math.min(MERGED_PREFETCH, prefetched) : prefetched), MAX_HEARTBEAT_LEASES)
  }

  /**
   * A capable device with room: GPU first when asked, then the least loaded. A task whose result is held
   * for validation goes only to a device that has not run it, of another contributor (or a cloud device),
   * a cloud device first. A device that failed the task gets it again only when no other capable device is
   * connected (fault isolation: a broken device does not use up a task's attempts).
   */
  private pickDevice(task: TaskSpec): DeviceSlot | undefined {
    const state = this.known.get(task.task_id)?.state
    const held = state && state.held.length > 0 ? state.held : undefined
    const ran = held && new Set(held.map((h) => h.deviceId))
    const ranBy = held && new Set(held.map((h) => this.contributors.get(h.deviceId) ?? h.deviceId))
    const failedOn = state && state.failedOn.length > 0 ? new Set(state.failedOn) : undefined
    let best: DeviceSlot | undefined
    let bestScore = Infinity
    let fallback: DeviceSlot | undefined
    let fallbackScore = Infinity
    let othersConnected = false
    for (const device of this.devices.values()) {
      if (device.draining || device.training || device.quarantined || device.maxBatchInputs < task.inputs.length || !device.formats.includes(task.model.format)) continue
      if (task.instance_type && device.instanceType !== task.instance_type) continue
      if (ran && (ran.has(device.deviceId) || (device.instanceType !== 'aws' && ranBy!.has(device.contributor ?? device.deviceId)))) continue
      const failedHere = failedOn?.has(device.deviceId) ?? false
      if (!failedHere) othersConnected = true
      if (!this.hasSpace(device, task)) continue
      const score = (task.prefer_gpu && device.gpu ? 0 : 10) + (held && device.instanceType === 'aws' ? 0 : 5) + device.leases.size / device.maxConcurrent + device.load
      if (failedHere) {
        if (score < fallbackScore) {
          fallback = device
          fallbackScore = score
        }
      } else if (score < bestScore) {
        best = device
        bestScore = score
      }
    }
    return best ?? (othersConnected ? undefined : fallback)
  }

  /** Takes a slot of the device for the tasks (one, or several merged) under a new lease (recorded by the caller). */
  private reserve(tasks: readonly TaskSpec[], device: DeviceSlot): Lease {
    const id = newEventId().replaceAll('-', '').slice(0, 16)
    const leaseId = `lease_${id}`
    const now = Date.now()
    const sizes = tasks.map((t) => t.inputs.length)
    let offset = 0
    const parts = tasks.map((t, index) => ({ taskId: t.task_id, index, offset: (offset += t.inputs.length) - t.inputs.length, count: t.inputs.length }))
    const unitId = tasks.length === 1 ? tasks[0]!.task_id : `unit_${id}`
    const lease: Lease = {
      leaseId, unitId, parts, sizes, deviceId: device.deviceId, sdkUuid: device.sdkUuid, instanceType: device.instanceType, grantedAt: this.now().toISOString(), deferred: new Set(),
      modelId: tasks[0]!.model.id, deadline: now + this.leaseTimeoutMs, expiresAt: now + this.maxLeaseMs, sentAt: now,
    }
    device.leases.add(leaseId)
    this.leases.set(leaseId, lease)
    return lease
  }

  /**
   * Leases the tasks to the device as one device task: each task's lease is recorded on its own stream (the
   * appends share a commit). A task that could not be leased leaves the device task (cancelled meanwhile;
   * or, when the store failed, back to the queue); the device still gets every input in its place.
   */
  private async lease(tasks: readonly TaskSpec[], device: DeviceSlot): Promise<void> {
    const lease = this.reserve(tasks, device)
    const at = lease.grantedAt
    const settled = await Promise.allSettled(tasks.map(async (task, i) => {
      // a synchronous request's lease goes into the log with its outcome (see Lease.deferred)
      if (this.mayMerge(task) && this.outcomes.has(task.task_id)) lease.deferred.add(task.task_id)
      else await this.command(task.task_id, { type: 'LeaseTask', ...grantOf(lease, i), at })
    }))
    const requeued: TaskSpec[] = []
    settled.forEach((result, i) => {
      if (result.status === 'fulfilled') return
      const task = tasks[i]!
      lease.parts = lease.parts.filter((p) => p.taskId !== task.task_id)
      const error = result.reason as Error
      if (error instanceof DomainError && error.code === 'CONFLICT') return // cancelled meanwhile
      requeued.push(task)
      this.options.log?.(`scheduler: leasing ${task.task_id}: ${error.message}`)
    })
    for (const task of requeued.reverse()) this.enqueue(task, true)
    if (lease.parts.length === 0) {
      this.release(lease)
      if (requeued.length > 0) this.kick()
      return
    }
    await this.deliver(tasks, device, lease)
  }

  /** Sends a recorded lease's device task to its device; a device gone meanwhile returns the lease (no attempt used). */
  private async deliver(tasks: readonly TaskSpec[], device: DeviceSlot, lease: Lease): Promise<void> {
    if (!this.leases.has(lease.leaseId)) {
      // its device went away while the lease was being recorded: now that it is recorded, end it (the task
      // never reached the device: no attempt is used)
      this.leases.set(lease.leaseId, lease)
      await this.returnLease(lease, 'the device went away while the task was being leased')
      return
    }
    lease.sentAt = Date.now()
    this.sent.deviceTasks++
    this.sent.tasks += lease.parts.length
    const first = tasks[0]!
    const inputs = tasks.length === 1 ? first.inputs : tasks.flatMap((t) => t.inputs)
    const sent = device.send({
      type: 'task',
      task_id: lease.unitId,
      lease_id: lease.leaseId,
      lease_deadline: new Date(lease.deadline).toISOString(),
      model: { id: first.model.id, format: first.model.format, checksum: first.model.checksum, download_path: `/api/v1/sdk/models/${first.model.id}` },
      ...(inputs.length === 1 ? { input: inputs[0] } : { inputs }),
      ...(first.input_name ? { input_name: first.input_name } : {}),
    })
    if (!sent) {
      // Its socket is closing: it takes nothing more (the hub reports it lost once the socket has closed,
      // which can take a while), and the task, which never reached it, goes back to the queue without using
      // an attempt. Failing the attempt instead could fail the task for good on a device that was leaving.
      device.draining = true
      await this.returnLease(lease, 'the device was gone before the task reached it')
    }
  }

  /** The task's state from its stream, and the position, time and merged unit of its last lease. */
  private async fold(taskId: string): Promise<KnownState<TaskState> & { leasedAt: Position | undefined; leasedTime: number | undefined; unit: LeaseGrant['unit'] | undefined }> {
    const events = (await this.options.store.readStream(taskStream(taskId))).map((e) => ({ recorded: e, event: taskDecider.parse({ type: e.type, data: e.data, schemaVersion: e.metadata.schemaVersion ?? 1 }) }))
    const state = events.map((e) => e.event).reduce(taskDecider.evolve, taskDecider.initialState())
    const leased = events.findLast((e) => e.event.type === 'TaskLeased')
    const data = leased?.event.type === 'TaskLeased' ? leased.event.data : undefined
    const leasedTime = data ? Date.parse(data.leased_at) : NaN
    return { state, revision: events.at(-1)?.recorded.revision ?? -1, leasedAt: leased?.recorded.position, leasedTime: Number.isFinite(leasedTime) ? leasedTime : undefined, unit: data?.unit ?? undefined }
  }

  /** Runs a task command, deciding on the state this scheduler last wrote (one round trip) when it has it. */
  private async command(taskId: string, command: TaskCommand, customerId?: string) {
    const spec = this.specs.get(taskId)
    const metadata = { customerId: customerId ?? spec?.customer_id ?? '', occurredAt: 'at' in command ? command.at : undefined }
    const known = this.known.get(taskId)
    const result = await handleCommand(this.options.store, taskStream(taskId), taskDecider, command, { metadata, ...(known ? { known } : {}) })
    const ended = result.state.status === 'completed' || result.state.status === 'failed' || result.state.status === 'cancelled'
    if (ended) {
      this.known.delete(taskId)
      this.specs.delete(taskId)
    } else this.known.set(taskId, { state: result.state, revision: result.nextRevision })
    return result
  }
}

/** The lease as recorded on the stream of the device task's `index`-th task. */
const grantOf = (lease: Lease, index: number): LeaseGrant => ({
  leaseId: lease.leaseId,
  deviceId: lease.deviceId,
  sdkUuid: lease.sdkUuid,
  instanceType: lease.instanceType,
  ...(lease.sizes.length > 1 ? { unit: { id: lease.unitId, index, sizes: lease.sizes } } : {}),
})

/** A part's place in a merged device task, for splitting the compute measured for the whole; undefined when it ran alone. */
const shareOf = (lease: Lease, part: Part): Share | undefined => (lease.sizes.length > 1 ? { unit: lease.unitId, sizes: lease.sizes, index: part.index } : undefined)
