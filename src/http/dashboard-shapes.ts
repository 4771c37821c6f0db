import { z } from 'zod'
import { BENCHMARK_MODES, PerfStep } from '../domain/benchmark.js'
import { PROJECT_TYPES } from '../domain/project.js'
import { VALIDATION_MODES } from '../domain/validation.js'
import { INSTANCE_TYPES, PLATFORMS } from '../protocol/frames.js'
import { Banned, DeviceStatus, Quarantined } from './devices.js'
import { Chart, EfficiencyComparison, EfficiencySummary, TRAINING_STATUSES } from './efficiency.js'
import { NullableTimestamp, page, Timestamp } from './responses.js'

/**
 * The bodies the dashboard's routes answer (`/dashboard/*`, `/cluster/utilization`), as their schemas for the
 * serializer and the OpenAPI document.
 */

const Int = z.number().int()
const Counts = z.object({ total: Int, idle: Int, busy: Int, offline: Int })

const Fleet = z.object({
  total: Int,
  counts: Counts,
  by_platform: z.record(z.string(), Counts).describe('every platform (nodejs, python, windows), and any other a device reported'),
  by_instance_type: z.record(z.string(), Counts).describe('aws and user'),
  devices: z.array(
    z.object({
      id: z.string(),
      platform: z.enum(PLATFORMS),
      instance_type: z.enum(INSTANCE_TYPES),
      status: DeviceStatus,
      load: z.number().nullable(),
      power_watts: z.number().nullable(),
      running_tasks: Int,
      gpu: z.boolean(),
      can_train: z.boolean(),
      last_seen_at: Timestamp,
      banned: Banned,
      quarantined: Quarantined,
      training_job: z.string().nullable().describe('the training job it trains now, on this node; null if none'),
    }),
  ).describe('connected devices first'),
  limit: Int,
  offset: Int,
})

const Jobs = page(
  'jobs',
  z.object({
    job_id: z.string(),
    type: z.enum(['inference', 'training']),
    status: z.enum([...TRAINING_STATUSES]),
    model_id: z.string(),
    project_id: z.string().nullable(),
    created_at: Timestamp,
    updated_at: Timestamp,
    progress: z.object({ completed: Int, total: Int, percent: z.number() }).describe('inference: finished tasks of all; training: batches of all'),
  }),
)

/** A project as the projects read model shows it. */
const Project = z.object({
  project_id: z.string(),
  name: z.string(),
  type: z.enum(PROJECT_TYPES),
  model_id: z.string().nullable(),
  validation: z.enum(VALIDATION_MODES).nullable().describe("how its inference results are checked unless a request says; null: the model's"),
  status: z.enum(['active', 'completed', 'cancelled']),
  total_tasks: Int.describe('the tasks expected (total_tasks when created), else those submitted'),
  submitted_tasks: Int,
  completed_tasks: Int,
  failed_tasks: Int,
  cancelled_tasks: Int,
  pending_tasks: Int,
  percent_complete: z.number(),
  created_at: Timestamp,
  updated_at: Timestamp,
  ended_at: Timestamp.optional().describe('when it was completed or cancelled; absent while active'),
})

const Tasks = z.object({
  tasks: z.array(
    z.object({
      task_id: z.string(),
      job_id: z.string(),
      project_id: z.string().nullable(),
      status: z.enum(['queued', 'leased', 'completed', 'failed', 'cancelled']),
      device_id: z.string().nullable().describe('the device that ran it last; null before a lease'),
      instance_type: z.string().nullable(),
      inputs: Int.nullable(),
      attempts: Int,
      queued_at: Timestamp,
      finished_at: NullableTimestamp,
      latency_ms: z.number().nullable().describe('queued to completed'),
    }),
  ).describe('the most recently changed first'),
})

const Throughput = z.object({
  bucket_size: Int.describe('seconds'),
  buckets: z.array(z.object({ t: Timestamp.describe("the bucket's start"), completed: Int, inputs: Int, inputs_per_s: z.number() })).describe('buckets with completed tasks only, oldest first'),
})

const ChartValues = z.record(z.string(), z.tuple([z.number().nullable(), z.number().nullable()])).describe('per figure (nested ones dotted, e.g. latency_ms.p50): its aws and user values')
const Comparison = z.object({
  labels: z.tuple([z.literal('aws'), z.literal('user')]),
  training: ChartValues,
  inference: ChartValues,
  raw: EfficiencyComparison.describe('the figures as GET /efficiency/comparison gives them'),
})

const Utilization = z.object({
  devices: z.object({
    total: Int.describe('devices ever registered'),
    connected: Int,
    idle: Int,
    busy: Int,
    training: Int,
    draining: Int,
    gpu: Int.describe('connected devices with a GPU'),
  }),
  slots: z.object({ total: Int, used: Int, utilization: z.number().describe('used over total, 0 to 1') }).describe("connected devices' task slots (max_concurrent_tasks)"),
  load: z.object({ mean: z.number().nullable().describe('mean load of connected devices; null without any') }),
  power_watts: z.number().describe('power drawn now by connected devices, as they estimate it'),
  queue: z.object({ tasks: Int, inputs: Int }),
  training_jobs: z.object({ running: Int, queued: Int, paused: Int }),
})

const StreamTicket = z.object({ ticket: z.string().describe('pass as `?ticket=` to GET /dashboard/projects/{id}/stream, once'), expires_at: Timestamp })

const ProjectStream = {
  description: 'Server-Sent Events: `stats` (the figures, JSON or text) every interval, `end` when the project is no longer active, `stream_error` ({code, message}) before an early close',
  // each event as a client reads it: its name and its data (JSON with `format=json`, else text)
  content: {
    'text/event-stream': {
      schema: z.object({
        event: z.enum(['stats', 'end', 'stream_error']),
        data: z.string().describe('the figures (JSON or text), the final status, or the error as {code, message}'),
        id: z.string().optional(),
        retry: z.number().int().optional().describe('ms a client waits before reconnecting (the interval)'),
      }),
    },
  },
}

const QuickConfig = z.strictObject({ mode: z.enum(['inference', 'training', 'gpu-training']), requests: Int, concurrency: Int, epochs: Int, batch_size: Int })
const PerfConfig = z.strictObject({ duration: z.number(), instance_type: z.enum(['aws', 'user', 'all']), rps_steps: z.array(z.number()), max_concurrency: Int })
const BenchmarkModel = { model_id: z.string().describe('the benchmark model it uploaded') }
const Latency = PerfStep.shape.latency_ms
const QuickInferenceResult = z.strictObject({ requests: Int, completed: Int, errors: Int, seconds: z.number(), throughput_rps: z.number(), latency_ms: Latency, devices: Int })
const QuickTrainingResult = z.strictObject({
  job_id: z.string(),
  end_reason: z.string().nullish(),
  validation_accuracy: z.number().nullish(),
  time_to_accuracy_s: z.number().nullable(),
  seconds: z.number(),
  rounds: Int,
  samples: Int,
  epochs: Int,
  batch_size: Int,
  prefer_gpu: z.boolean(),
  devices: Int,
  trained_model_id: z.string().nullish(),
})
const PerfResult = z.strictObject({ steps: Int, requests: Int, completed: Int, errors: Int, skipped: Int, max_achieved_rps: z.number() })

const Benchmark = z.object({
  benchmark_id: z.string(),
  mode: z.enum(BENCHMARK_MODES),
  status: z.enum(['running', 'completed', 'failed']),
  config: z.union([QuickConfig.extend(BenchmarkModel), PerfConfig.extend(BenchmarkModel)]).describe('its settings (defaults filled in)'),
  project_id: z.string().describe('the benchmark project its requests ran in'),
  result: z.union([QuickInferenceResult, QuickTrainingResult, PerfResult]).nullable().describe('by mode; null until it completes'),
  error: z.string().nullable().describe('why it failed; null unless it did'),
  started_at: Timestamp,
  completed_at: NullableTimestamp.describe('when it completed or failed'),
})
const Started = { benchmark_id: z.string(), status: z.literal('running'), project_id: z.string() }

export const DashboardShapes = {
  Fleet,
  Jobs,
  Projects: z.object({ projects: z.array(Project) }),
  Tasks,
  Throughput,
  Efficiency: z.object({ summary: EfficiencySummary, tta: Chart, scaling: Chart, power: Chart }),
  Comparison,
  Utilization,
  StreamTicket,
  ProjectStream,
  QuickStarted: z.object({ ...Started, mode: z.enum(BENCHMARK_MODES).describe('inference, training or gpu-training'), poll_url: z.string().describe('GET it for the status and result') }),
  PerfStarted: z.object({ ...Started, config: PerfConfig, poll_url: z.string().describe('GET it for the status and each step') }),
  Benchmark,
  PerfBenchmark: Benchmark.extend({ steps: z.array(PerfStep).describe('each step as it ended') }),
}
