import type { FastifyPluginAsync } from 'fastify'
import type { Services } from './context.js'

/** `/dashboard` and `/cluster`: aggregated views for the web dashboard (to be written). */
export const dashboardRoutes: FastifyPluginAsync<{ services: Services }> = async () => {}
