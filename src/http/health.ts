import type { FastifyPluginAsync } from 'fastify'
import { countModels } from '../projections/models.js'
import { version } from '../version.js'
import type { Services } from './context.js'

/** Projections further behind the log than this make the platform `degraded`. */
const LAG_DEGRADED = 1000

/** `GET /health` and `GET /health/detailed`: no auth. */
export const healthRoutes: FastifyPluginAsync<{ services: Services }> = async (app, { services }) => {
  const config = { auth: 'none' as const, rateLimit: false }

  app.get('/health', { config, schema: { summary: 'Basic health check', tags: ['health'] } }, async () => ({
    status: 'healthy',
    version,
    timestamp: new Date().toISOString(),
  }))

  app.get('/health/detailed', { config, schema: { summary: 'Health of every service, the event store and the projections', tags: ['health'] } }, async (_request, reply) => {
    const [eventStore, projections, models] = await Promise.all([
      services.store.headPosition().then(
        (head) => ({ status: 'healthy', adapter: services.store.constructor.name, head: head.toString() }),
        (error: Error) => ({ status: 'unhealthy', adapter: services.store.constructor.name, error: error.message }),
      ),
      services.projections.status().catch(() => []),
      countModels(services.db).catch(() => null),
    ])
    const projectionsHealthy = projections.length > 0 && projections.every((p) => p.state !== 'failed' && p.lag < LAG_DEGRADED)
    const status = eventStore.status !== 'healthy' ? 'unhealthy' : projectionsHealthy && models !== null ? 'healthy' : 'degraded'
    // Devices, jobs and sockets arrive with the device hub and inference; until then they are truly zero.
    const body = {
      status,
      version,
      timestamp: new Date().toISOString(),
      services: {
        device_registry: { status: 'healthy', devices: 0 },
        resource_pool: { status: 'healthy', available: 0 },
        job_manager: { status: 'healthy', active_jobs: 0 },
        model_store: { status: models === null ? 'unhealthy' : 'healthy', models: models ?? 0 },
        websocket: { status: 'healthy', connections: 0 },
        event_store: eventStore,
        projections: {
          status: projectionsHealthy ? 'healthy' : 'degraded',
          items: projections.map((p) => ({ name: p.name, state: p.state, checkpoint: p.checkpoint, lag: p.lag, ...(p.lastError ? { error: p.lastError } : {}) })),
        },
      },
      resources: { devices: { total: 0, idle: 0, busy: 0, offline: 0 } },
      jobs: { active: 0, queued: 0 },
    }
    return reply.status(status === 'unhealthy' ? 503 : 200).send(body)
  })
}
