import type { FastifyPluginAsync } from 'fastify'
import type { Services } from './context.js'

/** The web dashboard at `/` (to be written). */
export const webRoutes: FastifyPluginAsync<{ services: Services }> = async () => {}
