import { z } from 'zod'
import { Metrics } from '../protocol/frames.js'
import { numberArray } from '../protocol/numbers.js'
import type { Decider } from './decider.js'
import { DomainError } from './errors.js'
import { boundMetrics, Observed, splitMetrics } from './metering.js'
import { checkRequired, NO_VALIDATION, outputsAgree, ValidationPolicy, VALIDATION_DEFAULTS } from './validation.js'

/**
 * One unit of work for one device: queued, leased to a device (a lease id and a deadline), then completed,
 * or its attempt failed (the device reported an error, vanished, or let the lease expire) and it is queued
 * again, up to `max_attempts`, after which it fails for good. Results carry the lease id: only the current
 * lease may complete the task (fencing), so a device that was given up on cannot overwrite the retry.
 */
const TensorData = z.object({ data: numberArray(), shape: numberArray({ int: true }) })
const MergedUnit = z.object({ id: z.string(), index: z.number().int().min(0), sizes: z.array(z.number().int().min(1)).min(2) })
/**
 * An outcome of a merged device task: the device measured the whole task; each part is billed its share by
 * inputs (`splitMetrics`): `claimed` is the whole task's claim, `sizes` the inputs of each part in order,
 * `index` this part's. The part's `metrics` are its share of the whole claim bounded by `observed`.
 */
const MergedShare = z.object({ unit: z.string(), index: z.number().int().min(0), sizes: z.array(z.number().int().min(1)).min(2), claimed: Metrics })
export type MergedShare = z.infer<typeof MergedShare>

export const TaskSpec = z.object({
  task_id: z.string(),
  customer_id: z.string(),
  job_id: z.string(),
  /** The project the work counts towards, if any. */
  project_id: z.string().nullable().default(null),
  model: z.object({ id: z.string(), format: z.enum(['onnx', 'torchscript']), checksum: z.string() }),
  /** One input, or several for one device to run together (a chunk of a batch). */
  inputs: z.array(TensorData).min(1),
  input_name: z.string().optional(),
  /** The output shape the model declares (-1: any size); a result that does not fit fails the attempt. */
  output_shape: z.array(z.number().int()).nullable().default(null),
  prefer_gpu: z.boolean(),
  /** Only devices of this kind may run it (`aws` or `user`); null: any. */
  instance_type: z.enum(['aws', 'user']).nullable().default(null),
  max_attempts: z.number().int().min(1),
  /** How its result is checked before it is delivered (src/domain/validation.ts); none in older events. */
  validation: ValidationPolicy.default(NO_VALIDATION),
  /**
   * Dynamic batching (the model's settings when it was requested): a single-input task may be dispatched
   * together with other queued ones of the same model, customer and placement, as one device task of up to
   * `max_batch_size` inputs; while a device is free it is held back at most `max_queue_delay_ms` for others
   * to join. Null: always dispatched alone (chunks of a batch, older events).
   */
  batching: z.object({ max_batch_size: z.number().int().min(1), max_queue_delay_ms: z.number().int().min(0) }).nullable().default(null),
})
export type TaskSpec = z.infer<typeof TaskSpec>

/**
 * Inputs kept out of the event (above the scheduler's inline limit): their JSON (the `inputs` array) is the
 * blob `sha256` in the blob store, `bytes` long, holding `count` inputs.
 */
export const InputsBlob = z.object({ sha256: z.string().regex(/^[0-9a-f]{64}$/), bytes: z.number().int().min(1), count: z.number().int().min(1) })
export type InputsBlob = z.infer<typeof InputsBlob>

/**
 * A task as TaskQueued records it: its inputs inline (`inputs`, as every event before #25), or in the blob
 * store (`inputs_blob`), exactly one of the two.
 */
const QueuedSpec = TaskSpec.omit({ inputs: true }).extend({ inputs: TaskSpec.shape.inputs.optional(), inputs_blob: InputsBlob.optional() })
export type QueuedSpec = z.infer<typeof QueuedSpec>
const oneInputsForm = (spec: { inputs?: unknown; inputs_blob?: unknown }) => (spec.inputs === undefined) !== (spec.inputs_blob === undefined)

/** Inputs of a task, whether they are in the event or in a blob. */
export function inputCount(spec: QueuedSpec): number {
  return spec.inputs?.length ?? spec.inputs_blob?.count ?? 0
}

const TaskQueued = z.object({
  type: z.literal('TaskQueued'),
  data: QueuedSpec.extend({ queued_at: z.string() }).refine(oneInputsForm, { message: 'a task has either inputs or inputs_blob', path: ['inputs'] }),
})
const TaskLeased = z.object({
  type: z.literal('TaskLeased'),
  data: z.object({
    task_id: z.string(),
    lease_id: z.string(),
    device_id: z.string(),
    /** The device's SDK installation and kind, as it registered: the billing dimensions of the attempt. */
    sdk_uuid: z.string().nullable().default(null),
    instance_type: z.enum(['aws', 'user']).nullable().default(null),
    attempt: z.number().int(),
    /**
     * Dispatched merged with other tasks (dynamic batching): one device task `id` carried the tasks leased
     * under this lease id, their inputs one after another, `sizes` inputs each, this task's as part `index`.
     * Null: dispatched alone.
     */
    unit: MergedUnit.nullable().default(null),
    leased_at: z.string(),
  }),
})
/**
 * Which attempt an outcome belongs to: the task, its job, customer and project, the lease it ran under, and
 * what usage is billed by (the device's SDK UUID and instance type, how many inputs it carried). Null in
 * events written before these were recorded.
 */
const AttemptRef = z.object({
  task_id: z.string(),
  customer_id: z.string(),
  job_id: z.string(),
  project_id: z.string().nullable().default(null),
  lease_id: z.string(),
  device_id: z.string(),
  sdk_uuid: z.string().nullable().default(null),
  instance_type: z.enum(['aws', 'user']).nullable().default(null),
  inputs: z.number().int().min(1).default(1),
})
/**
 * What the server saw of an attempt, and what it bills: `metrics` are the billed figures, at most the wall
 * time between sending the task and receiving its outcome times the device's cores (GPUs for `gpu_ms`);
 * when the device claimed more, `claimed_metrics` keeps its claim and `metering_clamped` flags it.
 */
const Metering = {
  observed: Observed.nullable().default(null),
  claimed_metrics: Metrics.nullable().default(null),
  metering_clamped: z.boolean().default(false),
  /** Part of a merged device task: how its metrics were split off the whole (null: it ran alone). */
  merged: MergedShare.nullable().default(null),
}
/**
 * Outputs kept out of TaskCompleted (above the scheduler's inline limit): their JSON (the `outputs` array) is
 * the blob `sha256`, `bytes` long, holding `count` outputs (one per input) of `values` values in all (what a
 * page of results counts against its limit without reading the blob).
 */
export const OutputsBlob = InputsBlob.extend({ values: z.number().int().min(0) })
export type OutputsBlob = z.infer<typeof OutputsBlob>
const oneOutputsForm = (data: { outputs?: unknown; outputs_blob?: unknown }) => (data.outputs === undefined) !== (data.outputs_blob === undefined)

const TaskCompleted = z.object({
  type: z.literal('TaskCompleted'),
  /**
   * One output per input, in order: inline (`outputs`, as every event before #25 and every validated
   * completion), or in the blob store (`outputs_blob`), exactly one of the two.
   */
  data: AttemptRef.extend({
    outputs: z.array(TensorData).optional(),
    outputs_blob: OutputsBlob.optional(),
    metrics: Metrics,
    ...Metering,
    /** Completed by validation (a TaskValidated came first): the attempt named is the accepted run, not the one that just ended. */
    validated: z.boolean().default(false),
    /** Devices that failed an attempt of it before (their reputation counts a failure of work that succeeded elsewhere). */
    failed_on: z.array(z.string()).default([]),
    completed_at: z.string(),
  }).refine(oneOutputsForm, { message: 'a completed task has either outputs or outputs_blob', path: ['outputs'] }),
})
/**
 * A run's result waits for another run to agree with it (validation): the task goes back to the queue for
 * a device that has not run it. `disagrees_with`: the devices of earlier held results it does not agree
 * with (a dispute; empty for the first run).
 */
const TaskResultHeld = z.object({
  type: z.literal('TaskResultHeld'),
  data: AttemptRef.extend({
    outputs: z.array(TensorData),
    metrics: Metrics,
    ...Metering,
    check: z.enum(['quorum', 'spot']),
    disagrees_with: z.array(z.string()),
    held_at: z.string(),
  }),
})
const ValidatedRun = z.object({
  lease_id: z.string(),
  device_id: z.string(),
  sdk_uuid: z.string().nullable(),
  instance_type: z.enum(['aws', 'user']).nullable(),
  metrics: Metrics,
  /** accepted: its result is delivered and billed; agreed: a replica that agreed (credited to its contributor, not billed); outvoted: disputed. */
  verdict: z.enum(['accepted', 'agreed', 'outvoted']),
})
/**
 * The runs of a validated task and their verdicts. `agreed` false: no two runs agreed within the task's
 * runs (every run outvoted; the task fails). A TaskCompleted (or TaskFailed) follows in the same append.
 */
const TaskValidated = z.object({
  type: z.literal('TaskValidated'),
  data: z.object({
    task_id: z.string(),
    customer_id: z.string(),
    job_id: z.string(),
    project_id: z.string().nullable(),
    inputs: z.number().int().min(1),
    agreed: z.boolean(),
    runs: z.array(ValidatedRun),
    validated_at: z.string(),
  }),
})
export type TaskValidated = z.infer<typeof TaskValidated>
const TaskAttemptFailed = z.object({
  type: z.literal('TaskAttemptFailed'),
  data: AttemptRef.extend({
    reason: z.string(),
    metrics: Metrics.nullable(),
    ...Metering,
    /** Whether the task went back to the queue (false: that was its last attempt). */
    requeued: z.boolean(),
    failed_at: z.string(),
  }),
})
/**
 * The lease ended before the device started the task (it was queued on the device behind running ones, and
 * the device went away): the task goes back to the queue and the attempt is not counted.
 */
const TaskLeaseReturned = z.object({
  type: z.literal('TaskLeaseReturned'),
  data: z.object({ task_id: z.string(), job_id: z.string(), lease_id: z.string(), device_id: z.string(), reason: z.string(), returned_at: z.string() }),
})
const TaskFailed = z.object({ type: z.literal('TaskFailed'), data: z.object({ task_id: z.string(), job_id: z.string(), reason: z.string(), failed_at: z.string() }) })
const TaskCancelled = z.object({ type: z.literal('TaskCancelled'), data: z.object({ task_id: z.string(), job_id: z.string(), lease_id: z.string().nullable(), device_id: z.string().nullable(), cancelled_at: z.string() }) })

const TaskEvent = z.discriminatedUnion('type', [TaskQueued, TaskLeased, TaskCompleted, TaskResultHeld, TaskValidated, TaskAttemptFailed, TaskLeaseReturned, TaskFailed, TaskCancelled])
export type TaskEvent = z.infer<typeof TaskEvent>
export const taskEventTypes = TaskEvent.options.map((o) => o.shape.type.value)

export type TaskCommand =
  /** Queues a task (its inputs inline or in a blob); with `lease`, a device took it at once (both events in one append). */
  | { type: 'QueueTask'; task: QueuedSpec; at: string; lease?: LeaseGrant }
  | ({ type: 'LeaseTask'; at: string } & LeaseGrant)
  /**
   * `observed`: what the server saw of the attempt (bounds the billed metrics; absent: billed as claimed).
   * `share`: the task was part of a merged device task; `metrics` are the whole task's, split by inputs.
   * `record`: the lease was granted but not recorded yet (a synchronous request's, recorded with its
   * outcome): its TaskLeased comes first, in the same append, if the task is still queued.
   */
  /**
   * `outputs_blob`: the blob the scheduler wrote `outputs` to (too large for the event); an unvalidated
   * TaskCompleted names it instead of carrying them. `outputs` always come along: they are counted, and
   * compared with held results (a validated TaskCompleted keeps them inline).
   */
  | { type: 'CompleteTask'; leaseId: string; outputs: z.infer<typeof TensorData>[]; outputs_blob?: OutputsBlob; metrics: z.infer<typeof Metrics>; observed?: Observed; share?: Share; record?: DeferredLease; at: string }
  | { type: 'FailAttempt'; leaseId: string; reason: string; metrics: z.infer<typeof Metrics> | null; observed?: Observed; share?: Share; record?: DeferredLease; at: string }
  | { type: 'ReturnLease'; leaseId: string; reason: string; at: string }
  | { type: 'CancelTask'; at: string }
  /** Ends an open task for good without an attempt (its inputs cannot be read back after a restart). */
  | { type: 'FailTask'; reason: string; at: string }

/** A device taking a task under a lease; `unit`: merged with others into one device task. */
export interface LeaseGrant {
  leaseId: string
  deviceId: string
  sdkUuid: string | null
  instanceType: 'aws' | 'user' | null
  unit?: z.infer<typeof MergedUnit>
}

/** A lease granted at `at` and recorded only with the attempt's outcome. */
export type DeferredLease = LeaseGrant & { at: string }

/** Which part of a merged device task an outcome is for: the device task's id, the inputs of each part, this part's index. */
export interface Share {
  unit: string
  sizes: number[]
  index: number
}

interface Lease {
  id: string
  deviceId: string
  sdkUuid: string | null
  instanceType: 'aws' | 'user' | null
}

export type TaskStatus = 'new' | 'queued' | 'leased' | 'completed' | 'failed' | 'cancelled'

/** A run's result held for validation. */
export interface HeldRun {
  leaseId: string
  deviceId: string
  sdkUuid: string | null
  instanceType: 'aws' | 'user' | null
  outputs: z.infer<typeof TensorData>[]
  metrics: z.infer<typeof Metrics>
}

export interface TaskState {
  status: TaskStatus
  /** As queued: its inputs may be in a blob (`inputCount` counts them either way). */
  spec: QueuedSpec | undefined
  attempts: number
  lease: Lease | undefined
  /** Results waiting for another run to agree (validation), in the order they came. */
  held: HeldRun[]
  /** Why results are held (set by the first held result). */
  check?: 'quorum' | 'spot'
  /** Devices that failed an attempt of it (it goes to them again only when no other device can take it). */
  failedOn: string[]
}

export const taskStream = (taskId: string) => `task-${taskId}`

export const taskDecider: Decider<TaskCommand, TaskEvent, TaskState> = {
  initialState: () => ({ status: 'new', spec: undefined, attempts: 0, lease: undefined, held: [], failedOn: [] }),

  evolve(state, event) {
    switch (event.type) {
      case 'TaskQueued':
        return { ...state, status: 'queued', spec: event.data }
      case 'TaskLeased':
        return {
          ...state,
          status: 'leased',
          attempts: event.data.attempt,
          lease: { id: event.data.lease_id, deviceId: event.data.device_id, sdkUuid: event.data.sdk_uuid, instanceType: event.data.instance_type },
        }
      case 'TaskCompleted':
        return { ...state, status: 'completed', lease: undefined }
      case 'TaskResultHeld': {
        const d = event.data
        const run = { leaseId: d.lease_id, deviceId: d.device_id, sdkUuid: d.sdk_uuid, instanceType: d.instance_type, outputs: d.outputs, metrics: d.metrics }
        return { ...state, status: 'queued', lease: undefined, held: [...state.held, run], check: state.check ?? d.check }
      }
      case 'TaskValidated':
        return state
      case 'TaskAttemptFailed':
        return { ...state, status: event.data.requeued ? 'queued' : state.status, lease: undefined, failedOn: [...state.failedOn, event.data.device_id] }
      case 'TaskLeaseReturned':
        return { ...state, status: 'queued', attempts: state.attempts - 1, lease: undefined }
      case 'TaskFailed':
        return { ...state, status: 'failed', lease: undefined }
      case 'TaskCancelled':
        return { ...state, status: 'cancelled', lease: undefined }
    }
  },

  decide(command, state) {
    if ((command.type === 'CompleteTask' || command.type === 'FailAttempt') && command.record) {
      // the lease first (if the task is still queued: else the lease is not current, and the outcome is refused below)
      const { record, ...outcome } = command
      const spec = requireSpec(state)
      if (state.status !== 'queued' || state.held.length > 0) throw new DomainError('STALE_LEASE', `lease ${record.leaseId} is not the task's current lease (the task is ${state.status})`)
      const lease = leased(spec, state.attempts + 1, record, record.at)
      return [lease, ...taskDecider.decide(outcome, taskDecider.evolve(state, lease))]
    }
    switch (command.type) {
      case 'QueueTask': {
        if (state.status !== 'new') throw new DomainError('CONFLICT', `task ${command.task.task_id} already exists`)
        if (!oneInputsForm(command.task)) throw new DomainError('VALIDATION_ERROR', `task ${command.task.task_id} must have either inputs or inputs_blob`)
        const queued: TaskEvent = { type: 'TaskQueued', data: { ...command.task, queued_at: command.at } }
        if (!command.lease) return [queued]
        return [queued, leased(command.task, 1, command.lease, command.at)]
      }
      case 'LeaseTask': {
        const spec = requireSpec(state)
        if (state.status !== 'queued') throw new DomainError('CONFLICT', `task ${spec.task_id} is ${state.status}, not queued`)
        return [leased(spec, state.attempts + 1, command, command.at)]
      }
      case 'CompleteTask': {
        const spec = requireSpec(state)
        const lease = currentLease(state, command.leaseId)
        const data = attemptRef(spec, lease)
        if (command.outputs.length !== inputCount(spec)) {
          throw new DomainError('VALIDATION_ERROR', `task ${spec.task_id} has ${inputCount(spec)} inputs but the result has ${command.outputs.length} outputs`)
        }
        const metering = meter(command.metrics, command.observed, command.share)
        // once a result is held, every later run's result is compared, whatever device it came from
        const check = state.check ?? checkRequired(spec.validation, spec.task_id, lease.instanceType)
        if (command.outputs_blob && command.outputs_blob.count !== command.outputs.length) {
          throw new DomainError('VALIDATION_ERROR', `task ${spec.task_id}: the outputs blob holds ${command.outputs_blob.count} outputs, the result ${command.outputs.length}`)
        }
        const outputs = command.outputs_blob ? { outputs_blob: command.outputs_blob } : { outputs: command.outputs }
        if (!check) return [{ type: 'TaskCompleted', data: { ...data, ...outputs, ...metering, validated: false, failed_on: state.failedOn, completed_at: command.at } }]
        return validate(spec, state, { ...data, outputs: command.outputs, ...metering }, check, command.at)
      }
      case 'FailAttempt': {
        const spec = requireSpec(state)
        const data = attemptRef(spec, currentLease(state, command.leaseId))
        // a run whose result is held was not a failure: only failed attempts count against max_attempts
        const requeued = state.attempts - state.held.length < spec.max_attempts
        const metering = command.metrics ? meter(command.metrics, command.observed, command.share) : { metrics: null, observed: command.observed ?? null, claimed_metrics: null, metering_clamped: false, merged: null }
        const failed = { type: 'TaskAttemptFailed' as const, data: { ...data, reason: command.reason, ...metering, requeued, failed_at: command.at } }
        if (requeued) return [failed]
        const reason = `failed after ${state.attempts} attempt${state.attempts === 1 ? '' : 's'}; last: ${command.reason}`
        return [failed, { type: 'TaskFailed', data: { task_id: spec.task_id, job_id: spec.job_id, reason, failed_at: command.at } }]
      }
      case 'ReturnLease': {
        const spec = requireSpec(state)
        const lease = currentLease(state, command.leaseId)
        return [{ type: 'TaskLeaseReturned', data: { task_id: spec.task_id, job_id: spec.job_id, lease_id: lease.id, device_id: lease.deviceId, reason: command.reason, returned_at: command.at } }]
      }
      case 'CancelTask': {
        const spec = requireSpec(state)
        if (state.status === 'completed' || state.status === 'failed') throw new DomainError('CANNOT_CANCEL', `task ${spec.task_id} is already ${state.status}`)
        if (state.status === 'cancelled') return []
        return [{ type: 'TaskCancelled', data: { task_id: spec.task_id, job_id: spec.job_id, lease_id: state.lease?.id ?? null, device_id: state.lease?.deviceId ?? null, cancelled_at: command.at } }]
      }
      case 'FailTask': {
        const spec = requireSpec(state)
        if (state.status !== 'queued' && state.status !== 'leased') throw new DomainError('CONFLICT', `task ${spec.task_id} is already ${state.status}`)
        return [{ type: 'TaskFailed', data: { task_id: spec.task_id, job_id: spec.job_id, reason: command.reason, failed_at: command.at } }]
      }
      default: {
        const unknown: never = command
        throw new Error(`unknown command ${JSON.stringify(unknown)}`)
      }
    }
  },

  parse: ({ type, data }) => TaskEvent.parse({ type, data: upcast(type, data) }),
}

function leased(spec: QueuedSpec, attempt: number, grant: LeaseGrant, at: string): TaskEvent {
  return {
    type: 'TaskLeased',
    data: { task_id: spec.task_id, lease_id: grant.leaseId, device_id: grant.deviceId, sdk_uuid: grant.sdkUuid, instance_type: grant.instanceType, attempt, unit: grant.unit ?? null, leased_at: at },
  }
}

/**
 * The billed metrics of an attempt: the claim, bounded by what the server observed (src/domain/metering.ts);
 * for a part of a merged device task, its share by inputs of the whole task's bounded claim.
 */
function meter(claimed: z.infer<typeof Metrics>, observed: Observed | undefined, share: Share | undefined) {
  const { metrics: whole, clamped } = observed ? boundMetrics(claimed, observed) : { metrics: claimed, clamped: false }
  const merged = share && share.sizes.length > 1 ? { unit: share.unit, index: share.index, sizes: share.sizes, claimed } : null
  return { metrics: merged ? splitMetrics(whole, merged.sizes, merged.index) : whole, observed: observed ?? null, claimed_metrics: clamped ? claimed : null, metering_clamped: clamped, merged }
}

type RunResult = ReturnType<typeof attemptRef> & { outputs: z.infer<typeof TensorData>[] } & ReturnType<typeof meter> & { metrics: z.infer<typeof Metrics> }

/**
 * A result that must be checked. With no held result that agrees, it is held (the task goes back to the
 * queue for another device); when it agrees with one, the earliest run it agrees with is accepted (its
 * outputs delivered, its attempt billed), the runs that agree with it are replicas, the others outvoted.
 * After `maxRuns` runs without two agreeing, the task fails and every run is outvoted.
 */
function validate(spec: QueuedSpec, state: TaskState, run: RunResult, check: 'quorum' | 'spot', at: string): TaskEvent[] {
  const tolerance = spec.validation.tolerance
  const match = state.held.find((h) => outputsAgree(h.outputs, run.outputs, tolerance))
  const base = { task_id: spec.task_id, customer_id: spec.customer_id, job_id: spec.job_id, project_id: spec.project_id, inputs: inputCount(spec), validated_at: at }
  const asRun = (h: { leaseId: string; deviceId: string; sdkUuid: string | null; instanceType: 'aws' | 'user' | null; metrics: z.infer<typeof Metrics> }, verdict: 'accepted' | 'agreed' | 'outvoted') => ({
    lease_id: h.leaseId, device_id: h.deviceId, sdk_uuid: h.sdkUuid, instance_type: h.instanceType, metrics: h.metrics, verdict,
  })
  const current = { leaseId: run.lease_id, deviceId: run.device_id, sdkUuid: run.sdk_uuid, instanceType: run.instance_type, outputs: run.outputs, metrics: run.metrics }
  if (match) {
    const runs = [...state.held, current].map((h) =>
      asRun(h, h === match ? 'accepted' : outputsAgree(match.outputs, h.outputs, tolerance) ? 'agreed' : 'outvoted'),
    )
    const accepted = { ...run, lease_id: match.leaseId, device_id: match.deviceId, sdk_uuid: match.sdkUuid, instance_type: match.instanceType, outputs: match.outputs, metrics: match.metrics }
    // the accepted run's metering as it was recorded when it was held
    return [
      { type: 'TaskValidated', data: { ...base, agreed: true, runs } },
      { type: 'TaskCompleted', data: { ...accepted, observed: null, claimed_metrics: null, metering_clamped: false, merged: null, validated: true, failed_on: state.failedOn, completed_at: at } },
    ]
  }
  const held: TaskEvent = { type: 'TaskResultHeld', data: { ...run, check, disagrees_with: state.held.map((h) => h.deviceId), held_at: at } }
  if (state.held.length + 1 < VALIDATION_DEFAULTS.maxRuns) return [held]
  const runs = [...state.held, current].map((h) => asRun(h, 'outvoted'))
  return [
    held,
    { type: 'TaskValidated', data: { ...base, agreed: false, runs } },
    { type: 'TaskFailed', data: { task_id: spec.task_id, job_id: spec.job_id, reason: `no two of ${runs.length} runs on different devices agreed on the result`, failed_at: at } },
  ]
}

function requireSpec(state: TaskState): QueuedSpec {
  if (!state.spec) throw new DomainError('NOT_FOUND', 'task not found')
  return state.spec
}

function attemptRef(spec: QueuedSpec, lease: Lease) {
  return {
    task_id: spec.task_id,
    customer_id: spec.customer_id,
    job_id: spec.job_id,
    project_id: spec.project_id,
    lease_id: lease.id,
    device_id: lease.deviceId,
    sdk_uuid: lease.sdkUuid,
    instance_type: lease.instanceType,
    inputs: inputCount(spec),
  }
}

/** Fencing: only the lease the task is under now may finish it. */
function currentLease(state: TaskState, leaseId: string): Lease {
  if (state.status !== 'leased' || !state.lease || state.lease.id !== leaseId) {
    throw new DomainError('STALE_LEASE', `lease ${leaseId} is not the task's current lease (the task is ${state.status})`)
  }
  return state.lease
}

/**
 * Events written before tasks carried several inputs: `input` became `inputs: [input]`, and `output`
 * became `outputs: [output]`.
 */
function upcast(type: string, data: unknown): unknown {
  if (typeof data !== 'object' || data === null) return data
  const old = data as Record<string, unknown>
  if (type === 'TaskQueued' && old.inputs === undefined && old.input !== undefined) {
    const { input, ...rest } = old
    return { ...rest, inputs: [input] }
  }
  if (type === 'TaskCompleted' && old.outputs === undefined && old.output !== undefined) {
    const { output, ...rest } = old
    return { ...rest, outputs: [output] }
  }
  return data
}
