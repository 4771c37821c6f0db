import type { FastifyPluginAsync } from 'fastify'
import type { Services } from './context.js'

/** `/efficiency`: training and inference efficiency figures (to be written). */
export const efficiencyRoutes: FastifyPluginAsync<{ services: Services }> = async () => {}
