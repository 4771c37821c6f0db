import type { FastifyPluginAsync } from 'fastify'
import type { ZodTypeProvider } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { DomainError } from '../domain/errors.js'
import { PROJECT_TYPES, projectDecider, projectStream } from '../domain/project.js'
import { openJobsOfProject } from '../projections/inference.js'
import { findModel } from '../projections/models.js'
import { findProject, listProjects, projectAnalytics, projectView } from '../projections/projects.js'
import { customerOf } from './auth.js'
import { execute, readYourWrites, type Services } from './context.js'
import { newId } from './ids.js'
import { cancelJob } from './inference.js'
import { pageQuery, wholeNumber } from './pagination.js'
import { VALIDATION_MODES } from '../domain/validation.js'
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

  app.post('/projects', { config: { ...config, idempotent: true, success: { 201: 'The project' } }, schema: { summary: 'Create a project (type realtime, batch, training or benchmark)', tags: ['projects'], body: CreateBody } }, async (request, reply) => {
    const customerId = customerOf(request)
    const body = request.body
    if (body.model_id && !(await findModel(services.db, customerId, body.model_id))) throw new DomainError('NO_MODEL', `model ${body.model_id} not found`)
    const at = services.now().toISOString()
    const name = body.name ?? `${body.type[0]!.toUpperCase()}${body.type.slice(1)} project of ${at.slice(0, 10)} ${at.slice(11, 16)} UTC`
    const project = { project_id: newId('proj'), customer_id: customerId, name, project_type: body.type, model_id: body.model_id ?? null, total_tasks: body.total_tasks ?? null, validation: body.validation ?? null, created_at: at }
    await execute(services, projectStream(project.project_id), projectDecider, { type: 'CreateProject', project }, { metadata: { customerId, occurredAt: at } })
    return reply.status(201).send(projectView((await findProject(services.db, customerId, project.project_id))!))
  })

  app.get('/projects', {
    config,
    schema: {
      summary: 'Your projects, newest first',
      tags: ['projects'],
      querystring: pageQuery().extend({ status: z.enum(['active', 'completed', 'cancelled']).optional(), type: z.enum(PROJECT_TYPES).optional() }),
    },
  }, async (request) => {
    await caughtUp()
    const { total, projects } = await listProjects(services.db, customerOf(request), request.query, request.query)
    return { projects, total, limit: request.query.limit, offset: request.query.offset }
  })

  app.get('/projects/:id', { config, schema: { summary: 'A project with its counts and latency figures', tags: ['projects'], params: ProjectParams } }, async (request) => {
    const project = await owned(customerOf(request), request.params.id)
    const analytics = await projectAnalytics(services.db, project)
    return { ...projectView(project), metrics: { latency_ms: analytics.latency_ms, inputs_per_s: analytics.throughput.inputs_per_s } }
  })

  app.get('/projects/:id/analytics', {
    config,
    schema: {
      summary: 'Latency percentiles, throughput over time, and both by instance type (aws, user)',
      tags: ['projects'],
      params: ProjectParams,
      querystring: z.object({ bucket_seconds: wholeNumber(1, 86_400).optional().describe('width of a throughput bucket (default: the span over 60)') }),
    },
  }, async (request) => {
    const project = await owned(customerOf(request), request.params.id)
    return projectAnalytics(services.db, project, request.query.bucket_seconds)
  })

  app.post('/projects/:id/complete', { config, schema: { summary: 'Mark a project complete (it takes no new work)', tags: ['projects'], params: ProjectParams } }, async (request) => {
    const customerId = customerOf(request)
    const at = services.now().toISOString()
    await execute(services, projectStream(request.params.id), projectDecider, { type: 'CompleteProject', customerId, at }, { metadata: { customerId, occurredAt: at } })
    return projectView(await owned(customerId, request.params.id))
  })

  app.post('/projects/:id/cancel', { config, schema: { summary: 'Cancel a project and every unfinished job in it', tags: ['projects'], params: ProjectParams } }, async (request) => {
    const customerId = customerOf(request)
    const at = services.now().toISOString()
    await execute(services, projectStream(request.params.id), projectDecider, { type: 'CancelProject', customerId, at }, { metadata: { customerId, occurredAt: at } })
    const jobs = await openJobsOfProject(services.db, customerId, request.params.id)
    let tasks = 0
    for (const job of jobs) tasks += await cancelJob(services, customerId, job)
    return { ...projectView(await owned(customerId, request.params.id)), cancelled_jobs: jobs.map((j) => j.job_id), cancelled_tasks: tasks }
  })
}
