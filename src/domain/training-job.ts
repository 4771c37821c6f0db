import { z } from 'zod'
import { LOSSES, OPTIMIZERS, TRAIN_SYNC_MODES } from '../protocol/frames.js'
import { AGGREGATIONS, ASYNC_NORM_WINDOW, type Robustness } from './aggregation.js'
import type { Decider } from './decider.js'
import { DomainError } from './errors.js'
import { MODEL_FORMATS } from './model.js'

/**
 * A federated training job (stream `training-<jobId>`): submitted, then given devices and taken off them
 * by the scheduler, one event per aggregated round (its weights are a blob), paused and resumed, and
 * finished by reaching its target accuracy or its epochs (which registers the trained model), by a
 * cancel, or by a failure. Its status is derived: a job that is not paused or finished is `running` while
 * it has devices and `queued` while it has none.
 */
export const TrainingSpec = z.object({
  job_id: z.string(),
  customer_id: z.string(),
  model_id: z.string(),
  model_name: z.string(),
  model_checksum: z.string(),
  /** The model's format, which decides the devices that may train it (absent in jobs recorded before TorchScript training: onnx). */
  model_format: z.enum(MODEL_FORMATS).optional(),
  data_config: z.object({
    type: z.enum(['stream', 'dataset']),
    total_samples: z.number().int(),
    batch_size: z.number().int(),
    dataset_id: z.string().nullable(),
    dataset_checksum: z.string().nullable(),
    dataset_format: z.enum(['csv', 'jsonl']).nullable(),
    validation_fraction: z.number(),
    /** Stream jobs: clusters of each class in the synthetic task (1: linearly separable). */
    clusters_per_class: z.number().int().default(1),
  }),
  training_config: z.object({
    epochs: z.number().int(),
    learning_rate: z.number(),
    optimizer: z.enum(OPTIMIZERS),
    target_accuracy: z.number().nullable(),
    sync_mode: z.enum(TRAIN_SYNC_MODES),
    local_steps: z.number().int(),
    sync_interval_ms: z.number().int(),
    loss: z.enum(LOSSES),
    /** How rounds are aggregated (absent in jobs submitted before robust aggregation: fedavg, no clipping). */
    aggregation: z.enum(AGGREGATIONS).optional(),
    trim_fraction: z.number().optional(),
    clip_norm: z.number().nullable().optional(),
    clip_factor: z.number().nullable().optional(),
  }),
  resource_config: z.object({
    min_devices: z.number().int(),
    max_devices: z.number().int().nullable(),
    prefer_gpu: z.boolean(),
    sdk_types: z.array(z.string()).nullable(),
    min_sdk_version: z.string().nullable(),
    /** The kinds of device it may train on (absent: any). */
    instance_types: z.array(z.enum(['aws', 'user'])).optional(),
  }),
  /** total_samples * epochs: its share of the training devices. */
  weight: z.number(),
  total_batches: z.number().int(),
  /** Seeds the synthetic task, the dataset split and every device's sample stream. */
  seed: z.number().int(),
  submitted_at: z.string(),
})
export type TrainingSpec = z.infer<typeof TrainingSpec>

export const INSTANCE_TYPES = ['aws', 'user'] as const
export const DEFAULT_TRIM_FRACTION = 0.2
export const DEFAULT_CLIP_FACTOR = 2

/** The aggregation a job's rounds use; a job recorded before robust aggregation used fedavg, unclipped. */
export function robustnessOf(spec: TrainingSpec): Robustness {
  const config = spec.training_config
  return { aggregation: config.aggregation ?? 'fedavg', trim_fraction: config.trim_fraction ?? DEFAULT_TRIM_FRACTION, clip_norm: config.clip_norm ?? null, clip_factor: config.clip_factor ?? null }
}

/** The format of the model a job trains (a job recorded before the field: onnx, the only one then). */
export const modelFormatOf = (spec: TrainingSpec) => spec.model_format ?? 'onnx'

/** The device kinds a job may train on (a job recorded before the field: both). */
export const instanceTypesOf = (spec: TrainingSpec) => spec.resource_config.instance_types ?? [...INSTANCE_TYPES]

const Contribution = z.object({
  device_id: z.string(),
  /** Its SDK installation: usage is billed by it. */
  sdk_uuid: z.string(),
  instance_type: z.enum(['aws', 'user']),
  samples: z.number().int(),
  steps: z.number().int(),
  loss: z.number(),
  /** Rounds the update's starting weights were behind (async mode; 0 in the sync modes). */
  staleness: z.number().int(),
  cpu_ms: z.number(),
  gpu_ms: z.number(),
  /** Wall time of the device's local steps (0 when it did not say). */
  wall_ms: z.number().default(0),
  power_watts: z.number(),
  /** What the device claimed, when more than it was credited (samples capped at local_steps × batch_size; steps derived from the credited samples). */
  claimed_samples: z.number().int().optional(),
  claimed_steps: z.number().int().optional(),
  /** L2 norm of its change from the base weights before clipping, and whether it was clipped (absent before robust aggregation). */
  delta_norm: z.number().optional(),
  clipped: z.boolean().optional(),
})
export type Contribution = z.infer<typeof Contribution>

export const RoundData = z.object({
  job_id: z.string(),
  customer_id: z.string(),
  round: z.number().int(),
  /** The aggregated weights, in the blob store. */
  weights_sha256: z.string(),
  /** Mean training loss the devices reported, weighted by samples. */
  loss: z.number(),
  validation_loss: z.number(),
  /** On the held-out validation set, 0..1. */
  accuracy: z.number(),
  samples: z.number().int(),
  steps: z.number().int(),
  batches_completed: z.number().int(),
  epoch: z.number().int(),
  contributions: z.array(Contribution),
  /** Since the previous round (or since the job got its devices). */
  wall_ms: z.number(),
  at: z.string(),
  /** The rule that aggregated it, and the clip bound of its updates' changes (absent before robust aggregation: fedavg, none). */
  aggregation: z.enum(AGGREGATIONS).optional(),
  clip_bound: z.number().nullable().optional(),
  /** Async: the share of the way the update moved the weights. */
  mix: z.number().optional(),
})
export type RoundData = z.infer<typeof RoundData>

const AssignedDevice = z.object({ device_id: z.string(), instance_type: z.enum(['aws', 'user']), stream_seed: z.number().int() })

const TrainingSubmitted = z.object({ type: z.literal('TrainingSubmitted'), data: TrainingSpec })
const TrainingDevicesAssigned = z.object({ type: z.literal('TrainingDevicesAssigned'), data: z.object({ job_id: z.string(), devices: z.array(AssignedDevice), at: z.string() }) })
const TrainingDevicesReleased = z.object({
  type: z.literal('TrainingDevicesReleased'),
  data: z.object({ job_id: z.string(), device_ids: z.array(z.string()), reason: z.string(), at: z.string() }),
})
const TrainingRoundCompleted = z.object({ type: z.literal('TrainingRoundCompleted'), data: RoundData })
const JobAt = z.object({ job_id: z.string(), at: z.string() })
const TrainingPaused = z.object({ type: z.literal('TrainingPaused'), data: JobAt })
const TrainingResumed = z.object({ type: z.literal('TrainingResumed'), data: JobAt })
const TrainingCancelled = z.object({ type: z.literal('TrainingCancelled'), data: JobAt })
const TrainingCompleted = z.object({
  type: z.literal('TrainingCompleted'),
  data: z.object({ job_id: z.string(), reason: z.enum(['target_accuracy', 'epochs']), trained_model_id: z.string(), accuracy: z.number(), loss: z.number(), at: z.string() }),
})
/** An update the coordinator would not take (a second one for a round, or async updates too frequent): counted, never aggregated. */
export const REFUSALS = ['duplicate_round', 'too_frequent'] as const
const TrainingUpdateRefused = z.object({
  type: z.literal('TrainingUpdateRefused'),
  data: z.object({ job_id: z.string(), device_id: z.string(), base_round: z.number().int(), round: z.number().int(), reason: z.enum(REFUSALS), message: z.string(), at: z.string() }),
})
const TrainingFailed = z.object({ type: z.literal('TrainingFailed'), data: z.object({ job_id: z.string(), error: z.string(), at: z.string() }) })

const TrainingEvent = z.discriminatedUnion('type', [
  TrainingSubmitted,
  TrainingDevicesAssigned,
  TrainingDevicesReleased,
  TrainingRoundCompleted,
  TrainingPaused,
  TrainingResumed,
  TrainingCancelled,
  TrainingCompleted,
  TrainingFailed,
  TrainingUpdateRefused,
])
export type TrainingEvent = z.infer<typeof TrainingEvent>
export const trainingEventTypes = TrainingEvent.options.map((o) => o.shape.type.value)

export type TrainingCommand =
  | { type: 'SubmitTraining'; spec: TrainingSpec }
  | { type: 'AssignDevices'; devices: z.infer<typeof AssignedDevice>[]; at: string }
  | { type: 'ReleaseDevices'; deviceIds: string[]; reason: string; at: string }
  | { type: 'CompleteRound'; round: RoundData }
  | { type: 'PauseTraining'; customerId: string; at: string }
  | { type: 'ResumeTraining'; customerId: string; at: string }
  | { type: 'CancelTraining'; customerId: string; at: string }
  | { type: 'CompleteTraining'; reason: 'target_accuracy' | 'epochs'; trainedModelId: string; at: string }
  | { type: 'FailTraining'; error: string; at: string }
  | { type: 'RefuseUpdate'; deviceId: string; baseRound: number; reason: (typeof REFUSALS)[number]; message: string; at: string }

export type TrainingPhase = 'active' | 'paused' | 'completed' | 'cancelled' | 'failed'
export type TrainingStatus = 'queued' | 'running' | 'paused' | 'completed' | 'cancelled' | 'failed'

export interface TrainingState {
  spec: TrainingSpec | undefined
  phase: TrainingPhase
  devices: string[]
  round: number
  batchesCompleted: number
  /** Weights of the last round (undefined before the first: the model file's own). */
  weightsSha256: string | undefined
  bestLoss: number | undefined
  accuracy: number | undefined
  trainedModelId: string | undefined
  refusedUpdates: number
  /** Why the job failed (a failed job only). */
  error?: string
  /** Async: the change norms of the last updates (before clipping), for the adaptive clip bound. */
  recentNorms: number[]
}

export const trainingStream = (jobId: string) => `training-${jobId}`

/** What the API shows: paused and finished jobs say so; an active one runs while it has devices. */
export function trainingStatus(phase: TrainingPhase, deviceCount: number): TrainingStatus {
  if (phase !== 'active') return phase
  return deviceCount > 0 ? 'running' : 'queued'
}

export const isFinished = (phase: TrainingPhase) => phase === 'completed' || phase === 'cancelled' || phase === 'failed'

export const trainingDecider: Decider<TrainingCommand, TrainingEvent, TrainingState> = {
  initialState: () => ({
    spec: undefined,
    phase: 'active',
    devices: [],
    round: 0,
    batchesCompleted: 0,
    weightsSha256: undefined,
    bestLoss: undefined,
    accuracy: undefined,
    trainedModelId: undefined,
    refusedUpdates: 0,
    recentNorms: [],
  }),

  evolve(state, event) {
    switch (event.type) {
      case 'TrainingSubmitted':
        return { ...state, spec: event.data }
      case 'TrainingDevicesAssigned':
        return { ...state, devices: [...state.devices, ...event.data.devices.map((d) => d.device_id).filter((id) => !state.devices.includes(id))] }
      case 'TrainingDevicesReleased':
        return { ...state, devices: state.devices.filter((id) => !event.data.device_ids.includes(id)) }
      case 'TrainingRoundCompleted':
        return {
          ...state,
          round: event.data.round,
          batchesCompleted: event.data.batches_completed,
          weightsSha256: event.data.weights_sha256,
          bestLoss: state.bestLoss === undefined ? event.data.loss : Math.min(state.bestLoss, event.data.loss),
          accuracy: event.data.accuracy,
          recentNorms: [...state.recentNorms, ...event.data.contributions.flatMap((c) => (c.delta_norm === undefined ? [] : [c.delta_norm]))].slice(-ASYNC_NORM_WINDOW),
        }
      case 'TrainingUpdateRefused':
        return { ...state, refusedUpdates: state.refusedUpdates + 1 }
      case 'TrainingPaused':
        return { ...state, phase: 'paused' }
      case 'TrainingResumed':
        return { ...state, phase: 'active' }
      case 'TrainingCancelled':
        return { ...state, phase: 'cancelled', devices: [] }
      case 'TrainingCompleted':
        return { ...state, phase: 'completed', devices: [], trainedModelId: event.data.trained_model_id }
      case 'TrainingFailed':
        return { ...state, phase: 'failed', devices: [], error: event.data.error }
    }
  },

  decide(command, state) {
    switch (command.type) {
      case 'SubmitTraining':
        if (state.spec) throw new DomainError('CONFLICT', `training job ${command.spec.job_id} already exists`)
        return [{ type: 'TrainingSubmitted', data: command.spec }]
      case 'AssignDevices': {
        const spec = exists(state)
        if (state.phase !== 'active') throw new DomainError('CONFLICT', `training job ${spec.job_id} is ${state.phase}`)
        const devices = command.devices.filter((d) => !state.devices.includes(d.device_id))
        return devices.length === 0 ? [] : [{ type: 'TrainingDevicesAssigned', data: { job_id: spec.job_id, devices, at: command.at } }]
      }
      case 'ReleaseDevices': {
        const spec = exists(state)
        const deviceIds = command.deviceIds.filter((id) => state.devices.includes(id))
        return deviceIds.length === 0 ? [] : [{ type: 'TrainingDevicesReleased', data: { job_id: spec.job_id, device_ids: deviceIds, reason: command.reason, at: command.at } }]
      }
      case 'CompleteRound': {
        const spec = exists(state)
        if (state.phase !== 'active') throw new DomainError('CONFLICT', `training job ${spec.job_id} is ${state.phase}`)
        if (command.round.round !== state.round + 1) throw new DomainError('CONFLICT', `round ${command.round.round} does not follow round ${state.round}`)
        return [{ type: 'TrainingRoundCompleted', data: command.round }]
      }
      case 'PauseTraining': {
        const spec = owned(state, command.customerId)
        if (state.phase !== 'active') throw new DomainError('CANNOT_PAUSE', `training job ${spec.job_id} is ${statusOf(state)}; only a queued or running job can be paused`)
        return [...release(state, 'job paused', command.at), { type: 'TrainingPaused', data: { job_id: spec.job_id, at: command.at } }]
      }
      case 'ResumeTraining': {
        const spec = owned(state, command.customerId)
        if (state.phase !== 'paused') throw new DomainError('CANNOT_RESUME', `training job ${spec.job_id} is ${statusOf(state)}; only a paused job can be resumed`)
        return [{ type: 'TrainingResumed', data: { job_id: spec.job_id, at: command.at } }]
      }
      case 'CancelTraining': {
        const spec = owned(state, command.customerId)
        if (isFinished(state.phase)) throw new DomainError('CANNOT_CANCEL', `training job ${spec.job_id} is already ${statusOf(state)}`)
        return [{ type: 'TrainingCancelled', data: { job_id: spec.job_id, at: command.at } }]
      }
      case 'CompleteTraining': {
        const spec = exists(state)
        if (isFinished(state.phase)) throw new DomainError('CONFLICT', `training job ${spec.job_id} is already ${state.phase}`)
        const data = { job_id: spec.job_id, reason: command.reason, trained_model_id: command.trainedModelId, accuracy: state.accuracy ?? 0, loss: state.bestLoss ?? 0, at: command.at }
        return [{ type: 'TrainingCompleted', data }]
      }
      case 'FailTraining': {
        const spec = exists(state)
        if (isFinished(state.phase)) return []
        return [{ type: 'TrainingFailed', data: { job_id: spec.job_id, error: command.error, at: command.at } }]
      }
      case 'RefuseUpdate': {
        const spec = exists(state)
        const data = { job_id: spec.job_id, device_id: command.deviceId, base_round: command.baseRound, round: state.round, reason: command.reason, message: command.message, at: command.at }
        return [{ type: 'TrainingUpdateRefused', data }]
      }
      default: {
        const unknown: never = command
        throw new Error(`unknown command ${JSON.stringify(unknown)}`)
      }
    }
  },

  parse: ({ type, data }) => TrainingEvent.parse({ type, data }),
}

/** The job's status for a refusal; a failed job says why it failed. */
function statusOf(state: TrainingState): string {
  const status = trainingStatus(state.phase, state.devices.length)
  return state.phase === 'failed' && state.error ? `${status} (${state.error})` : status
}

function exists(state: TrainingState): TrainingSpec {
  if (!state.spec) throw new DomainError('NOT_FOUND', 'training job not found')
  return state.spec
}

/** Another customer's job is reported as missing. */
function owned(state: TrainingState, customerId: string): TrainingSpec {
  const spec = exists(state)
  if (spec.customer_id !== customerId) throw new DomainError('NOT_FOUND', 'training job not found')
  return spec
}

function release(state: TrainingState, reason: string, at: string): TrainingEvent[] {
  if (state.devices.length === 0) return []
  return [{ type: 'TrainingDevicesReleased', data: { job_id: state.spec!.job_id, device_ids: state.devices, reason, at } }]
}
