import { z } from 'zod'
import { Metrics } from '../protocol/frames.js'
import { numberArray } from '../protocol/numbers.js'
import type { Decider } from './decider.js'
import { DomainError } from './errors.js'

/**
 * One unit of work for one device: queued, leased to a device (a lease id and a deadline), then completed,
 * or its attempt failed (the device reported an error, vanished, or let the lease expire) and it is queued
 * again, up to `max_attempts`, after which it fails for good. Results carry the lease id: only the current
 * lease may complete the task (fencing), so a device that was given up on cannot overwrite the retry.
 */
const TensorData = z.object({ data: numberArray(), shape: numberArray({ int: true }) })

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
})
export type TaskSpec = z.infer<typeof TaskSpec>

const TaskQueued = z.object({ type: z.literal('TaskQueued'), data: TaskSpec.extend({ queued_at: z.string() }) })
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
const TaskCompleted = z.object({
  type: z.literal('TaskCompleted'),
  /** One output per input, in order. */
  data: AttemptRef.extend({ outputs: z.array(TensorData), metrics: Metrics, completed_at: z.string() }),
})
const TaskAttemptFailed = z.object({
  type: z.literal('TaskAttemptFailed'),
  data: AttemptRef.extend({
    reason: z.string(),
    metrics: Metrics.nullable(),
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

const TaskEvent = z.discriminatedUnion('type', [TaskQueued, TaskLeased, TaskCompleted, TaskAttemptFailed, TaskLeaseReturned, TaskFailed, TaskCancelled])
export type TaskEvent = z.infer<typeof TaskEvent>
export const taskEventTypes = TaskEvent.options.map((o) => o.shape.type.value)

export type TaskCommand =
  /** Queues a task; with `lease`, a device took it at once (both events in one append). */
  | { type: 'QueueTask'; task: TaskSpec; at: string; lease?: LeaseGrant }
  | ({ type: 'LeaseTask'; at: string } & LeaseGrant)
  | { type: 'CompleteTask'; leaseId: string; outputs: z.infer<typeof TensorData>[]; metrics: z.infer<typeof Metrics>; at: string }
  | { type: 'FailAttempt'; leaseId: string; reason: string; metrics: z.infer<typeof Metrics> | null; at: string }
  | { type: 'ReturnLease'; leaseId: string; reason: string; at: string }
  | { type: 'CancelTask'; at: string }

/** A device taking a task under a lease. */
export interface LeaseGrant {
  leaseId: string
  deviceId: string
  sdkUuid: string | null
  instanceType: 'aws' | 'user' | null
}

interface Lease {
  id: string
  deviceId: string
  sdkUuid: string | null
  instanceType: 'aws' | 'user' | null
}

export type TaskStatus = 'new' | 'queued' | 'leased' | 'completed' | 'failed' | 'cancelled'

export interface TaskState {
  status: TaskStatus
  spec: TaskSpec | undefined
  attempts: number
  lease: Lease | undefined
}

export const taskStream = (taskId: string) => `task-${taskId}`

export const taskDecider: Decider<TaskCommand, TaskEvent, TaskState> = {
  initialState: () => ({ status: 'new', spec: undefined, attempts: 0, lease: undefined }),

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
      case 'TaskAttemptFailed':
        return { ...state, status: event.data.requeued ? 'queued' : state.status, lease: undefined }
      case 'TaskLeaseReturned':
        return { ...state, status: 'queued', attempts: state.attempts - 1, lease: undefined }
      case 'TaskFailed':
        return { ...state, status: 'failed', lease: undefined }
      case 'TaskCancelled':
        return { ...state, status: 'cancelled', lease: undefined }
    }
  },

  decide(command, state) {
    switch (command.type) {
      case 'QueueTask': {
        if (state.status !== 'new') throw new DomainError('CONFLICT', `task ${command.task.task_id} already exists`)
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
        const data = attemptRef(spec, currentLease(state, command.leaseId))
        if (command.outputs.length !== spec.inputs.length) {
          throw new DomainError('VALIDATION_ERROR', `task ${spec.task_id} has ${spec.inputs.length} inputs but the result has ${command.outputs.length} outputs`)
        }
        return [{ type: 'TaskCompleted', data: { ...data, outputs: command.outputs, metrics: command.metrics, completed_at: command.at } }]
      }
      case 'FailAttempt': {
        const spec = requireSpec(state)
        const data = attemptRef(spec, currentLease(state, command.leaseId))
        const requeued = state.attempts < spec.max_attempts
        const failed = { type: 'TaskAttemptFailed' as const, data: { ...data, reason: command.reason, metrics: command.metrics, requeued, failed_at: command.at } }
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
      default: {
        const unknown: never = command
        throw new Error(`unknown command ${JSON.stringify(unknown)}`)
      }
    }
  },

  parse: ({ type, data }) => TaskEvent.parse({ type, data: upcast(type, data) }),
}

function leased(spec: TaskSpec, attempt: number, grant: LeaseGrant, at: string): TaskEvent {
  return {
    type: 'TaskLeased',
    data: { task_id: spec.task_id, lease_id: grant.leaseId, device_id: grant.deviceId, sdk_uuid: grant.sdkUuid, instance_type: grant.instanceType, attempt, leased_at: at },
  }
}

function requireSpec(state: TaskState): TaskSpec {
  if (!state.spec) throw new DomainError('NOT_FOUND', 'task not found')
  return state.spec
}

function attemptRef(spec: TaskSpec, lease: Lease) {
  return {
    task_id: spec.task_id,
    customer_id: spec.customer_id,
    job_id: spec.job_id,
    project_id: spec.project_id,
    lease_id: lease.id,
    device_id: lease.deviceId,
    sdk_uuid: lease.sdkUuid,
    instance_type: lease.instanceType,
    inputs: spec.inputs.length,
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
