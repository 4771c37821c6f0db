import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'
import { validatorCompiler, type ZodTypeProvider } from 'fastify-type-provider-zod'
import type { FastifySchemaCompiler } from 'fastify'
import { z } from 'zod'
import { type TaskOutcome, tensorBytes } from '../commands/scheduler.js'
import { DomainError } from '../domain/errors.js'
import { inferenceDecider, inferenceStream, inferenceTaskId } from '../domain/inference-job.js'
import type { AdapterModel } from '../adapters/runtime.js'
import { projectDecider, projectStream } from '../domain/project.js'
import { findJob, type JobRow, jobResults, jobStatus, openTaskIds } from '../projections/inference.js'
import { findModel, type ModelRow } from '../projections/models.js'
import { batchingOf } from '../domain/model.js'
import { findProject } from '../projections/projects.js'
import { FLOAT32_MAX, FLOAT32_MESSAGE, isNumberArray } from '../protocol/numbers.js'
import { customerOf } from './auth.js'
import { execute, readYourWrites, type Services } from './context.js'
import { SchemaValidators } from './json-schema.js'
import { loadState, type StreamStart } from '../commands/handle-command.js'
import { createdId } from './idempotency.js'
import { WrongExpectedRevisionError } from '../event-store/errors.js'
import { pageQuery } from './pagination.js'
import { newId } from './ids.js'
import { resolvePolicy, VALIDATION_MODES, type ValidationMode } from '../domain/validation.js'
import { Timestamp } from './responses.js'

/** A tensor's bounds: values (float32, as the devices hold them), and dimensions (each at least 1). */
const MAX_TENSOR_VALUES = 1_000_000
const MAX_TENSOR_DIMS = 8
const Tensor = z.object({
  data: z.array(z.number().min(-FLOAT32_MAX, { error: FLOAT32_MESSAGE }).max(FLOAT32_MAX, { error: FLOAT32_MESSAGE })).min(1).max(MAX_TENSOR_VALUES),
  shape: z.array(z.number().int().min(1)).min(1).max(MAX_TENSOR_DIMS),
})
type Tensor = z.infer<typeof Tensor>

/**
 * An input as the client sends it: a tensor, or for a model with a preprocessing adapter the business format
 * that adapter takes (an object; see docs/adapters.md). Which one is checked against the model.
 */
const Input = z.union([Tensor, z.record(z.string(), z.unknown())]).describe('a tensor {data, shape}, or the business format of the model\'s preprocessing adapter')

const Validation = z
  .enum(VALIDATION_MODES)
  .optional()
  .describe("how a contributed device's result is checked before it is delivered: none, spot (a sampled share runs again elsewhere) or quorum (every one runs again on another contributor's or a cloud device); default: the project's, else the model's, else none")

const SingleBody = z.object({
  model_id: z.string().min(1).max(64),
  input: Input,
  async: z.boolean().optional(),
  project_id: z.string().min(1).max(64).optional(),
  options: z
    .object({
      timeout: z.number().int().min(1).max(600_000).optional().describe('ms a synchronous request waits (default 30000)'),
      prefer_gpu: z.boolean().optional(),
      instance_type: z.enum(['aws', 'user']).optional().describe('run only on cloud (aws) or contributed (user) devices'),
      validation: Validation,
    })
    .optional(),
})

export const BatchBody = z.object({
  model_id: z.string().min(1).max(64),
  inputs: z.array(Input).min(1).max(100_000),
  name: z.string().max(200).optional(),
  project_id: z.string().min(1).max(64).optional(),
  options: z.object({ prefer_gpu: z.boolean().optional(), instance_type: z.enum(['aws', 'user']).optional(), validation: Validation }).optional(),
})

/** The batch body but its inputs: checked by zod, and `inputs` by `batchBodyValidator`'s loop. */
const BatchBodyRest = BatchBody.omit({ inputs: true })

/**
 * The batch route's body validator. A body whose inputs are all well-formed tensors (the common case) is
 * checked by one loop per tensor (`asTensor`) and the rest of the body by zod; any other body goes through
 * the route's whole zod schema, which is what OpenAPI documents and what names the field of an error. zod
 * checks each of a batch's values through its generic machinery: for 20,000 inputs of 64 values that was a
 * quarter of a second, a quarter of the time to accept the batch.
 */
export const batchBodyValidator: FastifySchemaCompiler<any> = (route) => {
  const whole = validatorCompiler(route)
  if (route.httpPart !== 'body') return whole
  return (data) => {
    const inputs = typeof data === 'object' && data !== null ? (data as { inputs?: unknown }).inputs : undefined
    if (Array.isArray(inputs) && inputs.length >= 1 && inputs.length <= 100_000) {
      const rest = BatchBodyRest.safeParse(data)
      const tensors = rest.success ? inputs.map(asTensor) : []
      if (rest.success && tensors.every((tensor) => tensor !== undefined)) return { value: { ...rest.data, inputs: tensors } }
    }
    return whole(data)
  }
}

const SingleQuery = z.object({
  async: z.enum(['true', 'false']).optional(),
  raw: z.enum(['true', 'false']).optional().describe('true: the raw output tensor even when the model has a postprocessing adapter'),
})
/** What of a single request says how long it waits: read without the input (up to a million values). */
const Waiting = z.object({ async: z.boolean().optional(), options: z.object({ timeout: z.number().optional() }).optional() })

const JobParams = z.object({ jobId: z.string().min(1).max(80) })

const Int = z.number().int()
const Output = z.unknown().describe("an output tensor {data, shape}, or the business format of the model's postprocessing adapter (e.g. {predictions: [...]})")
const PollUrl = z.string().describe('GET it for the status and the result')
const Completed = z.object({ job_id: z.string(), status: z.literal('completed'), result: Output, latency_ms: Int, device_id: z.string().describe('the device that ran it') })
const Queued = z.object({ job_id: z.string(), status: z.literal('queued'), message: z.string(), poll_url: PollUrl })
const BatchQueued = z.object({ job_id: z.string(), project_id: z.string().describe('the project named, else a new batch project'), status: z.literal('queued'), total_tasks: Int.describe('inputs'), poll_url: PollUrl })
const JobCommon = {
  job_id: z.string(),
  status: z.enum(['queued', 'running', 'completed', 'failed', 'cancelled']).describe('completed once every input finished and at least one succeeded; failed when every one failed'),
  model_id: z.string(),
  project_id: z.string().nullable(),
  name: z.string().optional().describe("a batch's name, when it was given one"),
  waiting_reason: z.string().optional().describe('why a job that is not finished makes no progress now (no connected device runs its model\'s format); absent otherwise'),
  created_at: Timestamp,
  updated_at: Timestamp,
}
/** `GET /inference/:jobId`: one input's job, or a batch with a page of its results. */
const Job = z.discriminatedUnion('type', [
  z.object({
    type: z.literal('inference'),
    ...JobCommon,
    result: Output.optional().describe('once completed'),
    device_id: z.string().nullable().optional().describe('the device that ran it, with the result'),
    error: z.string().optional().describe('why it failed'),
  }),
  z.object({
    type: z.literal('batch'),
    ...JobCommon,
    total_tasks: Int.describe('inputs'),
    progress: z.object({ completed: Int, failed: Int, pending: Int, percent_complete: z.number() }).describe('in inputs'),
    results: z.array(z.object({
      index: Int.describe("the input's position in the batch"),
      status: z.enum(['queued', 'completed', 'failed', 'cancelled']),
      result: Output.optional(),
      error: z.string().optional().describe('why it failed; on a completed input, why its stored result cannot be read'),
    })),
    limit: Int,
    offset: Int,
    next_offset: Int.optional().describe('present when the page ended early (large outputs): ask again from here'),
  }),
])
const Cancelled = z.object({ job_id: z.string(), status: z.literal('cancelled'), cancelled_tasks: Int.describe('its tasks that were queued or running') })
const byJobId = { parameters: { jobId: '$response.body#/job_id' } }
const jobLinks = { GetInferenceJob: { operationId: 'getInferenceJob', ...byJobId }, CancelInference: { operationId: 'cancelInference', ...byJobId } }

const DEFAULT_TIMEOUT_MS = 30_000
/** A batch of 100,000 small tensors is some tens of MB of JSON. */
const BATCH_BODY_LIMIT = 128 * 1024 * 1024

/** The input as a tensor when it is a well-formed one (as `Tensor` would parse it), else undefined. */
function asTensor(input: unknown): Tensor | undefined {
  if (typeof input !== 'object' || input === null) return undefined
  const { data, shape } = input as { data?: unknown; shape?: unknown }
  if (!isNumberArray(data, { float32: true }) || data.length < 1 || data.length > MAX_TENSOR_VALUES) return undefined
  if (!isNumberArray(shape, { int: true, min: 1 }) || shape.length < 1 || shape.length > MAX_TENSOR_DIMS) return undefined
  return { data, shape }
}

/** The input must fit the model: data as long as the shape says, the shape as the model declares (-1: any size). */
export function checkInput(field: string, input: Tensor, declared: number[] | null): void {
  const size = input.shape.reduce((a, b) => a * b, 1)
  if (size !== input.data.length) throw new DomainError('VALIDATION_ERROR', `${field}.data: ${input.data.length} values do not fill shape ${JSON.stringify(input.shape)} (${size})`)
  if (!declared) return
  const fits = declared.length === input.shape.length && declared.every((d, i) => d === -1 || d === input.shape[i])
  if (!fits) throw new DomainError('VALIDATION_ERROR', `${field}.shape: ${JSON.stringify(input.shape)} does not match the model's input shape ${JSON.stringify(declared)}`)
}

function checkSchema(validators: SchemaValidators, model: ModelRow, field: string, input: unknown): void {
  if (!model.input_schema) return
  const validate = validators.validator(model, model.input_schema)
  if (!validate(input)) {
    const first = validate.errors?.[0]
    throw new DomainError('VALIDATION_ERROR', `${field}${first?.instancePath.replaceAll('/', '.') ?? ''}: ${first?.message ?? 'does not match the model input_schema'}`)
  }
}

/**
 * What the model's input_schema describes: the input as sent, except for a tabular model whose schema lists
 * the features themselves, where a `{"features": {...}}` input is checked by its features.
 */
function schemaTarget(model: ModelRow, input: unknown): [string, unknown] {
  const properties = model.input_schema?.properties as Record<string, unknown> | undefined
  if (model.preprocessing !== 'tabular' || !input || typeof input !== 'object' || properties?.features !== undefined) return ['', input]
  const features = (input as { features?: unknown }).features
  return features !== undefined ? ['.features', features] : ['', input]
}

function wantsAsync(request: FastifyRequest, query: { async?: string | undefined }, body: { async?: boolean | undefined }): boolean {
  return body.async === true || query.async === 'true' || request.headers['x-async'] === 'true'
}

/** Does the model take its inputs through a preprocessing adapter (other than passthrough)? */
const preprocessed = (model: ModelRow) => model.preprocessing !== null && model.preprocessing !== 'passthrough'
const postprocessed = (model: ModelRow) => model.postprocessing !== null && model.postprocessing !== 'passthrough'

/** A job's tasks split into runs of consecutive inputs, sized so the batch spreads over the devices that can take it. */
export function chunkSizes(inputs: number, capacity: { slots: number; batchInputs: number }): number[] {
  const size = capacity.batchInputs <= 1 ? 1 : Math.min(capacity.batchInputs, Math.max(1, Math.ceil(inputs / (Math.max(1, capacity.slots) * 4))))
  const sizes: number[] = []
  for (let left = inputs; left > 0; left -= size) sizes.push(Math.min(size, left))
  return sizes
}

/** Cancels a job: records it, then cancels its open tasks (queued ones leave the queue, running ones are told to stop). */
export async function cancelJob(services: Services, customerId: string, job: JobRow): Promise<number> {
  const status = jobStatus(job)
  const at = services.now().toISOString()
  await execute(services, inferenceStream(job.job_id), inferenceDecider, { type: 'CancelInference', customerId, finished: status === 'completed' || status === 'failed', at }, {
    metadata: { customerId, occurredAt: at },
  })
  const open = await openTaskIds(services.db, job.job_id)
  const settled = await services.scheduler.cancelAll(open, customerId)
  // a task that ended meanwhile stays as it ended; any other failure is the answer's
  const failure = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected' && !(r.reason instanceof DomainError && r.reason.code === 'CANNOT_CANCEL'))
  if (failure) throw failure.reason
  const positions = settled.map((r) => (r.status === 'fulfilled' ? r.value : undefined))
  // read-your-writes: the answer's GET sees the tasks cancelled
  const last = positions.reduce<bigint | undefined>((a, b) => (b !== undefined && (a === undefined || b > a) ? b : a), undefined)
  if (last !== undefined) await readYourWrites(services, last)
  return open.length
}

/** `/inference`: one input (sync or async), batches, status and results, cancellation. */
export const inferenceRoutes: FastifyPluginAsync<{ services: Services }> = async (base, { services }) => {
  const app = base.withTypeProvider<ZodTypeProvider>()
  const config = { auth: 'api_key' as const }
  const validators = new SchemaValidators()

  /** The model's inputs as tensors: checked against its input_schema as sent, preprocessed when it has an adapter, checked against its shape. */
  async function toTensors(model: ModelRow, inputs: unknown[], field: (i: number) => string): Promise<Tensor[]> {
    inputs.forEach((input, i) => {
      const [where, value] = schemaTarget(model, input)
      checkSchema(validators, model, `${field(i)}${where}`, value)
    })
    let tensors: Tensor[]
    if (preprocessed(model)) {
      tensors = await services.adapters.preprocess(adapterModel(model), inputs, field)
    } else {
      tensors = inputs.map((input, i) => {
        // the body's schema took it already as a tensor or an object: most are tensors, told apart in one
        // loop each (a batch holds up to 100,000 of them); zod again only for what is not, to say why
        const fast = asTensor(input)
        if (fast) return fast
        const parsed = Tensor.safeParse(input)
        if (!parsed.success) {
          const issue = parsed.error.issues[0]
          const where = issue?.path.length ? `.${issue.path.join('.')}` : ''
          // the hint only for an input that is not even shaped as a tensor (not for a value out of range)
          const looksLikeTensor = typeof input === 'object' && input !== null && 'data' in input && 'shape' in input
          const hint = looksLikeTensor ? '' : '; the model has no preprocessing adapter, so the input is a tensor {data, shape}'
          throw new DomainError('VALIDATION_ERROR', `${field(i)}${where}: ${issue?.message ?? 'not a tensor'}${hint}`)
        }
        return parsed.data
      })
    }
    tensors.forEach((tensor, i) => checkInput(field(i), tensor, model.input_shape))
    return tensors
  }

  /**
   * The project new work counts towards: the one named (it must be the customer's and still open), or for a
   * batch without one a new batch project. A new project is not appended here: its CreateProject (`start`)
   * goes into the same transaction as the job and its tasks, so a failure leaves no project without its job.
   * `attempt` > 0 picks another id (the first one's stream existed).
   */
  async function projectFor(customerId: string, model: ModelRow, body: { project_id?: string | undefined; name?: string | undefined }, kind: 'single' | 'batch', inputs: number, attempt: number): Promise<{ id: string | null; validation?: ValidationMode | null; start?: StreamStart }> {
    if (body.project_id) {
      const project = await findProject(services.db, customerId, body.project_id)
      if (!project) throw new DomainError('NOT_FOUND', `project ${body.project_id} not found`)
      if (project.state !== 'active') throw new DomainError('CONFLICT', `project ${body.project_id} is ${project.state}; it takes no new work`)
      return { id: project.project_id, validation: project.validation }
    }
    if (kind === 'single') return { id: null }
    const at = services.now()
    const projectId = attempt === 0 ? `batch_${at.getTime()}` : `batch_${at.getTime()}_${newId('').slice(1, 7)}`
    const project = { project_id: projectId, customer_id: customerId, name: body.name ?? `Batch of ${inputs}`, project_type: 'batch' as const, model_id: model.model_id, total_tasks: inputs, validation: null, created_at: at.toISOString() }
    return { id: projectId, start: { streamId: projectStream(projectId), decider: projectDecider, command: { type: 'CreateProject', project }, metadata: { customerId, occurredAt: project.created_at } } }
  }

  /** Checks the model and the inputs, records the job and queues its tasks. */
  async function submit(
    customerId: string,
    body: { model_id: string; project_id?: string | undefined; name?: string | undefined },
    rawInputs: unknown[],
    kind: 'single' | 'batch',
    /** The id the job gets (`createdId`: the same for every run of one request under one Idempotency-Key). */
    jobId: string,
    mode: 'sync' | 'async',
    placement: { prefer_gpu?: boolean | undefined; instance_type?: 'aws' | 'user' | undefined; validation?: ValidationMode | undefined } | undefined,
    /** Called with the task ids before they are queued: a waiter set up here cannot miss the outcome. */
    beforeQueue: (taskIds: string[]) => void = () => {},
  ) {
    const model = await services.projections.cached('models', `${customerId}/${body.model_id}`, () => findModel(services.db, customerId, body.model_id))
    if (!model) throw new DomainError('NO_MODEL', `model ${body.model_id} not found`)
    const inputs = await toTensors(model, rawInputs, (i) => (kind === 'single' ? 'input' : `inputs.${i}`))
    const instanceType = placement?.instance_type
    const capacity = services.hub.capacity(model.format, instanceType)
    if (capacity.slots === 0) throw new DomainError('NO_DEVICES', `no connected ${instanceType ? `${instanceType} ` : ''}device can run ${model.format} models`)
    /** Records the job, its tasks and a new batch project (`project.start`) all or nothing, and queues the tasks. */
    const record = async (project: Awaited<ReturnType<typeof projectFor>>) => {
      const projectId = project.id
      const validation = resolvePolicy(placement?.validation, project.validation, { mode: model.validation ?? undefined, tolerance: model.validation_tolerance ?? undefined }, services.limits.validationSpotRate)
      const at = services.now().toISOString()
      const sizes = kind === 'single' ? [1] : chunkSizes(inputs.length, capacity)
      const tasks = sizes.map((n, i) => ({ task_id: inferenceTaskId(jobId, i), inputs: n }))
      const request = { job_id: jobId, customer_id: customerId, project_id: projectId, model_id: model.model_id, kind, mode, name: body.name ?? null, tasks, requested_at: at }
      // The job, its tasks and a new batch project are new streams, written all or nothing (`appendAll`: one
      // transaction and one commit on Postgres, a recorded intent on EventStoreDB): no job is ever recorded
      // without its tasks (on EventStoreDB, not for good: a stop part way is completed at the next start),
      // nor a project without its job. No wait for the read models:
      // the reads of jobs, projects and usage wait for them to reach the head of the log.
      beforeQueue(tasks.map((t) => t.task_id))
      let first = 0
      await services.scheduler.submitAll(
        tasks.map((task) => ({
          task_id: task.task_id,
          customer_id: customerId,
          job_id: jobId,
          project_id: projectId,
          model: { id: model.model_id, format: model.format, checksum: model.checksum },
          inputs: inputs.slice(first, (first += task.inputs)),
          output_shape: model.output_shape,
          prefer_gpu: placement?.prefer_gpu ?? false,
          instance_type: instanceType ?? null,
          validation,
          // a single input may be merged with others into one device task (dynamic batching); a batch's
          // chunks are device tasks of their own already
          batching: kind === 'single' ? batchingOf(model) : null,
        })),
        { customerId },
        [...(project.start ? [project.start] : []), { streamId: inferenceStream(jobId), decider: inferenceDecider, command: { type: 'RequestInference', request }, metadata: { customerId, occurredAt: at } }],
      )
      return { jobId, total: inputs.length, projectId, model }
    }
    const admitted = services.scheduler.admit(
      { inputs: inputs.length, bytes: tensorBytes(inputs), customerId },
      { inputs: services.limits.maxQueuedInputs, bytes: services.limits.maxQueuedBytes, bytesPerCustomer: services.limits.maxQueuedBytesPerCustomer },
    )
    try {
      for (let attempt = 0; ; attempt++) {
        const project = await projectFor(customerId, model, body, kind, inputs.length, attempt)
        try {
          return await record(project)
        } catch (error) {
          // only a new batch project's stream can exist already (the job's and tasks' ids are fresh): another id
          if (!(error instanceof WrongExpectedRevisionError && project.start) || attempt >= 3) throw error
        }
      }
    } finally {
      admitted()
    }
  }

  /** Raw outputs in the business format of the model's postprocessing adapter (unchanged without one, or when `raw`). */
  async function present(model: ModelRow | undefined, outputs: Tensor[], raw: boolean): Promise<unknown[]> {
    if (raw || !model || !postprocessed(model) || outputs.length === 0) return outputs
    try {
      return await services.adapters.postprocess(adapterModel(model), outputs)
    } catch (error) {
      // The model's output, not the request, does not fit: the customer's model setup, reported as such.
      if (error instanceof DomainError && error.code === 'VALIDATION_ERROR') {
        throw new DomainError('INFERENCE_FAILED', `the model's output does not fit its ${model.postprocessing} adapter (${error.message}); ?raw=true gives the raw output`)
      }
      throw error
    }
  }

  /** The job an earlier run of this request created (from its stream: the read models may lag), if it did. */
  async function earlierJob(request: FastifyRequest, prefix: 'infer' | 'batch') {
    const job = (await loadState(services.store, inferenceStream(createdId(request, prefix)), inferenceDecider))?.request
    return job && job.customer_id === customerOf(request) ? job : undefined
  }

  /** A single request's job as its first run would have answered: queued (async), else its outcome so far. */
  async function recoverSingle(request: FastifyRequest, reply: FastifyReply) {
    const job = await earlierJob(request, 'infer')
    if (!job) return undefined
    if (job.mode === 'async') return reply.status(202).send(queuedSingle(job.job_id))
    // the outcome so far, from the read models once they hold what the log holds
    await readYourWrites(services, await services.store.headPosition())
    const row = await findJob(services.db, job.customer_id, job.job_id)
    const { results: [only] } = await jobResults(services.db, job.job_id, { limit: 1, offset: 0 }, Infinity, { blobs: services.blobs, log: (message) => request.log.error(message) })
    const status = row && only ? jobStatus(row) : 'queued'
    if (status === 'failed' || status === 'cancelled') throw notCompleted(job.job_id, status === 'failed' ? (only?.error ?? 'the task failed') : undefined)
    if (status !== 'completed' || !only?.output) {
      throw new DomainError('TIMEOUT', `no result yet (this request's first run stopped before it answered); the job goes on: poll /api/v1/inference/${job.job_id}`, { job_id: job.job_id })
    }
    const model = await findModel(services.db, job.customer_id, job.model_id)
    const [result] = await present(model, [only.output], SingleQuery.parse(request.query).raw === 'true')
    const latency = Date.parse(only.finished_at ?? job.requested_at) - Date.parse(job.requested_at)
    return reply.send({ job_id: job.job_id, status: 'completed', result, latency_ms: Math.max(0, Math.round(latency)), device_id: only.device_id })
  }

  async function recoverBatch(request: FastifyRequest, reply: FastifyReply) {
    const job = await earlierJob(request, 'batch')
    return job && reply.status(202).send(queuedBatch(job.job_id, job.project_id, job.tasks.reduce((n, task) => n + task.inputs, 0)))
  }

  app.post('/inference', {
    config: { ...config, idempotent: { headers: ['x-async'], recover: recoverSingle, waits: (request) => waitOf(request) ?? 0 }, success: { 200: 'The result (synchronous)', 202: 'Queued (asynchronous): poll `poll_url`' }, links: jobLinks },
    schema: {
      operationId: 'runInference',
      response: { 200: Completed, 202: Queued },
      summary: 'Run inference on one input: synchronous by default; ?async=true, X-Async: true or "async": true for 202 and a poll URL',
      tags: ['inference'],
      body: SingleBody,
      querystring: SingleQuery,
    },
  }, async (request, reply) => {
    const customerId = customerOf(request)
    const body = request.body
    const mode = wantsAsync(request, request.query, body) ? 'async' : 'sync'
    const started = performance.now()
    let waiting: Promise<TaskOutcome> | undefined
    // a submit that fails after the wait began ends the wait (no outcome will come), not its timeout
    const submitted = new AbortController()
    const { jobId, model } = await submit(customerId, body, [body.input], 'single', createdId(request, 'infer'), mode, body.options, (taskIds) => {
      if (mode !== 'sync') return
      waiting = services.scheduler.outcome(taskIds[0]!, body.options?.timeout ?? DEFAULT_TIMEOUT_MS, submitted.signal)
      waiting.catch(() => {}) // awaited below; this only keeps a failed submit from leaving it unhandled
    }).catch((error: unknown) => {
      submitted.abort(error)
      throw error
    })
    if (mode === 'async' || !waiting) return reply.status(202).send(queuedSingle(jobId))
    let outcome: TaskOutcome
    try {
      outcome = await waiting
    } catch (error) {
      // the request stops waiting, the job does not: say where to find its result
      const why = error instanceof DomainError && { TIMEOUT: `no result within ${body.options?.timeout ?? DEFAULT_TIMEOUT_MS} ms`, SERVICE_UNAVAILABLE: 'the server is shutting down' }[error.code]
      if (why) throw new DomainError((error as DomainError).code, `${why}; the job goes on: poll /api/v1/inference/${jobId}`, { job_id: jobId })
      throw error
    }
    if (outcome.status !== 'completed') throw notCompleted(jobId, outcome.status === 'failed' ? outcome.reason : undefined)
    // No wait for the read models here: the answer carries the result, and a GET of the job waits for them.
    const [result] = await present(model, outcome.outputs, request.query.raw === 'true')
    return { job_id: jobId, status: 'completed' as const, result, latency_ms: Math.round(performance.now() - started), device_id: outcome.deviceId }
  })

  app.post('/inference/batch', {
    config: {
      ...config,
      idempotent: { recover: recoverBatch },
      success: { 202: 'Queued: poll `poll_url`' },
      links: {
        ...jobLinks,
        GetProject: { operationId: 'getProject', parameters: { id: '$response.body#/project_id' } },
        GetProjectAnalytics: { operationId: 'getProjectAnalytics', parameters: { id: '$response.body#/project_id' } },
      },
    },
    bodyLimit: BATCH_BODY_LIMIT,
    validatorCompiler: batchBodyValidator,
    schema: { operationId: 'runBatchInference', summary: 'Run inference on many inputs (always asynchronous)', tags: ['inference'], body: BatchBody, response: { 202: BatchQueued } },
  }, async (request, reply) => {
    const customerId = customerOf(request)
    const { jobId, total, projectId } = await submit(customerId, request.body, request.body.inputs, 'batch', createdId(request, 'batch'), 'async', request.body.options)
    return reply.status(202).send(queuedBatch(jobId, projectId, total))
  })

  app.get('/inference/:jobId', {
    config,
    schema: {
      operationId: 'getInferenceJob',
      response: { 200: Job },
      summary: 'Status of an inference job; for a batch its progress and results so far, a page at a time',
      tags: ['inference'],
      params: JobParams,
      querystring: pageQuery(10_000).extend({ raw: z.enum(['true', 'false']).optional().describe('true: raw output tensors even when the model has a postprocessing adapter') }),
    },
  }, async (request) => {
    const customerId = customerOf(request)
    // read-your-writes for whatever this client did before (a sync answer does not wait for the read models)
    await readYourWrites(services, await services.store.headPosition())
    const job = await findJob(services.db, customerId, request.params.jobId)
    if (!job) throw new DomainError('NOT_FOUND', `inference job ${request.params.jobId} not found`)
    const status = jobStatus(job)
    const { results: rows, more } = await jobResults(services.db, job.job_id, request.query, services.limits.maxPageValues, { blobs: services.blobs, log: (message) => request.log.error(message) })
    const model = await findModel(services.db, customerId, job.model_id)
    const done = rows.filter((r) => r.output)
    const presented = await present(model, done.map((r) => r.output!), request.query.raw === 'true')
    const resultOf = new Map(done.map((r, i) => [r.idx, presented[i]]))
    /** An unfinished job no connected device can run says so (its tasks wait for one, the job does not fail). */
    const waitingReason = (now: string, format: string | undefined) =>
      (now === 'queued' || now === 'running') && format && !services.hub.hasCapableDevice(format) ? { waiting_reason: `no connected device runs ${format} models; its tasks wait for one` } : undefined
    const view = {
      job_id: job.job_id,
      status,
      model_id: job.model_id,
      project_id: job.project_id,
      ...(job.name ? { name: job.name } : {}),
      ...(waitingReason(status, model?.format) ?? {}),
      created_at: job.requested_at,
      updated_at: job.updated_at,
    }
    if (job.kind === 'single') {
      const only = rows[0]
      return { type: 'inference' as const, ...view, ...(only?.output ? { result: resultOf.get(only.idx), device_id: only.device_id } : {}), ...(only?.error ? { error: only.error } : {}) }
    }
    const finished = job.completed + job.failed
    return {
      type: 'batch' as const,
      ...view,
      total_tasks: job.total_tasks,
      progress: { completed: job.completed, failed: job.failed, pending: job.cancelled ? 0 : job.total_tasks - finished, percent_complete: Math.round((finished / job.total_tasks) * 1000) / 10 },
      results: rows.map((r) => ({ index: r.idx, status: r.status, ...(r.output ? { result: resultOf.get(r.idx) } : {}), ...(r.error ? { error: r.error } : {}) })),
      limit: request.query.limit,
      offset: request.query.offset,
      // a page of large outputs ends early (maxPageValues): ask again from here
      ...(more ? { next_offset: request.query.offset + rows.length } : {}),
    }
  })

  app.delete('/inference/:jobId', {
    config,
    schema: { operationId: 'cancelInference', summary: 'Cancel an inference job: its queued and running tasks stop; CANNOT_CANCEL once it finished', tags: ['inference'], params: JobParams, response: { 200: Cancelled } },
  }, async (request) => {
    const customerId = customerOf(request)
    // the job and its open tasks as of now (a submission does not wait for the read models)
    await readYourWrites(services, await services.store.headPosition())
    const job = await findJob(services.db, customerId, request.params.jobId)
    if (!job) throw new DomainError('NOT_FOUND', `inference job ${request.params.jobId} not found`)
    const cancelled = await cancelJob(services, customerId, job)
    return { job_id: job.job_id, status: 'cancelled' as const, cancelled_tasks: cancelled }
  })
}

const queuedSingle = (jobId: string) => ({ job_id: jobId, status: 'queued' as const, message: 'Inference job queued', poll_url: `/api/v1/inference/${jobId}` })
// a batch always has a project: the one named, else a new one (projectFor)
const queuedBatch = (jobId: string, projectId: string | null, inputs: number) => ({ job_id: jobId, project_id: projectId!, status: 'queued' as const, total_tasks: inputs, poll_url: `/api/v1/inference/${jobId}` })

/** A synchronous request's answer for a job that failed (with the reason) or was cancelled. */
const notCompleted = (jobId: string, reason: string | undefined) => new DomainError('INFERENCE_FAILED', reason ?? 'the job was cancelled', { job_id: jobId })

/** How long a synchronous request waits for its result (undefined: it is asynchronous). */
function waitOf(request: FastifyRequest): number | undefined {
  const body = Waiting.safeParse(request.body)
  const query = SingleQuery.safeParse(request.query)
  if (!body.success || wantsAsync(request, query.success ? query.data : {}, body.data)) return undefined
  return body.data.options?.timeout ?? DEFAULT_TIMEOUT_MS
}

/** The model as the adapters see it. */
function adapterModel(model: ModelRow): AdapterModel {
  return {
    model_id: model.model_id,
    input_shape: model.input_shape,
    output_shape: model.output_shape,
    input_schema: model.input_schema,
    labels: model.labels,
    preprocessing: model.preprocessing,
    postprocessing: model.postprocessing,
    adapter_options: model.adapter_options ?? null,
  }
}
