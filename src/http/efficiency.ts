import type { FastifyPluginAsync } from 'fastify'
import type { ZodTypeProvider } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { DomainError } from '../domain/errors.js'
import { activeRuns, CHART_TYPES, efficiencyChart, efficiencyComparison, efficiencySummary, INSTANCE_TYPES, jobEfficiency, MAX_CURVE_POINTS } from '../projections/efficiency.js'
import { customerOf } from './auth.js'
import { readYourWrites, type Services } from './context.js'
import { wholeNumber } from './pagination.js'
import { NullableTimestamp, Timestamp } from './responses.js'

// ---- response shapes (definitions of each figure: docs/efficiency.md) -----------------------------------

const Int = z.number().int()
/** A figure that is null when it cannot be computed (nothing to divide by, no rounds yet). */
const Maybe = z.number().nullable()
/** The work figures a summary and a job share. */
const Work = {
  samples: Int,
  wall_seconds: Maybe,
  throughput_samples_per_s: Maybe,
  cpu_seconds: Maybe,
  gpu_seconds: Maybe,
  energy_joules: Maybe,
  samples_per_joule: Maybe,
  power_watts: Maybe,
}
export const TRAINING_STATUSES = ['queued', 'running', 'paused', 'completed', 'cancelled', 'failed'] as const

export const EfficiencySummary = z.object({
  instance_type: z.enum(INSTANCE_TYPES).nullable().describe('the device type counted; null: both'),
  jobs: z.object({ total: Int, completed: Int, reached_target: Int, with_rounds: Int }),
  time_to_accuracy: z.object({ jobs: Int, mean_seconds: Maybe, median_seconds: Maybe, min_seconds: Maybe, max_seconds: Maybe }).describe('over the jobs that reached their target accuracy'),
  ...Work,
  scaling: z.object({ mean_efficiency: Maybe.describe('throughput with N devices / (N x throughput with 1), over completed multi-device jobs'), jobs: Int }),
})

/** Figures of a set of training contributions. */
const Contributions = {
  samples: Int,
  cpu_seconds: Maybe,
  gpu_seconds: Maybe,
  samples_per_device_s: Maybe.describe('samples per second of compute (CPU + GPU)'),
  energy_joules: Maybe,
  samples_per_joule: Maybe,
  mean_power_watts: Maybe.describe('energy over the time the devices trained'),
}
const ComparisonSide = z.object({
  training: z.object({ devices: Int, jobs: Int, contributions: Int, ...Contributions }),
  inference: z.object({
    tasks: Int,
    inputs: Int,
    cpu_seconds: Maybe,
    gpu_seconds: Maybe,
    inputs_per_compute_s: Maybe,
    inputs_per_s: Maybe.describe('completed inputs over the span from the first request to the last result'),
    latency_ms: z.object({ count: Int, p50: Maybe, p95: Maybe, mean: Maybe }).describe("project tasks' latency, queued to completed"),
  }),
})
export const EfficiencyComparison = z.object({ aws: ComparisonSide, user: ComparisonSide })

export const Chart = z.object({
  type: z.enum(CHART_TYPES),
  title: z.string(),
  x_label: z.string(),
  y_label: z.string(),
  x_kind: z.enum(['number', 'time']).describe('time: x is a Unix time in milliseconds (the start of a bucket); number: a plain value'),
  bucket_seconds: Maybe.describe('width of a time bucket (time charts); null otherwise'),
  series: z.array(
    z.object({
      name: z.string(),
      unit: z.string(),
      points: z.array(z.object({ x: z.number(), y: Maybe.describe('null where the figure cannot be computed'), label: z.string().nullable().describe('what the point is (a job id, a model id), or null') })),
    }),
  ),
})

const ActiveRuns = z.object({
  training: z.array(
    z.object({
      job_id: z.string(),
      model_id: z.string(),
      status: z.enum(TRAINING_STATUSES),
      devices: z.array(z.string()).describe('the devices training it now'),
      device_count: Int,
      round: Int,
      samples: Int,
      accuracy: Maybe,
      best_accuracy: Maybe,
      target_accuracy: Maybe,
      started_at: NullableTimestamp.describe('its first device assignment; null while queued'),
      updated_at: Timestamp,
      recent: z.object({ rounds: Int, samples: Int, seconds: Maybe, samples_per_s: Maybe, energy_joules: Maybe, power_watts: Maybe }).describe('over its last rounds (at most 5)'),
    }),
  ),
  inference: z.array(
    z.object({
      job_id: z.string(),
      project_id: z.string().nullable(),
      model_id: z.string(),
      kind: z.enum(['single', 'batch']),
      mode: z.enum(['sync', 'async']),
      status: z.enum(['queued', 'running', 'completed', 'failed', 'cancelled']),
      total_inputs: Int,
      completed_inputs: Int,
      failed_inputs: Int,
      percent_complete: Maybe,
      requested_at: Timestamp,
      updated_at: Timestamp,
      inputs_per_s: Maybe,
    }),
  ),
  limit: Int.describe('most runs of each kind'),
})

const TypeContributions = z.object({ devices: Int, ...Contributions, share_of_samples: Maybe })
const JobEfficiency = z.object({
  job_id: z.string(),
  model_id: z.string(),
  status: z.enum(TRAINING_STATUSES),
  started_at: NullableTimestamp,
  finished_at: NullableTimestamp,
  last_round_at: NullableTimestamp,
  rounds: Int,
  target_accuracy: Maybe,
  reached_target: z.boolean(),
  target_round: Maybe.describe('the first round at or above the target accuracy'),
  tta_seconds: Maybe.describe('time to target accuracy'),
  ...Work,
  devices: Int.describe('distinct devices that contributed to any round'),
  scaling: z.object({ efficiency: Maybe, baseline_samples_per_s: Maybe.describe("mean throughput of the model's completed 1-device jobs"), baseline_jobs: Int }),
  by_device: z.array(z.object({ device_id: z.string(), instance_type: z.string(), rounds: Int, ...Contributions })).describe('the most samples first (at most 1,000 devices)'),
  by_instance_type: z.object({ aws: TypeContributions, user: TypeContributions }),
  curve: z.object({
    rounds: Int.describe("the job's rounds; points holds all of them, or an evenly spaced subset with the first and the last"),
    points: z.array(z.object({ round: Int, at: Timestamp, seconds: Maybe.describe('since the job started'), loss: Maybe, validation_loss: Maybe, accuracy: Maybe, samples: Int })),
  }),
})

/**
 * `/efficiency`: training and inference efficiency figures of the caller's own jobs (time to accuracy,
 * throughput, energy, scaling; aws against user devices), computed from the read models. Definitions:
 * docs/efficiency.md.
 */
export const efficiencyRoutes: FastifyPluginAsync<{ services: Services }> = async (base, { services }) => {
  const app = base.withTypeProvider<ZodTypeProvider>()
  const config = { auth: 'api_key' as const }
  const tags = ['efficiency']
  /** Reads see every event so far (rounds and task outcomes land just before a request may ask for them). */
  const caughtUp = async () => readYourWrites(services, await services.store.headPosition())

  app.get('/efficiency', {
    config,
    schema: {
      summary: 'Aggregate training figures: jobs, time to accuracy, throughput, energy, scaling efficiency',
      operationId: 'getEfficiency',
      tags,
      response: { 200: EfficiencySummary },
      querystring: z.object({ instance_type: z.enum(INSTANCE_TYPES).optional().describe('count only the contributions of devices of this type (default: both)') }),
    },
  }, async (request) => {
    await caughtUp()
    return efficiencySummary(services.db, customerOf(request), request.query.instance_type)
  })

  app.get('/efficiency/comparison', { config, schema: { summary: 'aws against user devices: training and inference side by side', operationId: 'getEfficiencyComparison', tags, response: { 200: EfficiencyComparison } } }, async (request) => {
    await caughtUp()
    return efficiencyComparison(services.db, customerOf(request))
  })

  app.get('/efficiency/chart/:type', {
    config,
    schema: {
      summary: 'Chart-ready series (tta, scaling, power, throughput), the same shape for each',
      operationId: 'getEfficiencyChart',
      tags,
      response: { 200: Chart },
      params: z.object({ type: z.enum(CHART_TYPES) }),
      querystring: z.object({
        bucket_seconds: wholeNumber(1, 7 * 86_400).optional().describe('power and throughput: width of a time bucket (default: the span over 60; widened to keep at most 1,000 buckets)'),
      }),
    },
  }, async (request) => {
    await caughtUp()
    return efficiencyChart(services.db, customerOf(request), request.params.type, { bucketSeconds: request.query.bucket_seconds })
  })

  app.get('/efficiency/active', {
    config,
    schema: {
      summary: 'Training and inference runs in progress, with their recent throughput and power',
      operationId: 'getActiveRuns',
      tags,
      response: { 200: ActiveRuns },
      querystring: z.object({ limit: wholeNumber(1, 1000).default(100).describe('runs of each kind, newest first (default 100, max 1000)') }),
    },
  }, async (request) => {
    await caughtUp()
    return activeRuns(services.db, customerOf(request), request.query.limit)
  })

  app.get('/efficiency/job/:jobId', {
    config,
    schema: {
      summary: "A training job's figures, by device and instance type, and its accuracy and loss curve",
      operationId: 'getJobEfficiency',
      tags,
      response: { 200: JobEfficiency },
      params: z.object({ jobId: z.string().min(1).max(80) }),
      querystring: z.object({
        curve_points: wholeNumber(3, MAX_CURVE_POINTS).default(MAX_CURVE_POINTS).describe(`most points of the curve (default and max ${MAX_CURVE_POINTS}): every round, or every k-th from the first, and the last`),
      }),
    },
  }, async (request) => {
    await caughtUp()
    const figures = await jobEfficiency(services.db, customerOf(request), request.params.jobId, { curvePoints: request.query.curve_points })
    if (!figures) throw new DomainError('NOT_FOUND', `training job ${request.params.jobId} not found`)
    return figures
  })
}
