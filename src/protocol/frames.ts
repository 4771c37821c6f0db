/**
 * The device protocol: every WebSocket frame between a device and the hub, as zod schemas. A frame is one
 * JSON text message `{ "type": ..., ... }`. This file is the one thing the hub and the SDKs share; an SDK in
 * another language can be written from it (and docs/device-protocol.md, which describes it).
 *
 * Versioning: `register.protocol` names the version the device speaks; the hub answers with the version it
 * will use (`registered.protocol`) or closes with code 4400 when it supports none in common. Fields may be
 * added within a version (receivers ignore unknown fields); removing or changing one needs a new version.
 */
import { z } from 'zod'
import { numberArray } from './numbers.js'

export const PROTOCOL_VERSION = 1
/** Most inputs one task may carry (a device advertises its own limit, at most this). */
export const MAX_BATCH_INPUTS = 4096
/** Largest frame the hub accepts, in bytes (a larger one closes the socket with 1009). */
export const MAX_FRAME_BYTES = 16 * 1024 * 1024
/** Largest frame a socket may send before it has registered (a larger one closes it with 1009). */
export const MAX_UNREGISTERED_FRAME_BYTES = 64 * 1024

/**
 * Frame limits per device (docs/device-protocol.md §4.4). Heartbeats beyond `heartbeatsPerInterval` in one
 * heartbeat interval are dropped (not stored, no lease extended); the `droppedHeartbeatsBeforeClose`th dropped
 * one in an interval closes the socket with 4429. More than `maxFramesPerSecond` frames of any kind in one
 * second close it with 4429 too; a frame over `maxUnregisteredFrameBytes` before registering, with 1009.
 */
export const HUB_LIMITS = {
  heartbeatsPerInterval: 5,
  droppedHeartbeatsBeforeClose: 50,
  maxFramesPerSecond: 5000,
  maxUnregisteredFrameBytes: MAX_UNREGISTERED_FRAME_BYTES,
} as const

export const PLATFORMS = ['nodejs', 'python', 'windows'] as const
export const INSTANCE_TYPES = ['aws', 'user'] as const
export const LOG_LEVELS = ['debug', 'info', 'warn', 'error'] as const

const Id = z.string().min(1).max(128)
const Tensor = z.object({
  data: numberArray({ max: 16_000_000, float32: true }),
  shape: numberArray({ int: true, atLeast: 0, min: 1, max: 16 }),
})
export type Tensor = z.infer<typeof Tensor>

export const Hardware = z.object({
  cpu_model: z.string().max(256),
  cpu_cores: z.number().int().min(1).max(4096),
  memory_mb: z.number().int().min(1),
  gpus: z.array(z.object({ name: z.string().max(256), memory_mb: z.number().int().min(0) })).max(64).default([]),
})
export type Hardware = z.infer<typeof Hardware>

export const Capabilities = z.object({
  /** Model formats the device can run. */
  formats: z.array(z.enum(['onnx', 'torchscript'])).min(1),
  gpu: z.boolean().default(false),
  can_train: z.boolean().default(false),
  /**
   * Model formats it can train (with can_train); absent: `["onnx"]`, what every Node device trains. A Python
   * device that trains TorchScript says `["torchscript"]`. Training jobs go only to devices that train their format.
   */
  train_formats: z.array(z.enum(['onnx', 'torchscript'])).min(1).max(2).optional(),
  /** Tasks it runs at once. */
  max_concurrent_tasks: z.number().int().min(1).max(256).default(1),
  /** Most inputs it takes in one task (`inputs` of a task frame); 1: single inputs only (`input`). */
  max_batch_inputs: z.number().int().min(1).max(MAX_BATCH_INPUTS).default(1),
})
export type Capabilities = z.infer<typeof Capabilities>

/** The formats a registered device trains: none without can_train, `train_formats` else (default onnx). */
export function trainFormatsOf(capabilities: Pick<Capabilities, 'can_train' | 'train_formats'>): ('onnx' | 'torchscript')[] {
  const formats: ('onnx' | 'torchscript')[] = capabilities.train_formats ?? ['onnx']
  return capabilities.can_train ? [...new Set(formats)] : []
}

// ---- device -> hub -------------------------------------------------------------------------------------

export const Register = z.object({
  type: z.literal('register'),
  protocol: z.number().int().min(1),
  /** Enrollment secret, when the hub requires one (production); enrolls a `user` device. */
  enrollment_secret: z.string().max(512).optional(),
  /** Enrollment token (`dcp_e_...`) from an operator; its instance type is the device's. Wins over the secret. */
  enrollment_token: z.string().max(512).optional(),
  /** A device that registered before sends its id and token to come back as itself. */
  device_id: Id.optional(),
  sdk_token: z.string().max(512).optional(),
  platform: z.enum(PLATFORMS),
  sdk_version: z.string().min(1).max(64),
  /** Identifies the SDK installation, e.g. `sdk-nodejs-1a2b3c`; usage is reported per SDK UUID. */
  sdk_uuid: z.string().min(1).max(128),
  instance_type: z.enum(INSTANCE_TYPES),
  hardware: Hardware,
  capabilities: Capabilities,
})

/** Most lease ids one heartbeat lists (a device holding more lists some: the list proves nothing missing). */
export const MAX_HEARTBEAT_LEASES = 256

/**
 * An error's message as a device sends it (`task_result.error`, `train_error.error`): at most `max`
 * characters, with any NUL character replaced by U+FFFD, since the hub refuses frames holding one (dcp cannot
 * store it) and the error would be lost with the frame.
 */
export function errorText(error: unknown, max = 4000): string {
  const message = error instanceof Error ? error.message : String(error)
  return message.replaceAll('\u0000', '\ufffd').slice(0, max)
}

export const Heartbeat = z.object({
  type: z.literal('heartbeat'),
  /** 0..1: share of its CPU in use. */
  load: z.number().min(0).max(1),
  memory_used_mb: z.number().min(0).max(1e9),
  /** Estimated power draw in watts (the SDK's estimate: see docs/device-protocol.md). */
  power_watts: z.number().min(0).max(100_000),
  /** Leases the device holds and is working on; the hub extends them (and after a reconnect, ends at once those it held before that the first heartbeat does not list). */
  leases: z.array(Id).max(MAX_HEARTBEAT_LEASES).default([]),
})

/**
 * Bounds on what a device reports. A device is not trusted: a figure the read models cannot hold (a
 * `cpu_ms` of 1e16 is past Postgres' bigint in microseconds) would stop the projection that bills it, for
 * every customer. These are far beyond any real task: 10^10 ms (115 days) of CPU or GPU, 1 TB of data.
 */
export const MAX_REPORTED_MS = 1e10
export const MAX_REPORTED_BYTES = 1e12
const reportedMs = z.number().min(0).max(MAX_REPORTED_MS)

export const Metrics = z.object({
  cpu_ms: reportedMs,
  gpu_ms: reportedMs,
  bytes_in: z.number().int().min(0).max(MAX_REPORTED_BYTES),
  bytes_out: z.number().int().min(0).max(MAX_REPORTED_BYTES),
})
export type Metrics = z.infer<typeof Metrics>

/**
 * A task's outcome. A completed task carries `output` for a task given as `input`, or `outputs` (one per
 * input, in order) for a task given as `inputs`; a failed one carries `error` (the whole task failed).
 */
export const TaskResult = z.object({
  type: z.literal('task_result'),
  task_id: Id,
  lease_id: Id,
  status: z.enum(['completed', 'failed']),
  output: Tensor.optional(),
  outputs: z.array(Tensor).min(1).max(MAX_BATCH_INPUTS).optional(),
  error: z.string().max(4096).optional(),
  metrics: Metrics,
})

export const LogLine = z.object({ ts: z.string().max(64), level: z.enum(LOG_LEVELS), message: z.string().max(8192) })
export type LogLine = z.infer<typeof LogLine>

export const Logs = z.object({
  type: z.literal('logs'),
  request_id: Id,
  lines: z.array(LogLine).max(10_000),
})

/** The device stops taking new tasks (it is shutting down) and finishes what it holds. */
export const Draining = z.object({ type: z.literal('draining') })

// ---- federated training (docs/device-protocol.md §6) --------------------------------------------------

/** Model weights: initializer name -> float32 values, in the binary layout of src/domain/fedavg.ts, base64. */
const Weights = z.string().max(MAX_FRAME_BYTES)

/** Weights a device trained from the round `base_round` weights, with how many samples they saw. */
export const TrainUpdate = z.object({
  type: z.literal('train_update'),
  job_id: Id,
  base_round: z.number().int().min(0),
  weights: Weights,
  samples: z.number().int().min(1).max(1e9),
  steps: z.number().int().min(1).max(1e9),
  /** Mean training loss over the steps (bounded so that a round's mean of them, weighted by samples, stays finite). */
  loss: z.number().min(-1e15).max(1e15),
  /** CPU and GPU time the training used, and the wall time of the local steps (the time its power draw counts for). */
  metrics: z.object({ cpu_ms: reportedMs, gpu_ms: reportedMs, wall_ms: reportedMs.optional() }),
  power_watts: z.number().min(0).max(100_000),
})
export type TrainUpdate = z.infer<typeof TrainUpdate>

/** Async mode: one device's updates must arrive at least this far apart, or the hub refuses them (the Node SDK waits as long). */
export const minUpdateIntervalMs = (syncIntervalMs: number) => Math.floor(syncIntervalMs / 10)

/** Asks for the job's current weights (async mode pulls every `sync_interval_ms`). */
export const WeightsRequest = z.object({ type: z.literal('weights_request'), job_id: Id })

/** The device cannot train for the job (the model or data would not load, the loss diverged): it leaves it. */
export const TrainError = z.object({ type: z.literal('train_error'), job_id: Id, error: z.string().max(4096) })

export const DeviceFrame = z.discriminatedUnion('type', [Register, Heartbeat, TaskResult, Logs, Draining, TrainUpdate, WeightsRequest, TrainError])
export type DeviceFrame = z.infer<typeof DeviceFrame>

// ---- hub -> device -------------------------------------------------------------------------------------

export const Registered = z.object({
  type: z.literal('registered'),
  protocol: z.number().int(),
  device_id: Id,
  /** For `X-SDK-Token` on downloads, and to come back as this device. Sent on first registration only. */
  sdk_token: z.string().optional(),
  heartbeat_interval_ms: z.number().int().positive(),
})

export const TaskAssignment = z.object({
  type: z.literal('task'),
  task_id: Id,
  lease_id: Id,
  /** ISO time the lease ends unless a heartbeat listing it comes first. */
  lease_deadline: z.string(),
  model: z.object({ id: Id, format: z.enum(['onnx', 'torchscript']), checksum: z.string(), download_path: z.string() }),
  /** One input; or, only to a device whose `max_batch_inputs` allows it, several as `inputs`. */
  input: Tensor.optional(),
  inputs: z.array(Tensor).min(1).max(MAX_BATCH_INPUTS).optional(),
  /** Name of the model input to feed (the first one when absent). */
  input_name: z.string().optional(),
}).refine((frame) => (frame.input === undefined) !== (frame.inputs === undefined), { message: 'a task carries either input or inputs' })
export type TaskAssignment = z.infer<typeof TaskAssignment>

export const CancelTask = z.object({ type: z.literal('cancel_task'), task_id: Id, lease_id: Id })

export const LogsRequest = z.object({
  type: z.literal('logs_request'),
  request_id: Id,
  lines: z.number().int().min(1).max(10_000),
  level: z.enum(['all', ...LOG_LEVELS]),
})

export const ErrorFrame = z.object({ type: z.literal('error'), code: z.string(), message: z.string() })

export const TRAIN_SYNC_MODES = ['async', 'semi_sync', 'full_sync'] as const
export const OPTIMIZERS = ['sgd', 'adam'] as const
export const LOSSES = ['cross_entropy', 'mse'] as const

/** Where a device's training samples come from. */
export const TrainData = z.discriminatedUnion('type', [
  /** Generated on the device by the seeded synthetic task of src/sdk/trainer/synthetic.ts. */
  z.object({ type: z.literal('stream'), task_seed: z.number().int(), stream_seed: z.number().int(), clusters_per_class: z.number().int().min(1).max(64).default(1) }),
  /** Rows `[start, end)` of the training part of an uploaded dataset (split with `split_seed`). */
  z.object({
    type: z.literal('dataset'),
    dataset_id: Id,
    download_path: z.string(),
    checksum: z.string(),
    format: z.enum(['csv', 'jsonl']),
    split_seed: z.number().int(),
    validation_fraction: z.number().min(0).max(0.9),
    start: z.number().int().min(0),
    end: z.number().int().min(0),
  }),
])
export type TrainData = z.infer<typeof TrainData>

/** Joins a device to a training job: the model, the starting weights, the settings and its data. */
export const TrainStart = z.object({
  type: z.literal('train_start'),
  job_id: Id,
  round: z.number().int().min(0),
  /** `input_shape`: the shape the model's upload declared, when it did (a TorchScript file declares none; `[-1, 8]`: 8 floats a sample). */
  model: z.object({ id: Id, format: z.enum(['onnx', 'torchscript']), checksum: z.string(), download_path: z.string(), input_shape: z.array(z.number().int().min(-1)).max(16).optional() }),
  /** Absent at round 0: the model file's own initializers. */
  weights: Weights.optional(),
  config: z.object({
    optimizer: z.enum(OPTIMIZERS),
    learning_rate: z.number().positive(),
    batch_size: z.number().int().min(1),
    local_steps: z.number().int().min(1),
    sync_mode: z.enum(TRAIN_SYNC_MODES),
    sync_interval_ms: z.number().int().min(1),
    loss: z.enum(LOSSES),
  }),
  data: TrainData,
})
export type TrainStart = z.infer<typeof TrainStart>

/** The job's weights after round `round`: train on from them (an answer to a pull, or a new sync round). */
export const TrainWeights = z.object({ type: z.literal('train_weights'), job_id: Id, round: z.number().int().min(0), weights: Weights })
export type TrainWeights = z.infer<typeof TrainWeights>

/** Leave the job (finished, paused, cancelled, or the device goes to another job). */
export const TrainStop = z.object({ type: z.literal('train_stop'), job_id: Id, reason: z.string() })

export const HubFrame = z.discriminatedUnion('type', [Registered, TaskAssignment, CancelTask, LogsRequest, ErrorFrame, TrainStart, TrainWeights, TrainStop])
export type HubFrame = z.infer<typeof HubFrame>

/** Close codes the hub uses besides the standard ones. */
export const CLOSE = {
  /** Protocol version not supported. */
  UNSUPPORTED_PROTOCOL: 4400,
  /** Enrollment secret, enrollment token or SDK token refused (unknown or wrong). */
  UNAUTHORIZED: 4401,
  /**
   * Known, but not allowed: the device is banned, its enrollment token was revoked, expired or used up, its
   * `instance_type` is not the one the platform asserts for it, or enrollment is closed (production with no
   * secret). The reason says which.
   */
  FORBIDDEN: 4403,
  /** Too many frames (or heartbeats) for the limits of docs/device-protocol.md §4.4. */
  RATE_LIMITED: 4429,
  /** Too many malformed frames. */
  MALFORMED: 4402,
  /** The device did not register in time, or stopped heartbeating. */
  TIMEOUT: 4408,
  /** The same device connected again elsewhere. */
  REPLACED: 4409,
} as const
