import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'
import type { ZodTypeProvider } from 'fastify-type-provider-zod'
import { z } from 'zod'
import type { LoadRequest, PerfConfig, QuickConfig } from '../commands/benchmarks.js'
import { DomainError } from '../domain/errors.js'
import { findBenchmark } from '../projections/benchmarks.js'
import { findCredential } from '../projections/customers.js'
import { fleet, fleetNow, projectLiveStats, recentJobs, recentProjects, recentTasks, taskThroughput, trainingJobCounts } from '../projections/dashboard.js'
import { efficiencyComparison, efficiencyChart, efficiencySummary } from '../projections/efficiency.js'
import { findProject } from '../projections/projects.js'
import { customerOf } from './auth.js'
import { readYourWrites, type Services } from './context.js'
import { pageQuery, wholeNumber } from './pagination.js'
import { renderProjectText } from './project-stream-text.js'
import { DashboardShapes as Shapes } from './dashboard-shapes.js'

const ProjectParams = z.object({ id: z.string().min(1).max(80) })
const BenchmarkParams = z.object({ id: z.string().min(1).max(80) })
const DAY_MS = 86_400_000
/** Live streams end after this long even if the project does not (a client reconnects for more). */
const MAX_STREAM_MS = 6 * 3600_000

const QuickBody = z.object({
  mode: z.enum(['inference', 'training', 'gpu-training']),
  epochs: z.number().int().min(1).max(100).default(1).describe('training modes: epochs (default 1)'),
  batch_size: z.number().int().min(1).max(1024).default(32).describe('training modes: batch size (default 32)'),
  requests: z.number().int().min(1).max(10_000).default(100).describe('inference: requests to send (default 100)'),
  concurrency: z.number().int().min(1).max(64).default(4).describe('inference: requests in flight at once (default 4)'),
})
const DEFAULT_RPS_STEPS = [2, 4, 6, 8, 10, 15, 20, 30, 40, 50]
/** A started benchmark's id feeds its status operation, its project's id the project's usage. */
const benchmarkLinks = (status: 'getBenchmark' | 'getPerfBenchmark') => ({
  [status]: { operationId: status, parameters: { id: '$response.body#/benchmark_id' } },
  getProjectUsage: { operationId: 'getProjectUsage', parameters: { id: '$response.body#/project_id' } },
})

/** `/dashboard` and `/cluster`: aggregated views for the web dashboard, the live project stream, and benchmarks. */
export const dashboardRoutes: FastifyPluginAsync<{ services: Services }> = async (base, { services }) => {
  const app = base.withTypeProvider<ZodTypeProvider>()
  const config = { auth: 'api_key' as const }
  const tags = ['dashboard']
  /** Reads see everything written so far. */
  const caughtUp = async () => readYourWrites(services, await services.store.headPosition())
  /**
   * Open live streams: ended as the server starts to close, so a browser left open does not hold up a
   * shutdown. (`preClose`, not `onClose`: fastify waits for open connections before the onClose hooks run.)
   */
  const streams = new Set<() => void>()
  base.addHook('preClose', async () => {
    for (const end of streams) end()
  })
  /** Open streams per customer, for the cap (services.streams.maxPerCustomer). Per node, like the tickets. */
  const openPerCustomer = new Map<string, number>()

  app.get('/dashboard/devices', { config, schema: { summary: 'Devices by platform (nodejs, python, windows), instance type and status, and a page of them', operationId: 'getDashboardDevices', tags, querystring: pageQuery(), response: { 200: Shapes.Fleet } } }, async (request) => {
    await caughtUp()
    const view = await fleet(services.db, request.query)
    return { ...view, devices: view.devices.map((d) => ({ ...d, training_job: services.training.jobOfDevice(d.id) ?? null })), limit: request.query.limit, offset: request.query.offset }
  })

  app.get('/dashboard/jobs', {
    config,
    schema: { summary: 'Inference and training jobs of the last 5 days, most recently active first', operationId: 'getDashboardJobs', tags, querystring: pageQuery().extend({ type: z.enum(['inference', 'training']).optional() }), response: { 200: Shapes.Jobs } },
  }, async (request) => {
    await caughtUp()
    const since = new Date(services.now().getTime() - 5 * DAY_MS).toISOString()
    const { jobs, total } = await recentJobs(services.db, customerOf(request), { ...request.query, since })
    return { jobs, total, limit: request.query.limit, offset: request.query.offset }
  })

  app.get('/dashboard/projects', { config, schema: { summary: 'The 50 most recent projects, active first', operationId: 'getDashboardProjects', tags, response: { 200: Shapes.Projects } } }, async (request) => {
    await caughtUp()
    return { projects: await recentProjects(services.db, customerOf(request), 50) }
  })

  app.get('/dashboard/tasks', {
    config,
    schema: {
      summary: 'Recent tasks across your jobs and projects',
      operationId: 'getDashboardTasks',
      tags,
      response: { 200: Shapes.Tasks },
      querystring: z.object({ limit: wholeNumber(1, 1000).default(100), project_id: z.string().min(1).max(80).optional() }),
    },
  }, async (request) => {
    await caughtUp()
    return { tasks: await recentTasks(services.db, customerOf(request), { limit: request.query.limit, projectId: request.query.project_id }) }
  })

  app.get('/dashboard/tasks/throughput', {
    config,
    schema: {
      summary: 'Completed tasks and inputs per time bucket (the latest 300 buckets)',
      operationId: 'getTaskThroughput',
      tags,
      response: { 200: Shapes.Throughput },
      querystring: z.object({ project_id: z.string().min(1).max(80).optional(), bucket_size: wholeNumber(1, 86_400).default(1).describe('seconds (default 1)') }),
    },
  }, async (request) => {
    await caughtUp()
    const buckets = await taskThroughput(services.db, customerOf(request), { projectId: request.query.project_id, bucketSize: request.query.bucket_size, buckets: 300, now: services.now() })
    return { bucket_size: request.query.bucket_size, buckets }
  })

  app.get('/dashboard/efficiency', { config, schema: { summary: 'Training efficiency overview: recent time to accuracy, scaling and power', operationId: 'getDashboardEfficiency', tags, response: { 200: Shapes.Efficiency } } }, async (request) => {
    await caughtUp()
    const customerId = customerOf(request)
    const [summary, tta, scaling, power] = await Promise.all([
      efficiencySummary(services.db, customerId),
      efficiencyChart(services.db, customerId, 'tta'),
      efficiencyChart(services.db, customerId, 'scaling'),
      efficiencyChart(services.db, customerId, 'power'),
    ])
    return { summary, tta, scaling, power }
  })

  app.get('/dashboard/comparison', { config, schema: { summary: 'Training and inference on cloud (aws) against contributed (user) devices, for charts', operationId: 'getDashboardComparison', tags, response: { 200: Shapes.Comparison } } }, async (request) => {
    await caughtUp()
    const comparison = await efficiencyComparison(services.db, customerOf(request))
    return chartComparison(comparison)
  })

  app.get('/cluster/utilization', { config, schema: { summary: 'The cluster now: devices, task slots, load, power, queue, training jobs', operationId: 'getClusterUtilization', tags: ['cluster'], response: { 200: Shapes.Utilization } } }, async () => {
    await caughtUp()
    const [devices, jobs] = await Promise.all([fleetNow(services.db), trainingJobCounts(services.db)])
    const live = services.hub.utilization()
    return {
      devices: { total: devices.total, connected: live.devices, idle: Math.max(0, live.devices - devices.busy - live.training), busy: devices.busy, training: live.training, draining: live.draining, gpu: devices.gpuDevices },
      slots: { total: live.slots, used: live.used, utilization: live.slots > 0 ? Math.round((live.used / live.slots) * 1000) / 1000 : 0 },
      load: { mean: devices.meanLoad },
      power_watts: devices.powerWatts,
      queue: { tasks: services.scheduler.queued, inputs: services.scheduler.queuedInputs },
      training_jobs: jobs,
    }
  })

  // ---- the live project stream ------------------------------------------------------------------------

  app.post('/dashboard/stream-tickets', {
    config: { ...config, success: { 201: 'A single-use ticket for one stream' } },
    schema: {
      summary: 'A ticket that opens one live stream (`?ticket=`), for clients that cannot send X-API-Key (EventSource): single use, valid 60 s, on this node',
      operationId: 'createStreamTicket',
      tags,
      response: { 201: Shapes.StreamTicket },
      body: z.object({ project_id: z.string().min(1).max(80).optional().describe('the only project the ticket opens (default: any of yours)') }).nullish(),
    },
  }, async (request, reply) => {
    const customerId = customerOf(request)
    const projectId = request.body?.project_id ?? null
    if (projectId !== null) {
      await caughtUp()
      if (!(await findProject(services.db, customerId, projectId))) throw new DomainError('NOT_FOUND', `project ${projectId} not found`)
    }
    const { ticket, expiresAt } = services.streams.tickets.issue({ customerId, keyId: request.caller.keyId!, keyHash: request.caller.keyHash!, projectId })
    return reply.status(201).send({ ticket, expires_at: expiresAt.toISOString() })
  })

  app.get('/dashboard/projects/:id/stream', {
    config: { ...config, ticketInQuery: true },
    schema: {
      summary: 'Server-Sent Events: the project\'s figures every `interval` ms until it completes (format json, or text: ANSI for a terminal)',
      operationId: 'streamProject',
      tags,
      response: { 200: Shapes.ProjectStream },
      params: ProjectParams,
      querystring: z.object({
        format: z.enum(['json', 'text']).default('json'),
        interval: wholeNumber(100, 60_000).default(2000).describe('ms between updates (default 2000)'),
        ticket: z.string().max(200).optional().describe('a single-use ticket from POST /dashboard/stream-tickets, for clients that cannot send X-API-Key (EventSource); `api_key` is refused'),
      }),
    },
  }, async (request, reply) => {
    const customerId = customerOf(request)
    const { ticketProjectId, keyHash } = request.caller
    if (ticketProjectId !== undefined && ticketProjectId !== request.params.id) throw new DomainError('FORBIDDEN', `this ticket opens project ${ticketProjectId} only`)
    await caughtUp()
    if (!(await findProject(services.db, customerId, request.params.id))) throw new DomainError('NOT_FOUND', `project ${request.params.id} not found`)
    // a ticket outlives nothing: its key revoked since it was issued, it opens no stream
    if (!(await keyValid(services, keyHash!))) throw new DomainError('AUTH_INVALID', 'this API key was revoked')
    const open = openPerCustomer.get(customerId) ?? 0
    if (open >= services.streams.maxPerCustomer) {
      void reply.header('retry-after', '5')
      throw new DomainError('RATE_LIMITED', `at most ${services.streams.maxPerCustomer} live streams may be open at once per customer; close one first`)
    }
    openPerCustomer.set(customerId, open + 1)
    try {
      await streamProject(services, request, reply, { customerId, projectId: request.params.id, keyHash: keyHash! }, request.query, streams)
    } finally {
      const left = (openPerCustomer.get(customerId) ?? 1) - 1
      if (left > 0) openPerCustomer.set(customerId, left)
      else openPerCustomer.delete(customerId)
    }
  })

  // ---- benchmarks -------------------------------------------------------------------------------------

  app.post('/dashboard/benchmark', {
    config: { ...config, success: { 202: 'Started' }, links: benchmarkLinks('getBenchmark') },
    schema: { summary: 'Start a quick inference or training benchmark (202; GET /dashboard/benchmark/:id for its result)', operationId: 'startBenchmark', tags: ['benchmarks'], body: QuickBody, response: { 202: Shapes.QuickStarted } },
  }, async (request, reply) => {
    const customerId = customerOf(request)
    const body = request.body
    if (body.mode === 'inference') requireDevices(services)
    else if (services.training.eligibleDevices({ min_devices: 1, max_devices: null, prefer_gpu: body.mode === 'gpu-training', sdk_types: null, min_sdk_version: null }) === 0) {
      throw new DomainError('NO_TRAINING_DEVICES', 'no connected device can train')
    }
    const quick: QuickConfig = { mode: body.mode, epochs: body.epochs, batch_size: body.batch_size, requests: body.requests, concurrency: body.concurrency }
    const started = await services.benchmarks.start(customerId, loadAs(base.inject.bind(base), request, services.loadToken), body.mode, quick)
    return reply.status(202).send({ benchmark_id: started.benchmark_id, mode: started.mode, status: 'running', project_id: started.project_id, poll_url: `/api/v1/dashboard/benchmark/${started.benchmark_id}` })
  })

  app.get('/dashboard/benchmark/:id', { config, schema: { summary: 'A benchmark (quick or step-load): status and result', operationId: 'getBenchmark', tags: ['benchmarks'], params: BenchmarkParams, response: { 200: Shapes.Benchmark } } }, async (request) => {
    return benchmarkView(await benchmarkOf(customerOf(request), request.params.id))
  })

  app.post('/dashboard/benchmark/perf', {
    config: { ...config, success: { 202: 'Started' }, links: benchmarkLinks('getPerfBenchmark') },
    schema: {
      summary: 'Start a step-load benchmark: each rate of rps_steps for duration / steps seconds, at most max_concurrency requests in flight',
      operationId: 'startPerfBenchmark',
      tags: ['benchmarks'],
      response: { 202: Shapes.PerfStarted },
      body: z.object({
        duration: z.number().min(services.limits.minPerfDurationS).max(3600).default(Math.max(60, services.limits.minPerfDurationS)).describe(`total seconds (min ${services.limits.minPerfDurationS})`),
        instance_type: z.enum(['aws', 'user', 'all']).default('all'),
        rps_steps: z.array(z.number().positive().max(1000)).min(1).max(50).default(DEFAULT_RPS_STEPS),
        max_concurrency: z.number().int().min(1).max(256).default(5),
      }),
    },
  }, async (request, reply) => {
    const customerId = customerOf(request)
    const perf: PerfConfig = request.body
    requireDevices(services, perf.instance_type === 'all' ? undefined : perf.instance_type)
    const started = await services.benchmarks.start(customerId, loadAs(base.inject.bind(base), request, services.loadToken), 'perf', perf)
    return reply.status(202).send({ benchmark_id: started.benchmark_id, status: 'running', project_id: started.project_id, config: perf, poll_url: `/api/v1/dashboard/benchmark/perf/${started.benchmark_id}` })
  })

  app.get('/dashboard/benchmark/perf/:id', { config, schema: { summary: 'A step-load benchmark: status, and each step\'s achieved rate, latency percentiles and errors', operationId: 'getPerfBenchmark', tags: ['benchmarks'], params: BenchmarkParams, response: { 200: Shapes.PerfBenchmark } } }, async (request) => {
    const row = await benchmarkOf(customerOf(request), request.params.id)
    if (row.mode !== 'perf') throw new DomainError('NOT_FOUND', `perf benchmark ${request.params.id} not found (it is a ${row.mode} benchmark)`)
    return { ...benchmarkView(row), steps: row.steps }
  })

  async function benchmarkOf(customerId: string, id: string) {
    await caughtUp()
    const row = await findBenchmark(services.db, customerId, id)
    if (!row) throw new DomainError('NOT_FOUND', `benchmark ${id} not found`)
    return row
  }
}

function benchmarkView(row: Awaited<ReturnType<typeof findBenchmark>> & object) {
  // the events hold a run's settings and result as plain records; what each mode's are, the schemas say
  // (and the serializer checks)
  return {
    benchmark_id: row.benchmark_id,
    mode: row.mode,
    status: row.status,
    config: row.config as z.output<typeof Shapes.Benchmark>['config'],
    project_id: row.project_id,
    result: row.result as z.output<typeof Shapes.Benchmark>['result'],
    error: row.error,
    started_at: row.started_at,
    completed_at: row.ended_at,
  }
}

function requireDevices(services: Services, instanceType?: 'aws' | 'user'): void {
  if (services.hub.capacity('onnx', instanceType).slots === 0) throw new DomainError('NO_DEVICES', `no connected ${instanceType ? `${instanceType} ` : ''}device can run inference`)
}

/** Requests through the whole HTTP stack as the caller (their key, kept in memory only), past the rate limit. */
function loadAs(inject: FastifyRequest['server']['inject'], request: FastifyRequest, loadToken: string): LoadRequest {
  const key = request.headers['x-api-key']
  const headers = { 'x-api-key': Array.isArray(key) ? key[0]! : key!, 'x-dcp-load': loadToken }
  return async (method, url, payload) => {
    const response = await inject({ method, url, headers: payload === undefined ? headers : { ...headers, 'content-type': 'application/json' }, ...(payload === undefined ? {} : { payload: JSON.stringify(payload) }) })
    let body: unknown = response.body
    try {
      body = JSON.parse(response.body)
    } catch {} // not JSON: kept as text
    return { status: response.statusCode, body }
  }
}

/** The API key behind a stream is still valid (not revoked), read from the credentials read model. */
async function keyValid(services: Services, keyHash: string): Promise<boolean> {
  const credential = await findCredential(services.db, keyHash)
  return credential !== undefined && credential.kind === 'api_key' && credential.revoked_at === null
}

/**
 * SSE: a `stats` event every interval (JSON, or ANSI text lines), `end` when the project is no longer active.
 * The API key is re-checked every `services.streams.credentialCheckMs` whatever the interval: once it is
 * revoked the stream sends `stream_error` (code AUTH_INVALID) and closes.
 */
async function streamProject(
  services: Services,
  request: FastifyRequest,
  reply: FastifyReply,
  { customerId, projectId, keyHash }: { customerId: string; projectId: string; keyHash: string },
  query: { format: 'json' | 'text'; interval: number },
  streams: Set<() => void>,
) {
  reply.hijack()
  const res = reply.raw
  res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', connection: 'keep-alive', 'x-accel-buffering': 'no' })
  res.write(`retry: ${query.interval}\n\n`)
  let closed = false
  let wake = () => {}
  const end = () => {
    closed = true
    wake()
  }
  streams.add(end)
  request.raw.on('close', end)
  const send = (event: string, data: string) => res.write(`event: ${event}\n${data.split('\n').map((line) => `data: ${line}`).join('\n')}\n\n`)
  let revoked = false
  const recheck = setInterval(() => {
    keyValid(services, keyHash).then(
      (valid) => {
        if (valid) return
        revoked = true
        wake()
      },
      // the read model unreachable for a moment: the next check tries again (and the loop's own reads fail)
      (error: Error) => request.log.warn(`stream key check failed: ${error.message}`),
    )
  }, services.streams.credentialCheckMs)
  const deadline = Date.now() + MAX_STREAM_MS
  try {
    while (!closed && !revoked && Date.now() < deadline) {
      await readYourWrites(services, await services.store.headPosition())
      const project = await findProject(services.db, customerId, projectId)
      if (!project) break
      const stats = await projectLiveStats(services.db, project, Math.max(1, Math.round(query.interval / 1000) * 5), services.now())
      send('stats', query.format === 'json' ? JSON.stringify(stats) : renderProjectText(stats))
      if (stats.status !== 'active') {
        send('end', query.format === 'json' ? JSON.stringify({ project_id: projectId, status: stats.status }) : `project ${projectId} ${stats.status}`)
        break
      }
      // closed or revoked while the figures were read (a shutdown, the client gone): end now, not after the interval
      if (closed || revoked) break
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, query.interval)
        wake = () => {
          clearTimeout(timer)
          resolve()
        }
      })
    }
    if (revoked && !closed) send('stream_error', JSON.stringify({ code: 'AUTH_INVALID', message: 'the API key of this stream was revoked' }))
  } catch (error) {
    // not `error`: a browser's EventSource uses that name for its own connection errors
    if (!closed) send('stream_error', JSON.stringify({ code: 'INTERNAL_ERROR', message: (error as Error).message }))
  } finally {
    clearInterval(recheck)
    streams.delete(end)
    res.end()
  }
}

/** The numbers of an object, nested ones under dotted keys (`latency_ms.p50`). */
function flatten(value: Record<string, unknown>, prefix = ''): Record<string, number | null> {
  const flat: Record<string, number | null> = {}
  for (const [key, v] of Object.entries(value)) {
    if (typeof v === 'number' || v === null) flat[prefix + key] = v
    else if (v && typeof v === 'object' && !Array.isArray(v)) Object.assign(flat, flatten(v as Record<string, unknown>, `${prefix}${key}.`))
  }
  return flat
}

/** The comparison as chart series: `labels` [aws, user], and per figure (nested ones dotted) the two values. */
function chartComparison(comparison: Awaited<ReturnType<typeof efficiencyComparison>>) {
  const groups = { training: {} as Record<string, [number | null, number | null]>, inference: {} as Record<string, [number | null, number | null]> }
  for (const group of ['training', 'inference'] as const) {
    const [flatAws, flatUser] = [flatten(comparison.aws[group]), flatten(comparison.user[group])]
    for (const key of new Set([...Object.keys(flatAws), ...Object.keys(flatUser)])) groups[group][key] = [flatAws[key] ?? null, flatUser[key] ?? null]
  }
  const labels: ['aws', 'user'] = ['aws', 'user']
  return { labels, training: groups.training, inference: groups.inference, raw: comparison }
}
