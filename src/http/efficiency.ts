import type { FastifyPluginAsync } from 'fastify'
import type { ZodTypeProvider } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { DomainError } from '../domain/errors.js'
import { activeRuns, CHART_TYPES, efficiencyChart, efficiencyComparison, efficiencySummary, INSTANCE_TYPES, jobEfficiency, MAX_CURVE_POINTS } from '../projections/efficiency.js'
import { customerOf } from './auth.js'
import { readYourWrites, type Services } from './context.js'
import { wholeNumber } from './pagination.js'

/**
 * `/efficiency`: training and inference efficiency figures of the caller's own jobs (time to accuracy,
 * throughput, energy, scaling; aws against user devices), computed from the read models. Definitions:
 * docs/efficiency.md.
 */
export const efficiencyRoutes: FastifyPluginAsync<{ services: Services }> = async (base, { services }) => {
  const app = base.withTypeProvider<ZodTypeProvider>()
  const config = { auth: 'api_key' as const }
  const tags = ['efficiency']
  /** Reads see every event so far (rounds and task outcomes land just before a request may ask for them). */
  const caughtUp = async () => readYourWrites(services, await services.store.headPosition())

  app.get('/efficiency', {
    config,
    schema: {
      summary: 'Aggregate training figures: jobs, time to accuracy, throughput, energy, scaling efficiency',
      tags,
      querystring: z.object({ instance_type: z.enum(INSTANCE_TYPES).optional().describe('count only the contributions of devices of this type (default: both)') }),
    },
  }, async (request) => {
    await caughtUp()
    return efficiencySummary(services.db, customerOf(request), request.query.instance_type)
  })

  app.get('/efficiency/comparison', { config, schema: { summary: 'aws against user devices: training and inference side by side', tags } }, async (request) => {
    await caughtUp()
    return efficiencyComparison(services.db, customerOf(request))
  })

  app.get('/efficiency/chart/:type', {
    config,
    schema: {
      summary: 'Chart-ready series (tta, scaling, power, throughput), the same shape for each',
      tags,
      params: z.object({ type: z.enum(CHART_TYPES) }),
      querystring: z.object({
        bucket_seconds: wholeNumber(1, 7 * 86_400).optional().describe('power and throughput: width of a time bucket (default: the span over 60; widened to keep at most 1,000 buckets)'),
      }),
    },
  }, async (request) => {
    await caughtUp()
    return efficiencyChart(services.db, customerOf(request), request.params.type, { bucketSeconds: request.query.bucket_seconds })
  })

  app.get('/efficiency/active', {
    config,
    schema: {
      summary: 'Training and inference runs in progress, with their recent throughput and power',
      tags,
      querystring: z.object({ limit: wholeNumber(1, 1000).default(100).describe('runs of each kind, newest first (default 100, max 1000)') }),
    },
  }, async (request) => {
    await caughtUp()
    return activeRuns(services.db, customerOf(request), request.query.limit)
  })

  app.get('/efficiency/job/:jobId', {
    config,
    schema: {
      summary: "A training job's figures, by device and instance type, and its accuracy and loss curve",
      tags,
      params: z.object({ jobId: z.string().min(1).max(80) }),
      querystring: z.object({
        curve_points: wholeNumber(3, MAX_CURVE_POINTS).default(MAX_CURVE_POINTS).describe(`most points of the curve (default and max ${MAX_CURVE_POINTS}): every round, or every k-th from the first, and the last`),
      }),
    },
  }, async (request) => {
    await caughtUp()
    const figures = await jobEfficiency(services.db, customerOf(request), request.params.jobId, { curvePoints: request.query.curve_points })
    if (!figures) throw new DomainError('NOT_FOUND', `training job ${request.params.jobId} not found`)
    return figures
  })
}
