import type { FastifyPluginAsync } from 'fastify'
import { version } from '../version.js'

/** `GET /health`: no auth; says the process is up and which build it runs. */
export const healthRoutes: FastifyPluginAsync = async (app) => {
  app.get('/health', async () => ({ status: 'healthy', version, timestamp: new Date().toISOString() }))
}
