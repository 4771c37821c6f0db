import Fastify, { type FastifyInstance } from 'fastify'
import type { EventStore } from '../event-store/port.js'
import type { Projections } from '../projections/projections.js'
import { registerErrorContract } from './errors.js'
import { healthRoutes } from './health.js'

export interface AppDeps {
  store: EventStore
  projections: Projections
  logLevel?: string
}

/** The HTTP API, built from injected parts; tests build it on a real database and call it with inject. */
export async function buildApp(deps: AppDeps): Promise<FastifyInstance> {
  const app = Fastify({ logger: { level: deps.logLevel ?? 'info' } })
  registerErrorContract(app)
  await app.register(healthRoutes, { prefix: '/api/v1' })
  return app
}
