import type { FastifyPluginAsync } from 'fastify'
import type { ZodTypeProvider } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { DomainError } from '../domain/errors.js'
import { costOf, round4 } from '../domain/pricing.js'
import { findProject } from '../projections/projects.js'
import { countUsageGroups, hourOf, sumUsage, type UsageFilter } from '../projections/usage.js'
import { customerOf } from './auth.js'
import { readYourWrites, type Services } from './context.js'
import { pageQuery, wholeNumber } from './pagination.js'
import { page } from './responses.js'

const HOUR_MS = 3_600_000
/** The internal usage endpoints answer for the last 72 hours, the current one included. */
const WINDOW_HOURS = 72

const Hour = z
  .string()
  // the pattern (in the OpenAPI document too) takes only months 01-12, days 01-31 and hours 00-23; the
  // refinement the rest (no 30 February)
  .regex(/^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3])$/, 'must be an hour as YYYY-MM-DDTHH (UTC), e.g. 2026-03-15T21')
  .refine((h) => !Number.isNaN(Date.parse(`${h}:00:00Z`)) && hourOf(`${h}:00:00Z`) === h, 'is not a real hour')
const HourRange = z.object({ from: Hour.optional(), to: Hour.optional() })

const HourOut = z.string().describe('an hour as YYYY-MM-DDTHH (UTC)')
const Int = z.number().int()
const Figures = {
  cpu_ms: z.number().describe('CPU time of completed tasks and training rounds (billed)'),
  gpu_ms: z.number().describe('GPU time of completed tasks and training rounds (billed)'),
  cpu_hours: z.number(),
  gpu_hours: z.number(),
  tasks: z.object({ total: Int, cpu: Int, gpu: Int }).describe('completed tasks, and training contributions, by where they ran'),
  inputs: Int.describe('inputs of completed tasks'),
  bytes_in: Int,
  bytes_out: Int,
  failed_attempts: z.object({ tasks: Int, cpu_ms: z.number(), gpu_ms: z.number() }).describe('reported, not billed'),
  training: z.object({ samples: Int, cpu_ms: z.number(), gpu_ms: z.number() }).describe("training rounds' part (included in the totals above)"),
  estimated_cost: z.object({ currency: z.string(), total: z.number(), by_instance_type: z.record(z.string(), z.number()) }),
  by_instance_type: z
    .record(z.string(), z.object({ cpu_ms: z.number(), gpu_ms: z.number(), tasks: Int, estimated_cost: z.number() }))
    .describe('billed figures per instance type (aws, user; `unknown` for work recorded without one)'),
}
const Range = { from: HourOut.nullable().describe('the first hour counted; null: from the start'), to: HourOut.nullable().describe('the last hour counted; null: up to now') }
const CustomerUsage = z.object({ customer_id: z.string(), ...Range, ...Figures })
const ProjectUsage = z.object({ project_id: z.string(), ...Range, ...Figures })
const HourlyUsage = z.object({
  hours: Int,
  from: HourOut,
  to: HourOut,
  currency: z.string(),
  data: z.array(
    z.object({
      hour: HourOut,
      cpu_ms: z.number(),
      gpu_ms: z.number(),
      tasks: Int,
      cpu_tasks: Int,
      gpu_tasks: Int,
      inputs: Int,
      bytes_in: Int,
      bytes_out: Int,
      failed_attempts: Int,
      estimated_cost: z.number(),
    }),
  ).describe('every hour of the window, oldest first, empty ones included'),
})
const AdminUsage = page('customers', z.object({ customer_id: z.string(), ...Figures }))
const Row = z.record(z.string(), z.unknown())
const UsageAudit = z.object({
  projection: z.string(),
  position: z.string().describe('the log position both copies were compared at'),
  ok: z.boolean().describe('the live read model equals the replay'),
  tables: z.array(
    z.object({
      table: z.string(),
      primaryKey: z.array(z.string()).readonly(),
      liveRows: Int,
      replayedRows: Int,
      differences: z.array(z.object({ key: Row, live: Row.nullable().describe('null: the live read model lacks the row'), replayed: Row.nullable().describe('null: only the live read model has it') })).describe('the first differences'),
      differenceCount: Int.describe('all differences'),
    }),
  ),
  filter: z.object({ from: HourOut.nullable(), to: HourOut.nullable(), customer: z.string().nullable() }),
  totals: z.array(
    z.object({
      customer_id: z.string(),
      hour: HourOut,
      tasks: Int,
      cpu_ms: z.number(),
      gpu_ms: z.number(),
      inputs: Int,
      training_samples: Int,
      training_cpu_ms: z.number(),
      training_gpu_ms: z.number(),
      failed_attempts: Int,
    }),
  ).describe('per customer and hour, from the replay: what the bill should say'),
  digest: z.string().describe('SHA-256 of the replayed rows in the filter'),
  liveDigest: z.string().describe('the same over the live rows; equal to digest exactly when no row differs'),
})
const UuidUsage = z.object({
  from: HourOut,
  to: HourOut,
  data: z.array(z.object({ uuid: z.string().nullable().describe('the SDK UUID; null for work recorded without one'), hour: HourOut, cpu_ms: z.number(), gpu_ms: z.number(), cpu_tasks: Int, gpu_tasks: Int })),
})

type Measures = 'tasks' | 'cpu_tasks' | 'gpu_tasks' | 'inputs' | 'cpu_us' | 'gpu_us' | 'bytes_in' | 'bytes_out'
type Sums = Record<'instance_type' | 'outcome', string> & Record<Measures, number>

const ms = (us: number) => us / 1000
const hours = (us: number) => round4(us / 3_600_000_000)

/** The figures of some usage rows, and their estimated cost. */
function figures(services: Services, rows: Sums[]) {
  // billed: tasks' completions and training rounds; failed attempts are reported, not billed
  const completed = rows.filter((r) => r.outcome === 'completed' || r.outcome === 'training')
  const tasks = rows.filter((r) => r.outcome === 'completed')
  const training = rows.filter((r) => r.outcome === 'training')
  const failed = rows.filter((r) => r.outcome === 'failed')
  const total = (list: Sums[], m: Measures) => list.reduce((n, r) => n + r[m], 0)
  const byType: Record<string, { cpu_ms: number; gpu_ms: number; tasks: number; estimated_cost: number }> = {}
  for (const r of completed) {
    const t = (byType[r.instance_type] ??= { cpu_ms: 0, gpu_ms: 0, tasks: 0, estimated_cost: 0 })
    t.cpu_ms += ms(r.cpu_us)
    t.gpu_ms += ms(r.gpu_us)
    t.tasks += r.tasks
    t.estimated_cost = round4(t.estimated_cost + costOf(services.prices, r.instance_type, r))
  }
  const cost = round4(Object.values(byType).reduce((n, t) => n + t.estimated_cost, 0))
  return {
    cpu_ms: ms(total(completed, 'cpu_us')),
    gpu_ms: ms(total(completed, 'gpu_us')),
    cpu_hours: hours(total(completed, 'cpu_us')),
    gpu_hours: hours(total(completed, 'gpu_us')),
    tasks: { total: total(completed, 'tasks'), cpu: total(completed, 'cpu_tasks'), gpu: total(completed, 'gpu_tasks') },
    inputs: total(tasks, 'inputs'),
    bytes_in: total(completed, 'bytes_in'),
    bytes_out: total(completed, 'bytes_out'),
    failed_attempts: { tasks: total(failed, 'tasks'), cpu_ms: ms(total(failed, 'cpu_us')), gpu_ms: ms(total(failed, 'gpu_us')) },
    training: { samples: total(training, 'inputs'), cpu_ms: ms(total(training, 'cpu_us')), gpu_ms: ms(total(training, 'gpu_us')) },
    estimated_cost: { currency: services.prices.currency, total: cost, by_instance_type: Object.fromEntries(Object.entries(byType).map(([k, v]) => [k, v.estimated_cost])) },
    by_instance_type: byType,
  }
}

/** `/usage` for customers, `/admin/usage` for operators, `/internal/uuid-usage` for other services. */
export const usageRoutes: FastifyPluginAsync<{ services: Services }> = async (base, { services }) => {
  const app = base.withTypeProvider<ZodTypeProvider>()

  /** Reads see every task outcome so far (synchronous inference answers before the read models catch up). */
  app.addHook('preHandler', async () => readYourWrites(services, await services.store.headPosition()))

  function checkRange(range: { from?: string | undefined; to?: string | undefined }) {
    if (range.from && range.to && range.from > range.to) throw new DomainError('VALIDATION_ERROR', `from ${range.from} is after to ${range.to}`)
  }

  async function summary(filter: UsageFilter) {
    return figures(services, await sumUsage(services.db, filter, ['instance_type', 'outcome']))
  }

  app.get('/usage', {
    config: { auth: 'api_key' },
    schema: { summary: 'Your compute usage: CPU/GPU hours, tasks, data, estimated cost (optionally between two UTC hours)', operationId: 'getUsage', tags: ['usage'], querystring: HourRange, response: { 200: CustomerUsage } },
  }, async (request) => {
    checkRange(request.query)
    const customerId = customerOf(request)
    return { customer_id: customerId, from: request.query.from ?? null, to: request.query.to ?? null, ...(await summary({ customerId, fromHour: request.query.from, toHour: request.query.to })) }
  })

  app.get('/usage/projects/:id', {
    config: { auth: 'api_key' },
    schema: { summary: "A project's compute usage", operationId: 'getProjectUsage', tags: ['usage'], params: z.object({ id: z.string().min(1).max(80) }), querystring: HourRange, response: { 200: ProjectUsage } },
  }, async (request) => {
    checkRange(request.query)
    const customerId = customerOf(request)
    const project = await findProject(services.db, customerId, request.params.id)
    if (!project) throw new DomainError('NOT_FOUND', `project ${request.params.id} not found`)
    return { project_id: project.project_id, from: request.query.from ?? null, to: request.query.to ?? null, ...(await summary({ customerId, projectId: project.project_id, fromHour: request.query.from, toHour: request.query.to })) }
  })

  app.get('/usage/hourly', {
    config: { auth: 'api_key' },
    schema: {
      summary: 'Your usage hour by hour (UTC), the last `hours` hours up to the current one, empty hours included',
      operationId: 'getHourlyUsage',
      tags: ['usage'],
      querystring: z.object({ hours: wholeNumber(1, 72).default(24).describe('hours to return (default 24, max 72)') }),
      response: { 200: HourlyUsage },
    },
  }, async (request) => {
    const customerId = customerOf(request)
    const now = services.now().getTime()
    const window = Array.from({ length: request.query.hours }, (_, i) => hourOf(new Date(now - (request.query.hours - 1 - i) * HOUR_MS).toISOString()))
    const rows = await sumUsage(services.db, { customerId, fromHour: window[0], toHour: window.at(-1) }, ['hour', 'instance_type', 'outcome'])
    const data = window.map((hour) => {
      const f = figures(services, rows.filter((r) => r.hour === hour))
      return { hour, cpu_ms: f.cpu_ms, gpu_ms: f.gpu_ms, tasks: f.tasks.total, cpu_tasks: f.tasks.cpu, gpu_tasks: f.tasks.gpu, inputs: f.inputs, bytes_in: f.bytes_in, bytes_out: f.bytes_out, failed_attempts: f.failed_attempts.tasks, estimated_cost: f.estimated_cost.total }
    })
    return { hours: request.query.hours, from: window[0]!, to: window.at(-1)!, currency: services.prices.currency, data }
  })

  app.get('/admin/usage', {
    config: { auth: 'admin' },
    schema: { summary: "Every customer's usage, a page at a time (optionally between two UTC hours)", operationId: 'listCustomerUsage', tags: ['admin'], querystring: pageQuery().extend(HourRange.shape), response: { 200: AdminUsage } },
  }, async (request) => {
    checkRange(request.query)
    const filter = { fromHour: request.query.from, toHour: request.query.to }
    const customers = await sumUsage(services.db, filter, ['customer_id'], request.query)
    const rows = customers.length ? await sumUsage(services.db, filter, ['customer_id', 'instance_type', 'outcome']) : []
    return {
      customers: customers.map((c) => ({ customer_id: c.customer_id, ...figures(services, rows.filter((r) => r.customer_id === c.customer_id)) })),
      total: await countUsageGroups(services.db, 'customer_id', filter),
      limit: request.query.limit,
      offset: request.query.offset,
    }
  })

  app.get('/admin/audit/usage', {
    config: { auth: 'admin' },
    schema: {
      summary: 'The billing audit: replays the log into a shadow read model and compares it with the live usage, row by row (what `dcp audit usage` prints)',
      operationId: 'auditUsage',
      tags: ['admin'],
      querystring: HourRange.extend({ customer: z.string().min(1).max(64).optional() }),
      response: { 200: UsageAudit },
    },
  }, async (request) => {
    checkRange(request.query)
    return services.projections.auditUsage({ from: request.query.from, to: request.query.to, customer: request.query.customer })
  })

  /** `from` (required) and `to` (default: the current hour) within the rolling window. */
  function internalRange(query: { from: string; to?: string | undefined }) {
    const now = services.now().getTime()
    const current = hourOf(new Date(now).toISOString())
    const earliest = hourOf(new Date(now - (WINDOW_HOURS - 1) * HOUR_MS).toISOString())
    const to = query.to ?? current
    if (query.from < earliest) throw new DomainError('VALIDATION_ERROR', `from ${query.from} is outside the rolling 3-day window: the earliest hour is ${earliest}`)
    if (to > current) throw new DomainError('VALIDATION_ERROR', `to ${to} is in the future: the current hour is ${current}`)
    if (query.from > to) throw new DomainError('VALIDATION_ERROR', `from ${query.from} is after to ${to}`)
    return { from: query.from, to }
  }

  // a contributor is credited with work that stood (its completions and the replicas that agreed with
  // an accepted result); its errors include runs that validation outvoted
  for (const [path, outcome] of [['/internal/uuid-usage', ['completed', 'replica']], ['/internal/uuid-usage/errors', ['failed', 'disputed']]] as const) {
    app.get(path, {
      config: { auth: 'internal' },
      schema: {
        summary: path === '/internal/uuid-usage' ? 'Per-SDK-UUID usage of successful tasks, by hour (rolling 3-day window, hours with activity only)' : 'Per-SDK-UUID usage of failed attempts, by hour',
        operationId: path === '/internal/uuid-usage' ? 'getUuidUsage' : 'getUuidUsageErrors',
        tags: ['internal'],
        querystring: z.object({ from: Hour, to: Hour.optional() }),
        response: { 200: UuidUsage },
      },
    }, async (request) => {
      const { from, to } = internalRange(request.query)
      const rows = await sumUsage(services.db, { fromHour: from, toHour: to, outcome }, ['sdk_uuid', 'hour'])
      return {
        from,
        to,
        data: rows.map((r) => ({ uuid: r.sdk_uuid || null, hour: r.hour, cpu_ms: ms(r.cpu_us), gpu_ms: ms(r.gpu_us), cpu_tasks: r.cpu_tasks, gpu_tasks: r.gpu_tasks })),
      }
    })
  }
}
