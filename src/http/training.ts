import { randomInt } from 'node:crypto'
import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'
import type { ZodTypeProvider } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { trainingPlan } from '../commands/training-validation.js'
import { DomainError } from '../domain/errors.js'
import { AGGREGATIONS } from '../domain/aggregation.js'
import { DEFAULT_CLIP_FACTOR, DEFAULT_TRIM_FRACTION, INSTANCE_TYPES, instanceTypesOf, modelFormatOf, robustnessOf, trainingDecider, trainingStream, type TrainingSpec } from '../domain/training-job.js'
import { LOSSES, OPTIMIZERS, TRAIN_SYNC_MODES } from '../protocol/frames.js'
import { findDataset } from '../projections/datasets.js'
import { findModel } from '../projections/models.js'
import { findTrainingJob, type JobRow, listTrainingJobs, statusOfRow, trainingRounds } from '../projections/training.js'
import { customerOf } from './auth.js'
import { readYourWrites, type Services } from './context.js'
import { createdId } from './idempotency.js'
import { loadState } from '../commands/handle-command.js'
import { pageQuery } from './pagination.js'
import { page, Timestamp } from './responses.js'

/** Both kinds of data: what they share. */
const DataCommon = {
  batch_size: z.number().int().min(1).max(4096).default(32),
  validation_fraction: z.number().min(0.01).max(0.5).default(0.2).describe('share of a dataset held out for validation (default 0.2)'),
  clusters_per_class: z.number().int().min(1).max(64).default(1).describe('"stream": clusters of each class in the synthetic task (default 1: linearly separable; more: a harder, non-linear task)'),
  seed: z.number().int().min(1).max(2 ** 31 - 1).optional().describe('seeds the synthetic task, the dataset split and the sample streams (default: random); the same seed gives the same data'),
}
const totalSamples = (params?: Parameters<typeof z.number>[0]) => z.number(params).int().min(1).max(1_000_000_000)
/** A field the kind of data needs: its absence is named as such (not as "expected number, received undefined"). */
const needed = (why: string) => ({ error: (issue: { input?: unknown }) => (issue.input === undefined ? why : undefined) })
/**
 * `data_config`, one form per `type` so that the document shows what each needs: a stream (the default)
 * needs `total_samples`, a dataset its `dataset_id`.
 */
const DataConfig = z.discriminatedUnion('type', [
  z.object({
    type: z.literal('stream').default('stream').describe('"stream" (the default): samples generated on the devices from a seeded synthetic task'),
    total_samples: totalSamples(needed('required for a stream')).describe('samples per epoch'),
    dataset_id: z.string().min(1).max(64).optional().describe('ignored for a stream'),
    ...DataCommon,
  }),
  z.object({
    type: z.literal('dataset').describe('"dataset": an uploaded dataset'),
    total_samples: totalSamples().optional().describe('samples per epoch (default: the training rows of the dataset)'),
    dataset_id: z.string(needed('required when type is "dataset"')).min(1).max(64).describe('from POST /datasets'),
    ...DataCommon,
  }),
])

const TrainBody = z.object({
  model_id: z.string().min(1).max(64),
  data_config: DataConfig,
  training_config: z.object({
    epochs: z.number().int().min(1).max(10_000).default(1),
    learning_rate: z.number().positive().max(10).default(0.001),
    optimizer: z.enum(OPTIMIZERS).default('adam'),
    target_accuracy: z.number().min(0).max(1).optional().describe('stop as soon as the validation accuracy reaches it'),
    sync_mode: z.enum(TRAIN_SYNC_MODES).default('async'),
    local_steps: z.number().int().min(1).max(100_000).default(50).describe('batches a device trains between weight syncs (default 50)'),
    sync_interval_ms: z.number().int().min(100).max(3_600_000).default(60_000).describe('async: how often devices pull the current weights (default 60000)'),
    loss: z.enum(LOSSES).optional().describe('default: cross_entropy when the model ends in a Softmax over 2 or more outputs, else mse'),
    aggregation: z.enum(AGGREGATIONS).optional().describe('how a round combines the updates: fedavg, trimmed_mean or median (default: trimmed_mean when user devices may train the job, else fedavg)'),
    trim_fraction: z.number().min(0).max(0.45).default(DEFAULT_TRIM_FRACTION).describe('trimmed_mean: share of the updates dropped from each side of every coordinate (default 0.2)'),
    clip_norm: z.number().positive().max(1e9).optional().describe("a fixed bound on the L2 norm of an update's change from the round's weights (default: none)"),
    clip_factor: z.number().min(1).max(1000).nullable().optional().describe("an adaptive bound: this multiple of the median change norm (default: 2 with trimmed_mean and median, none with fedavg; null: none)"),
  }),
  resource_config: z
    .object({
      min_devices: z.number().int().min(1).max(10_000).default(1),
      max_devices: z.number().int().min(1).max(10_000).optional(),
      prefer_gpu: z.boolean().default(false),
      sdk_types: z.array(z.enum(['nodejs', 'python', 'windows'])).min(1).max(3).optional(),
      min_sdk_version: z.string().regex(/^\d+(\.\d+){0,3}$/, 'a version like 1.1.6').optional(),
      instance_types: z.array(z.enum(INSTANCE_TYPES)).min(1).max(2).default([...INSTANCE_TYPES]).describe('the kinds of device that may train it: aws (cloud workers), user (contributed devices); default both'),
    })
    .refine((r) => r.max_devices === undefined || r.max_devices >= r.min_devices, { message: 'max_devices must be at least min_devices' })
    .default({ min_devices: 1, prefer_gpu: false, instance_types: [...INSTANCE_TYPES] }),
})
const JobParams = z.object({ jobId: z.string().min(1).max(80) })
const STATUSES = ['queued', 'running', 'paused', 'completed', 'cancelled', 'failed'] as const

const Int = z.number().int()
/** A training job as `jobView` serves it. */
const TrainingJob = z.object({
  job_id: z.string(),
  status: z.enum(STATUSES).describe('queued: waiting for devices; running: devices assigned'),
  model_id: z.string(),
  config: z.object({
    epochs: Int,
    learning_rate: z.number(),
    optimizer: z.enum(OPTIMIZERS),
    target_accuracy: z.number().nullable(),
    sync_mode: z.enum(TRAIN_SYNC_MODES),
    local_steps: Int,
    sync_interval_ms: Int,
    loss: z.enum(LOSSES),
    data_type: z.enum(['stream', 'dataset']),
    dataset_id: z.string().nullable(),
    total_samples: Int.describe('samples per epoch'),
    batch_size: Int,
    seed: Int,
    clusters_per_class: Int,
    aggregation: z.enum(AGGREGATIONS),
    trim_fraction: z.number(),
    clip_norm: z.number().nullable(),
    clip_factor: z.number().nullable(),
  }),
  resource_config: z.object({
    min_devices: Int,
    max_devices: Int.nullable(),
    prefer_gpu: z.boolean(),
    sdk_types: z.array(z.string()).nullable(),
    min_sdk_version: z.string().nullable(),
    instance_types: z.array(z.enum(INSTANCE_TYPES)),
  }),
  progress: z.object({
    current_epoch: Int,
    total_epochs: Int,
    batches_completed: Int,
    total_batches: Int,
    percent_complete: z.number(),
    current_loss: z.number().nullable().describe('training loss of the last round; null before the first'),
    best_loss: z.number().nullable(),
    rounds: Int.describe('rounds aggregated'),
    samples_seen: Int,
    validation_accuracy: z.number().nullable(),
    best_validation_accuracy: z.number().nullable(),
  }),
  validation_accuracy: z.number().nullable(),
  assigned_devices: z.array(z.string()),
  trained_model_id: z.string().nullable().describe('the trained model (a model of yours) once completed'),
  end_reason: z.enum(['target_accuracy', 'epochs']).nullable().describe('why a completed job ended: it reached target_accuracy, or trained every epoch'),
  error: z.string().nullable().describe('why a failed job failed'),
  refused_updates: Int.describe("devices' updates the coordinator refused"),
  created_at: Timestamp,
  started_at: Timestamp.nullable(),
  completed_at: Timestamp.nullable().describe('when it ended (completed, cancelled or failed)'),
})
const Rounds = z.object({
  job_id: z.string(),
  rounds: z.array(z.object({
    round: Int,
    loss: z.number(),
    validation_loss: z.number(),
    accuracy: z.number().describe('validation accuracy after the round'),
    samples: Int,
    devices: Int,
    wall_ms: z.number(),
    energy_joules: z.number(),
    at: Timestamp,
  })),
  limit: Int,
  offset: Int,
})
const Queued = z.object({ job_id: z.string(), status: z.literal('queued'), estimated_devices: Int.describe('devices that may train it now (at most max_devices)') })
const byJobId = { parameters: { jobId: '$response.body#/job_id' } }

/** `/training`: federated training jobs (FedAvg over devices), their progress, pause, resume and cancel. */
export const trainingRoutes: FastifyPluginAsync<{ services: Services }> = async (base, { services }) => {
  const app = base.withTypeProvider<ZodTypeProvider>()
  const config = { auth: 'api_key' as const }
  const training = services.training

  /** Reads see the job's every event so far (the coordinator writes them as devices come and go). */
  const caughtUp = async () => readYourWrites(services, await services.store.headPosition())

  async function view(customerId: string, jobId: string) {
    await caughtUp()
    const row = await findTrainingJob(services.db, customerId, jobId)
    if (!row) throw new DomainError('NOT_FOUND', `training job ${jobId} not found`)
    return jobView(row)
  }

  /** The answer to a submission: the job, queued, and how many devices could train it now. */
  function queued(reply: FastifyReply, spec: TrainingSpec, eligible = training.eligibleDevices(spec.resource_config, modelFormatOf(spec))) {
    return reply.status(202).send({ job_id: spec.job_id, status: 'queued', estimated_devices: Math.min(eligible, spec.resource_config.max_devices ?? eligible) })
  }

  /** The job an earlier run of this request submitted. */
  async function recoverJob(request: FastifyRequest, reply: FastifyReply) {
    const spec = (await loadState(services.store, trainingStream(createdId(request, 'train')), trainingDecider))?.spec
    if (!spec || spec.customer_id !== customerOf(request)) return undefined
    await caughtUp()
    return queued(reply, spec)
  }

  app.post('/training', {
    config: {
      ...config,
      idempotent: { recover: recoverJob },
      success: { 202: 'Queued' },
      links: {
        GetTrainingJob: { operationId: 'getTrainingJob', ...byJobId },
        GetTrainingRounds: { operationId: 'getTrainingRounds', ...byJobId },
        PauseTraining: { operationId: 'pauseTraining', ...byJobId },
        ResumeTraining: { operationId: 'resumeTraining', ...byJobId },
        CancelTraining: { operationId: 'cancelTraining', ...byJobId },
      },
    },
    schema: { operationId: 'startTraining', summary: 'Start a federated training job', tags: ['training'], body: TrainBody, response: { 202: Queued } },
  }, async (request, reply) => {
    const customerId = customerOf(request)
    const body = request.body
    const model = await findModel(services.db, customerId, body.model_id)
    if (!model) throw new DomainError('NO_MODEL', `model ${body.model_id} not found`)
    const dataset = body.data_config.type === 'dataset' ? await datasetOf(customerId, body.data_config.dataset_id) : undefined
    // accuracy is measured on held-out rows (see splitDataset): a job that would hold out none fails at its first round
    if (dataset && dataset.rows < 2) {
      throw new DomainError('VALIDATION_ERROR', `data_config.dataset_id: a dataset job holds out rows to measure its accuracy and trains on the others; dataset ${dataset.dataset_id} has ${dataset.rows} row, it needs at least 2`)
    }
    // the model must be one the server can check (ONNX: the trainer's operators; TorchScript: Python with
    // torch) and fit the data: 400 with what is wrong
    const bytes = await services.blobs.read(model.checksum.replace(/^sha256:/, ''))
    const plan = await trainingPlan({ format: model.format, checksum: model.checksum, bytes, input_shape: model.input_shape }, body.training_config.loss, dataset, training.torch)
    const resources = {
      min_devices: body.resource_config.min_devices,
      max_devices: body.resource_config.max_devices ?? null,
      prefer_gpu: body.resource_config.prefer_gpu,
      sdk_types: body.resource_config.sdk_types ?? null,
      min_sdk_version: body.resource_config.min_sdk_version ?? null,
      instance_types: [...new Set(body.resource_config.instance_types)].sort(),
    }
    const eligible = training.eligibleDevices(resources, model.format)
    if (eligible === 0) throw new DomainError('NO_TRAINING_DEVICES', `no connected device can train for this job (it needs a device with can_train that trains ${model.format} models and matches resource_config)`)
    const totalSamples = body.data_config.total_samples ?? Math.round(dataset!.rows * (1 - body.data_config.validation_fraction))
    const batchesPerEpoch = Math.ceil(totalSamples / body.data_config.batch_size)
    const at = services.now().toISOString()
    const spec: TrainingSpec = {
      job_id: createdId(request, 'train'),
      customer_id: customerId,
      model_id: model.model_id,
      model_name: model.name,
      model_checksum: model.checksum,
      model_format: model.format,
      data_config: { type: body.data_config.type, total_samples: totalSamples, batch_size: body.data_config.batch_size, dataset_id: dataset?.dataset_id ?? null, dataset_checksum: dataset?.checksum ?? null, dataset_format: dataset?.format ?? null, validation_fraction: body.data_config.validation_fraction, clusters_per_class: body.data_config.clusters_per_class },
      training_config: {
        epochs: body.training_config.epochs,
        learning_rate: body.training_config.learning_rate,
        optimizer: body.training_config.optimizer,
        target_accuracy: body.training_config.target_accuracy ?? null,
        sync_mode: body.training_config.sync_mode,
        local_steps: body.training_config.local_steps,
        sync_interval_ms: body.training_config.sync_interval_ms,
        loss: plan.loss,
        ...robustRules(body.training_config, resources.instance_types),
      },
      resource_config: resources,
      weight: totalSamples * body.training_config.epochs,
      total_batches: batchesPerEpoch * body.training_config.epochs,
      seed: body.data_config.seed ?? randomInt(1, 2 ** 31 - 1),
      submitted_at: at,
    }
    const position = await training.submit(spec)
    await readYourWrites(services, position)
    return queued(reply, spec, eligible)
  })

  app.get('/training', {
    config,
    schema: { operationId: 'listTrainingJobs', summary: 'Your training jobs, newest first', tags: ['training'], querystring: pageQuery().extend({ status: z.enum(STATUSES).optional() }), response: { 200: page('jobs', TrainingJob) } },
  }, async (request) => {
    await caughtUp()
    const { jobs, total } = await listTrainingJobs(services.db, customerOf(request), request.query)
    return { jobs: jobs.map(jobView), total, limit: request.query.limit, offset: request.query.offset }
  })

  app.get('/training/:jobId', { config, schema: { operationId: 'getTrainingJob', summary: 'A training job: status, progress, loss, accuracy and devices', tags: ['training'], params: JobParams, response: { 200: TrainingJob } } }, async (request) => {
    return view(customerOf(request), request.params.jobId)
  })

  app.get('/training/:jobId/rounds', {
    config,
    schema: { operationId: 'getTrainingRounds', summary: 'Every aggregated round of a job: loss, validation accuracy, samples, devices, wall time, energy', tags: ['training'], params: JobParams, querystring: pageQuery(10_000), response: { 200: Rounds } },
  }, async (request) => {
    const job = await view(customerOf(request), request.params.jobId)
    const rounds = await trainingRounds(services.db, job.job_id, request.query)
    return {
      job_id: job.job_id,
      rounds: rounds.map((r) => ({ round: r.round, loss: r.loss, validation_loss: r.validation_loss, accuracy: r.accuracy, samples: Number(r.samples), devices: r.devices, wall_ms: r.wall_ms, energy_joules: r.energy_joules, at: r.at })),
      limit: request.query.limit,
      offset: request.query.offset,
    }
  })

  const control = (action: 'pause' | 'resume' | 'cancel') => async (request: { params: { jobId: string } } & Parameters<typeof customerOf>[0]) => {
    const customerId = customerOf(request)
    const position = await training[action](request.params.jobId, customerId)
    await readYourWrites(services, position)
    return view(customerId, request.params.jobId)
  }
  app.post('/training/:jobId/pause', { config, schema: { operationId: 'pauseTraining', summary: 'Pause a job (its devices go back to the pool; resume continues from the last round)', tags: ['training'], params: JobParams, response: { 200: TrainingJob } } }, control('pause'))
  app.post('/training/:jobId/resume', { config, schema: { operationId: 'resumeTraining', summary: 'Resume a paused job', tags: ['training'], params: JobParams, response: { 200: TrainingJob } } }, control('resume'))
  app.delete('/training/:jobId', { config, schema: { operationId: 'cancelTraining', summary: 'Cancel a job', tags: ['training'], params: JobParams, response: { 200: TrainingJob } } }, control('cancel'))

  async function datasetOf(customerId: string, datasetId: string) {
    const dataset = await findDataset(services.db, customerId, datasetId)
    if (!dataset) throw new DomainError('NOT_FOUND', `dataset ${datasetId} not found`)
    return dataset
  }
}

/**
 * A job that contributed (`user`) devices may train defaults to trimmed_mean, adaptively clipped: one lying
 * device cannot steer it. A job of cloud workers only keeps FedAvg, which wastes no honest work.
 */
function robustRules(config: z.infer<typeof TrainBody>['training_config'], instanceTypes: string[]) {
  const aggregation = config.aggregation ?? (instanceTypes.includes('user') ? 'trimmed_mean' : 'fedavg')
  const clipFactor = config.clip_factor === undefined ? (aggregation === 'fedavg' ? null : DEFAULT_CLIP_FACTOR) : config.clip_factor
  return { aggregation, trim_fraction: config.trim_fraction, clip_norm: config.clip_norm ?? null, clip_factor: clipFactor }
}

/** A job as the API shows it (the spec's fields, and validation accuracy and the trained model beside them). */
export function jobView(row: JobRow) {
  const spec = row.spec
  const totalBatches = spec.total_batches
  const batchesPerEpoch = Math.max(1, Math.ceil(spec.data_config.total_samples / spec.data_config.batch_size))
  return {
    job_id: row.job_id,
    status: statusOfRow(row),
    model_id: row.model_id,
    config: {
      epochs: spec.training_config.epochs,
      learning_rate: spec.training_config.learning_rate,
      optimizer: spec.training_config.optimizer,
      target_accuracy: spec.training_config.target_accuracy,
      sync_mode: spec.training_config.sync_mode,
      local_steps: spec.training_config.local_steps,
      sync_interval_ms: spec.training_config.sync_interval_ms,
      loss: spec.training_config.loss,
      data_type: spec.data_config.type,
      dataset_id: spec.data_config.dataset_id,
      total_samples: spec.data_config.total_samples,
      batch_size: spec.data_config.batch_size,
      seed: spec.seed,
      clusters_per_class: spec.data_config.clusters_per_class,
      ...robustnessOf(spec),
    },
    resource_config: { ...spec.resource_config, instance_types: instanceTypesOf(spec) },
    progress: {
      current_epoch: Math.min(spec.training_config.epochs, Math.floor(row.batches_completed / batchesPerEpoch)),
      total_epochs: spec.training_config.epochs,
      batches_completed: row.batches_completed,
      total_batches: totalBatches,
      percent_complete: Math.min(100, Math.round((row.batches_completed / totalBatches) * 10_000) / 100),
      current_loss: row.current_loss,
      best_loss: row.best_loss,
      rounds: row.round,
      samples_seen: row.samples,
      validation_accuracy: row.accuracy,
      best_validation_accuracy: row.best_accuracy,
    },
    validation_accuracy: row.accuracy,
    assigned_devices: row.devices,
    trained_model_id: row.trained_model_id,
    end_reason: row.end_reason,
    error: row.error,
    refused_updates: row.refused_updates,
    created_at: row.submitted_at,
    started_at: row.started_at,
    completed_at: row.finished_at,
  }
}
