import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'
import type { ZodTypeProvider } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { DomainError } from '../domain/errors.js'
import { PROJECT_TYPES, projectDecider, projectStream } from '../domain/project.js'
import { openJobsOfProject } from '../projections/inference.js'
import { findModel } from '../projections/models.js'
import { findProject, listProjects, projectAnalytics, projectView } from '../projections/projects.js'
import { customerOf } from './auth.js'
import { execute, readYourWrites, type Services } from './context.js'
import { createdId } from './idempotency.js'
import { cancelJob } from './inference.js'
import { pageQuery, wholeNumber } from './pagination.js'
import { VALIDATION_MODES } from '../domain/validation.js'
import { page, Timestamp } from './responses.js'
import { freeText } from './text.js'

const CreateBody = z.object({
  // optional, as the spec has it (it marks no field of this body required); an empty name is refused
  name: freeText(200).optional().describe('default: the type and the time of creation, e.g. "Batch project of 2026-11-30 20:05 UTC"'),
  type: z.enum(PROJECT_TYPES).default('realtime'),
  model_id: z.string().min(1).max(64).optional(),
  total_tasks: z.number().int().min(1).max(100_000_000).optional().describe('expected tasks, for progress'),
  validation: z.enum(VALIDATION_MODES).optional().describe("how results from contributed devices are checked (none, spot, quorum) unless a request says; default: the model's"),
})
const ProjectParams = z.object({ id: z.string().min(1).max(80) })

const Count = z.number().int()
const ProjectStatus = z.enum(['active', 'completed', 'cancelled'])
/** A project as `projectView` serves it; counts are of inputs. */
const ProjectView = z.object({
  project_id: z.string(),
  name: z.string(),
  type: z.enum(PROJECT_TYPES),
  model_id: z.string().nullable(),
  validation: z.enum(VALIDATION_MODES).nullable(),
  status: ProjectStatus.describe('a batch project whose inputs all finished is completed'),
  total_tasks: Count.describe('the expected inputs, else those submitted'),
  submitted_tasks: Count,
  completed_tasks: Count,
  failed_tasks: Count,
  cancelled_tasks: Count,
  pending_tasks: Count,
  percent_complete: z.number(),
  created_at: Timestamp,
  updated_at: Timestamp,
  ended_at: Timestamp.optional().describe('when it was completed or cancelled (absent while active)'),
})
const Ms = z.number().nullable()
const Latency = z.object({ count: Count, p50: Ms, p90: Ms, p95: Ms, p99: Ms, mean: Ms, min: Ms, max: Ms }).describe('ms from queued to completed, of the completed tasks; null when none')
const Series = z.array(z.object({ time: Timestamp.describe('start of the bucket'), tasks: Count, inputs: Count, inputs_per_s: z.number() }))
const ByInstanceType = z.object({ completed_tasks: Count, completed_inputs: Count, latency_ms: Latency, throughput: z.object({ inputs_per_s: z.number(), series: Series }) })
const Analytics = z.object({
  project_id: z.string(),
  status: ProjectStatus,
  total_tasks: Count,
  completed_tasks: Count,
  failed_tasks: Count,
  latency_ms: Latency,
  throughput: z.object({ bucket_seconds: Count, inputs_per_s: z.number(), series: Series }),
  by_instance_type: z.object({ aws: ByInstanceType, user: ByInstanceType }),
})
const ProjectDetails = ProjectView.extend({ metrics: z.object({ latency_ms: Latency, inputs_per_s: z.number() }) })
const CancelledProject = ProjectView.extend({ cancelled_jobs: z.array(z.string()).describe('the inference jobs it cancelled'), cancelled_tasks: Count.describe('their tasks that were queued or running') })
const byId = { parameters: { id: '$response.body#/project_id' } }

/** `/projects`: group jobs for tracking; details, analytics, completion and cancellation. */
export const projectRoutes: FastifyPluginAsync<{ services: Services }> = async (base, { services }) => {
  const app = base.withTypeProvider<ZodTypeProvider>()
  const config = { auth: 'api_key' as const }
  /** Reads see every task outcome so far (synchronous inference answers before the read models catch up). */
  const caughtUp = async () => readYourWrites(services, await services.store.headPosition())

  async function owned(customerId: string, projectId: string) {
    await caughtUp()
    const project = await findProject(services.db, customerId, projectId)
    if (!project) throw new DomainError('NOT_FOUND', `project ${projectId} not found`)
    return project
  }

  /** The project an earlier run of this request created. */
  async function recoverProject(request: FastifyRequest, reply: FastifyReply) {
    await caughtUp()
    const project = await findProject(services.db, customerOf(request), createdId(request, 'proj'))
    return project && reply.status(201).send(projectView(project))
  }

  app.post('/projects', {
    config: {
      ...config,
      idempotent: { recover: recoverProject },
      success: { 201: 'The project' },
      links: {
        GetProject: { operationId: 'getProject', ...byId },
        GetProjectAnalytics: { operationId: 'getProjectAnalytics', ...byId },
        CompleteProject: { operationId: 'completeProject', ...byId },
        CancelProject: { operationId: 'cancelProject', ...byId },
        RunInference: { operationId: 'runInference', requestBody: { project_id: '$response.body#/project_id' } },
      },
    },
    schema: { operationId: 'createProject', summary: 'Create a project (type realtime, batch, training or benchmark)', tags: ['projects'], body: CreateBody, response: { 201: ProjectView } },
  }, async (request, reply) => {
    const customerId = customerOf(request)
    const body = request.body
    if (body.model_id && !(await findModel(services.db, customerId, body.model_id))) throw new DomainError('NO_MODEL', `model ${body.model_id} not found`)
    const at = services.now().toISOString()
    const name = body.name ?? `${body.type[0]!.toUpperCase()}${body.type.slice(1)} project of ${at.slice(0, 10)} ${at.slice(11, 16)} UTC`
    const project = { project_id: createdId(request, 'proj'), customer_id: customerId, name, project_type: body.type, model_id: body.model_id ?? null, total_tasks: body.total_tasks ?? null, validation: body.validation ?? null, created_at: at }
    await execute(services, projectStream(project.project_id), projectDecider, { type: 'CreateProject', project }, { metadata: { customerId, occurredAt: at } })
    return reply.status(201).send(projectView((await findProject(services.db, customerId, project.project_id))!))
  })

  app.get('/projects', {
    config,
    schema: {
      operationId: 'listProjects',
      response: { 200: page('projects', ProjectView) },
      summary: 'Your projects, newest first',
      tags: ['projects'],
      querystring: pageQuery().extend({ status: z.enum(['active', 'completed', 'cancelled']).optional(), type: z.enum(PROJECT_TYPES).optional() }),
    },
  }, async (request) => {
    await caughtUp()
    const { total, projects } = await listProjects(services.db, customerOf(request), request.query, request.query)
    return { projects, total, limit: request.query.limit, offset: request.query.offset }
  })

  app.get('/projects/:id', { config, schema: { operationId: 'getProject', summary: 'A project with its counts and latency figures', tags: ['projects'], params: ProjectParams, response: { 200: ProjectDetails } } }, async (request) => {
    const project = await owned(customerOf(request), request.params.id)
    const analytics = await projectAnalytics(services.db, project)
    return { ...projectView(project), metrics: { latency_ms: analytics.latency_ms, inputs_per_s: analytics.throughput.inputs_per_s } }
  })

  app.get('/projects/:id/analytics', {
    config,
    schema: {
      operationId: 'getProjectAnalytics',
      response: { 200: Analytics },
      summary: 'Latency percentiles, throughput over time, and both by instance type (aws, user)',
      tags: ['projects'],
      params: ProjectParams,
      querystring: z.object({ bucket_seconds: wholeNumber(1, 86_400).optional().describe('width of a throughput bucket (default: the span over 60)') }),
    },
  }, async (request) => {
    const project = await owned(customerOf(request), request.params.id)
    return projectAnalytics(services.db, project, request.query.bucket_seconds)
  })

  app.post('/projects/:id/complete', { config, schema: { operationId: 'completeProject', summary: 'Mark a project complete (it takes no new work)', tags: ['projects'], params: ProjectParams, response: { 200: ProjectView } } }, async (request) => {
    const customerId = customerOf(request)
    const at = services.now().toISOString()
    await execute(services, projectStream(request.params.id), projectDecider, { type: 'CompleteProject', customerId, at }, { metadata: { customerId, occurredAt: at } })
    return projectView(await owned(customerId, request.params.id))
  })

  app.post('/projects/:id/cancel', { config, schema: { operationId: 'cancelProject', summary: 'Cancel a project and every unfinished job in it', tags: ['projects'], params: ProjectParams, response: { 200: CancelledProject } } }, async (request) => {
    const customerId = customerOf(request)
    const at = services.now().toISOString()
    await execute(services, projectStream(request.params.id), projectDecider, { type: 'CancelProject', customerId, at }, { metadata: { customerId, occurredAt: at } })
    const jobs = await openJobsOfProject(services.db, customerId, request.params.id)
    let tasks = 0
    for (const job of jobs) tasks += await cancelJob(services, customerId, job)
    return { ...projectView(await owned(customerId, request.params.id)), cancelled_jobs: jobs.map((j) => j.job_id), cancelled_tasks: tasks }
  })
}
