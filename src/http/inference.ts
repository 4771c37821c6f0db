import { Ajv } from 'ajv'
import type { FastifyPluginAsync, FastifyRequest } from 'fastify'
import type { ZodTypeProvider } from 'fastify-type-provider-zod'
import { z } from 'zod'
import type { TaskOutcome } from '../commands/scheduler.js'
import { DomainError } from '../domain/errors.js'
import { inferenceDecider, inferenceStream, inferenceTaskId } from '../domain/inference-job.js'
import { findJob, jobResults, jobStatus, openTaskIds } from '../projections/inference.js'
import { findModel } from '../projections/models.js'
import { customerOf } from './auth.js'
import { execute, type Services } from './context.js'
import { pageQuery } from './pagination.js'
import { newId } from './ids.js'

const Tensor = z.object({
  data: z.array(z.number()).min(1).max(1_000_000),
  shape: z.array(z.number().int().min(1)).min(1).max(8),
})
type Tensor = z.infer<typeof Tensor>

const SingleBody = z.object({
  model_id: z.string().min(1).max(64),
  input: Tensor,
  async: z.boolean().optional(),
  project_id: z.string().min(1).max(64).optional(),
  options: z
    .object({
      timeout: z.number().int().min(1).max(600_000).optional().describe('ms a synchronous request waits (default 30000)'),
      prefer_gpu: z.boolean().optional(),
    })
    .optional(),
})

const BatchBody = z.object({
  model_id: z.string().min(1).max(64),
  inputs: z.array(Tensor).min(1).max(100_000),
  name: z.string().max(200).optional(),
  project_id: z.string().min(1).max(64).optional(),
  options: z.object({ prefer_gpu: z.boolean().optional() }).optional(),
})

const JobParams = z.object({ jobId: z.string().min(1).max(80) })
const DEFAULT_TIMEOUT_MS = 30_000
const ajv = new Ajv({ strict: false, allErrors: false })

/** The input must fit the model: data as long as the shape says, the shape as the model declares (-1: any size). */
export function checkInput(field: string, input: Tensor, declared: number[] | null): void {
  const size = input.shape.reduce((a, b) => a * b, 1)
  if (size !== input.data.length) throw new DomainError('VALIDATION_ERROR', `${field}.data: ${input.data.length} values do not fill shape ${JSON.stringify(input.shape)} (${size})`)
  if (!declared) return
  const fits = declared.length === input.shape.length && declared.every((d, i) => d === -1 || d === input.shape[i])
  if (!fits) throw new DomainError('VALIDATION_ERROR', `${field}.shape: ${JSON.stringify(input.shape)} does not match the model's input shape ${JSON.stringify(declared)}`)
}

function checkSchema(field: string, input: Tensor, schema: Record<string, unknown> | null): void {
  if (!schema) return
  const validate = ajv.compile(schema)
  if (!validate(input)) {
    const first = validate.errors?.[0]
    throw new DomainError('VALIDATION_ERROR', `${field}${first?.instancePath.replaceAll('/', '.') ?? ''}: ${first?.message ?? 'does not match the model input_schema'}`)
  }
}

function wantsAsync(request: FastifyRequest, query: { async?: string | undefined }, body: { async?: boolean | undefined }): boolean {
  return body.async === true || query.async === 'true' || request.headers['x-async'] === 'true'
}

/** `/inference`: one input (sync or async), batches, status and results, cancellation. */
export const inferenceRoutes: FastifyPluginAsync<{ services: Services }> = async (base, { services }) => {
  const app = base.withTypeProvider<ZodTypeProvider>()
  const config = { auth: 'api_key' as const }

  /** Checks the model and the inputs, records the job and queues its tasks. */
  async function submit(
    customerId: string,
    body: { model_id: string; project_id?: string | undefined; name?: string | undefined },
    inputs: Tensor[],
    kind: 'single' | 'batch',
    mode: 'sync' | 'async',
    preferGpu: boolean,
    /** Called with the task ids before they are queued: a waiter set up here cannot miss the outcome. */
    beforeQueue: (taskIds: string[]) => void = () => {},
  ) {
    const model = await findModel(services.db, customerId, body.model_id)
    if (!model) throw new DomainError('NO_MODEL', `model ${body.model_id} not found`)
    inputs.forEach((input, i) => {
      const field = kind === 'single' ? 'input' : `inputs.${i}`
      checkInput(field, input, model.input_shape)
      checkSchema(field, input, model.input_schema)
    })
    if (!services.hub.hasCapableDevice(model.format)) throw new DomainError('NO_DEVICES', `no connected device can run ${model.format} models`)
    const jobId = newId(kind === 'single' ? 'infer' : 'batch')
    const at = services.now().toISOString()
    const taskIds = inputs.map((_, i) => inferenceTaskId(jobId, i))
    const projectId = body.project_id ?? (kind === 'batch' ? `batch_${Date.parse(at)}` : null)
    const request = { job_id: jobId, customer_id: customerId, project_id: projectId, model_id: model.model_id, kind, mode, name: body.name ?? null, task_ids: taskIds, requested_at: at }
    await execute(services, inferenceStream(jobId), inferenceDecider, { type: 'RequestInference', request }, { metadata: { customerId, occurredAt: at } })
    beforeQueue(taskIds)
    await Promise.all(
      inputs.map((input, i) =>
        services.scheduler.submit(
          { task_id: taskIds[i]!, customer_id: customerId, job_id: jobId, model: { id: model.model_id, format: model.format, checksum: model.checksum }, input, prefer_gpu: preferGpu },
          { customerId },
        ),
      ),
    )
    return { jobId, taskIds, projectId }
  }

  app.post('/inference', {
    config,
    schema: {
      summary: 'Run inference on one input: synchronous by default; ?async=true, X-Async: true or "async": true for 202 and a poll URL',
      tags: ['inference'],
      body: SingleBody,
      querystring: z.object({ async: z.enum(['true', 'false']).optional() }),
    },
  }, async (request, reply) => {
    const customerId = customerOf(request)
    const body = request.body
    const mode = wantsAsync(request, request.query, body) ? 'async' : 'sync'
    const started = performance.now()
    let waiting: Promise<TaskOutcome> | undefined
    const { jobId } = await submit(customerId, body, [body.input], 'single', mode, body.options?.prefer_gpu ?? false, (taskIds) => {
      if (mode !== 'sync') return
      waiting = services.scheduler.outcome(taskIds[0]!, body.options?.timeout ?? DEFAULT_TIMEOUT_MS)
      waiting.catch(() => {}) // awaited below; this only keeps a failed submit from leaving it unhandled
    })
    if (mode === 'async' || !waiting) {
      return reply.status(202).send({ job_id: jobId, status: 'queued', message: 'Inference job queued', poll_url: `/api/v1/inference/${jobId}` })
    }
    let outcome: TaskOutcome
    try {
      outcome = await waiting
    } catch (error) {
      if (error instanceof DomainError && error.code === 'TIMEOUT') {
        throw new DomainError('TIMEOUT', `no result within ${body.options?.timeout ?? DEFAULT_TIMEOUT_MS} ms; the job goes on: poll /api/v1/inference/${jobId}`)
      }
      throw error
    }
    if (outcome.status !== 'completed') throw new DomainError('INFERENCE_FAILED', outcome.status === 'failed' ? outcome.reason : 'the job was cancelled')
    await services.projections.waitFor(outcome.position)
    return { job_id: jobId, status: 'completed', result: outcome.output, latency_ms: Math.round(performance.now() - started), device_id: outcome.deviceId }
  })

  app.post('/inference/batch', {
    config,
    schema: { summary: 'Run inference on many inputs (always asynchronous)', tags: ['inference'], body: BatchBody },
  }, async (request, reply) => {
    const customerId = customerOf(request)
    const { jobId, taskIds, projectId } = await submit(customerId, request.body, request.body.inputs, 'batch', 'async', request.body.options?.prefer_gpu ?? false)
    return reply.status(202).send({ job_id: jobId, project_id: projectId, status: 'queued', total_tasks: taskIds.length, poll_url: `/api/v1/inference/${jobId}` })
  })

  app.get('/inference/:jobId', {
    config,
    schema: {
      summary: 'Status of an inference job; for a batch its progress and results so far, a page at a time',
      tags: ['inference'],
      params: JobParams,
      querystring: pageQuery(10_000),
    },
  }, async (request) => {
    const job = await findJob(services.db, customerOf(request), request.params.jobId)
    if (!job) throw new DomainError('NOT_FOUND', `inference job ${request.params.jobId} not found`)
    const status = jobStatus(job)
    const results = await jobResults(services.db, job.job_id, request.query)
    const view = {
      job_id: job.job_id,
      type: job.kind === 'batch' ? 'batch' : 'inference',
      status,
      model_id: job.model_id,
      project_id: job.project_id,
      ...(job.name ? { name: job.name } : {}),
      created_at: job.requested_at,
      updated_at: job.updated_at,
    }
    if (job.kind === 'single') {
      const only = results[0]
      return { ...view, ...(only?.output ? { result: only.output, device_id: only.device_id } : {}), ...(only?.error ? { error: only.error } : {}) }
    }
    const done = job.completed + job.failed
    return {
      ...view,
      total_tasks: job.total_tasks,
      progress: { completed: job.completed, failed: job.failed, pending: job.cancelled ? 0 : job.total_tasks - done, percent_complete: Math.round((done / job.total_tasks) * 1000) / 10 },
      results: results.map((r) => ({ index: r.idx, status: r.status, ...(r.output ? { result: r.output } : {}), ...(r.error ? { error: r.error } : {}) })),
      limit: request.query.limit,
      offset: request.query.offset,
    }
  })

  app.delete('/inference/:jobId', {
    config,
    schema: { summary: 'Cancel an inference job: its queued and running tasks stop; CANNOT_CANCEL once it finished', tags: ['inference'], params: JobParams },
  }, async (request) => {
    const customerId = customerOf(request)
    const job = await findJob(services.db, customerId, request.params.jobId)
    if (!job) throw new DomainError('NOT_FOUND', `inference job ${request.params.jobId} not found`)
    const status = jobStatus(job)
    const at = services.now().toISOString()
    await execute(services, inferenceStream(job.job_id), inferenceDecider, { type: 'CancelInference', customerId, finished: status === 'completed' || status === 'failed', at }, {
      metadata: { customerId, occurredAt: at },
    })
    const open = await openTaskIds(services.db, job.job_id)
    await Promise.all(open.map((taskId) => services.scheduler.cancel(taskId, customerId).catch((e: unknown) => (e instanceof DomainError && e.code === 'CANNOT_CANCEL' ? undefined : Promise.reject(e)))))
    return { job_id: job.job_id, status: 'cancelled', cancelled_tasks: open.length }
  })
}
