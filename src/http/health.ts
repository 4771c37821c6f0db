import type { FastifyPluginAsync } from 'fastify'
import { z } from 'zod'
import { deviceStats } from '../projections/devices.js'
import { countModels } from '../projections/models.js'
import { countOpenTasks } from '../projections/tasks.js'
import { version } from '../version.js'
import type { Services } from './context.js'
import { Timestamp } from './responses.js'

/** Projections further behind the log than this make the platform `degraded`. */
const LAG_DEGRADED = 1000

const Status = z.enum(['healthy', 'degraded', 'unhealthy'])
const Health = z.object({ status: z.literal('healthy'), version: z.string(), timestamp: Timestamp })
const Part = <T extends z.ZodRawShape>(shape: T) => z.object({ status: Status, ...shape })
const HealthDetailed = z.object({
  status: Status,
  version: z.string(),
  timestamp: Timestamp,
  services: z.object({
    device_registry: Part({ devices: z.number().int(), formats: z.object({ onnx: z.number().int(), torchscript: z.number().int() }).describe('connected devices taking work, by the model formats they run: a format at 0 gets 503 NO_DEVICES') }),
    resource_pool: Part({ available: z.number().int() }),
    job_manager: Part({ active_jobs: z.number().int() }),
    model_store: Part({ models: z.number().int() }),
    websocket: Part({ connections: z.number().int() }),
    event_store: Part({ adapter: z.string(), head: z.string().optional().describe('position of the last event'), error: z.string().optional() }),
    projections: Part({
      items: z.array(z.object({ name: z.string(), state: z.string(), checkpoint: z.string(), lag: z.number(), error: z.string().optional() })),
    }),
  }),
  resources: z.object({ devices: z.object({ total: z.number().int(), idle: z.number().int(), busy: z.number().int(), offline: z.number().int() }) }),
  jobs: z.object({
    queued_tasks: z.number().int(),
    leased_tasks: z.number().int().describe('device tasks under a lease (a merged one counts once)'),
    dispatched: z.object({
      device_tasks: z.number().int().describe('device tasks sent since the server started'),
      tasks: z.number().int().describe('tasks they carried (a merged device task carries several single-input requests)'),
      merged_mean: z.number().describe('tasks per device task (dynamic batching); 0 before the first'),
    }),
  }),
})

/** `GET /health` and `GET /health/detailed`: no auth. */
export const healthRoutes: FastifyPluginAsync<{ services: Services }> = async (app, { services }) => {
  const config = { auth: 'none' as const, rateLimit: false }

  app.get('/health', { config, schema: { summary: 'Basic health check', tags: ['health'], response: { 200: Health } } }, async () => ({
    status: 'healthy',
    version,
    timestamp: new Date().toISOString(),
  }))

  app.get('/health/detailed', { config, schema: { summary: 'Health of every service, the event store and the projections (503 with the same body when the event store is unreachable)', tags: ['health'], response: { 200: HealthDetailed, 503: HealthDetailed } } }, async (_request, reply) => {
    const [eventStore, projections, models, devices, tasks] = await Promise.all([
      services.store.headPosition().then(
        (head) => ({ status: 'healthy', adapter: services.store.constructor.name, head: head.toString() }),
        (error: Error) => ({ status: 'unhealthy', adapter: services.store.constructor.name, error: error.message }),
      ),
      services.projections.status().catch(() => []),
      countModels(services.db).catch(() => null),
      deviceStats(services.db).catch(() => null),
      countOpenTasks(services.db).catch(() => null),
    ])
    const projectionsHealthy = projections.length > 0 && projections.every((p) => p.state !== 'failed' && p.lag < LAG_DEGRADED)
    const readable = models !== null && devices !== null && tasks !== null
    const status = eventStore.status !== 'healthy' ? 'unhealthy' : projectionsHealthy && readable ? 'healthy' : 'degraded'
    const fleet = devices ?? { total: 0, idle: 0, busy: 0, offline: 0 }
    const jobs = tasks ?? { queued: 0, leased: 0 }
    const body = {
      status,
      version,
      timestamp: new Date().toISOString(),
      services: {
        device_registry: { status: devices ? 'healthy' : 'unhealthy', devices: fleet.total, formats: services.hub.devicesByFormat() },
        resource_pool: { status: devices ? 'healthy' : 'unhealthy', available: fleet.idle },
        job_manager: { status: tasks ? 'healthy' : 'unhealthy', active_jobs: jobs.queued + jobs.leased },
        model_store: { status: models === null ? 'unhealthy' : 'healthy', models: models ?? 0 },
        websocket: { status: 'healthy', connections: services.hub.connections },
        event_store: eventStore,
        projections: {
          status: projectionsHealthy ? 'healthy' : 'degraded',
          items: projections.map((p) => ({ name: p.name, state: p.state, checkpoint: p.checkpoint, lag: p.lag, ...(p.lastError ? { error: p.lastError } : {}) })),
        },
      },
      resources: { devices: { total: fleet.total, idle: fleet.idle, busy: fleet.busy, offline: fleet.offline } },
      jobs: { queued_tasks: services.scheduler.queued, leased_tasks: services.scheduler.leased, dispatched: dispatchedOf(services.scheduler.dispatched) },
    }
    return reply.status(status === 'unhealthy' ? 503 : 200).send(body)
  })
}

/** Dispatch counts since the start, and how many tasks a device task carried on average. */
function dispatchedOf(counts: { deviceTasks: number; tasks: number }) {
  return { device_tasks: counts.deviceTasks, tasks: counts.tasks, merged_mean: counts.deviceTasks === 0 ? 0 : Math.round((counts.tasks / counts.deviceTasks) * 100) / 100 }
}
