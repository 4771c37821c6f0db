import multipart from '@fastify/multipart'
import rateLimit from '@fastify/rate-limit'
import swagger from '@fastify/swagger'
import swaggerUi from '@fastify/swagger-ui'
import Fastify, { type FastifyInstance, type FastifyReply } from 'fastify'
import { jsonSchemaTransform, validatorCompiler } from 'fastify-type-provider-zod'
import { randomBytes } from 'node:crypto'
import type { Writable } from 'node:stream'
import { type Adapters, InProcessAdapters } from '../adapters/runtime.js'
import { BlobCollector } from '../blobs/blob-gc.js'
import { BenchmarkRunner } from '../commands/benchmarks.js'
import { runningBenchmarks } from '../projections/benchmarks.js'
import { DEFAULT_PRICES, type PriceTable } from '../domain/pricing.js'
import { version } from '../version.js'
import { adminRoutes } from './admin.js'
import { deviceAdminRoutes } from './device-admin.js'
import { deviceRoutes } from './devices.js'
import { inferenceRoutes } from './inference.js'
import { type AuthKind, registerAuth, sha256 } from './auth.js'
import { StreamTickets } from './stream-tickets.js'
import { readYourWrites, type Services } from './context.js'
import { errorBody, registerErrorContract } from './errors.js'
import { healthRoutes } from './health.js'
import { registerIdempotency } from './idempotency.js'
import { registerJsonParser } from './json-body.js'
import { modelRoutes } from './models.js'
import { projectRoutes } from './projects.js'
import { trainingRoutes } from './training.js'
import { datasetRoutes } from './datasets.js'
import { dashboardRoutes } from './dashboard.js'
import { efficiencyRoutes } from './efficiency.js'
import { webRoutes } from './web.js'
import { usageRoutes } from './usage.js'
import { VALIDATION_DEFAULTS } from '../domain/validation.js'
import { registerUploadSlots } from './uploads.js'
import { responseSerializer } from './responses.js'

/** The services the routes use (without the limits and clock, which have defaults here), and the app's settings. */
export interface AppDeps extends Omit<Services, 'limits' | 'now' | 'adapters' | 'prices' | 'benchmarks' | 'loadToken' | 'streams' | 'blobCollector'> {
  /** Default: one with the default grace period (24 h), run only by `POST /admin/blobs/gc`; `dcp start` gives the one its timer runs. */
  blobCollector?: BlobCollector
  /** Shortest step-load benchmark, in seconds. Default 60 (the spec's minimum). */
  minPerfDurationS?: number
  /** Default: DEFAULT_PRICES. */
  prices?: PriceTable
  /** Default: the adapters run in-process. */
  adapters?: Adapters
  /** ADMIN_KEY; without it the admin routes refuse every request. */
  adminKey?: string
  internalToken: string
  /** Largest model upload, in bytes. Default 256 MiB. */
  maxModelBytes?: number
  /** Inputs that may wait for a device before new inference is refused (QUEUE_FULL). Default 1,000,000. */
  maxQueuedInputs?: number
  /** Bytes of input values (4 a value) that may wait for a device, in all (default 1 GiB) and per customer (default 256 MiB). */
  maxQueuedBytes?: number
  maxQueuedBytesPerCustomer?: number
  /** Most output values one page of a batch's results holds (about 40 MB of JSON); a fuller page ends early with `next_offset`. Default 2,000,000. */
  maxPageValues?: number
  /** Bytes a customer's models and datasets may take together. Default 10 GiB. */
  maxStorageBytes?: number
  /** Dashboard benchmarks one customer may run at once (their load is exempt from the rate limit). Default 1. */
  maxBenchmarksPerCustomer?: number
  /** Uploads (models, datasets) in progress at once, in all and per customer. Default 4 and 2. */
  uploads?: { total: number; perCustomer: number }
  /** Share of a contributed device's tasks `validation: spot` runs again. Default 0.05. */
  validationSpotRate?: number
  /** Requests per API key (or per address without one) per window. Default 1000 per minute. */
  rateLimit?: { max: number; windowMs: number }
  /** Failed authentications per address per window before it gets 429 unheard. Default 30 per minute. */
  authFailures?: { max: number; windowMs: number }
  /** Live streams one customer may hold open at once; more get 429. Default 20 (MAX_STREAMS_PER_CUSTOMER). */
  maxStreamsPerCustomer?: number
  /** How long a stream ticket may wait to be used. Default 60 s. */
  streamTicketTtlMs?: number
  /** How often an open stream re-checks its API key (it ends soon after a revocation). Default 2 s. */
  streamCredentialCheckMs?: number
  /**
   * Success bodies are checked against their routes' response schemas: one they do not describe is a 500
   * (the test suite's setting; production sends bodies unchecked). Default: DCP_STRICT_RESPONSES=1.
   */
  strictResponses?: boolean
  logLevel?: string
  /** Where the request log goes. Default: standard output. */
  logStream?: Writable
  now?: () => Date
}

export interface RouteInfo {
  method: string
  url: string
  auth: AuthKind
  /** Success statuses other than a plain 200, with what each means. */
  success?: Partial<Record<number, string>>
  /** Takes an `Idempotency-Key` header. */
  idempotent?: boolean
  links?: Record<string, OperationLink>
  requestBody?: Record<string, unknown>
  produces?: string
  /** Also authenticates with a single-use stream ticket, `?ticket=` (auth.ts). */
  ticketInQuery?: boolean
}

/** An OpenAPI link: what a success answer's values let a client (or a stateful fuzzer) call next. */
export interface OperationLink {
  /** The `schema.operationId` of the operation it leads to. */
  operationId: string
  /** Its parameters by name, as runtime expressions, e.g. `{ id: '$response.body#/id' }`. */
  parameters?: Record<string, string>
  /** Its body, whose values may be runtime expressions, e.g. `{ model_id: '$response.body#/id' }`. */
  requestBody?: unknown
  description?: string
}

declare module 'fastify' {
  interface FastifyContextConfig {
    /** OpenAPI links of the route's first success status, by name. */
    links?: Record<string, OperationLink>
    /**
     * The OpenAPI requestBody of a route that reads its body itself (a multipart upload), so has no
     * `schema.body`: the document would otherwise say it takes none.
     */
    requestBody?: Record<string, unknown>
    /** The media type of a success body that is not JSON: a file download (described as binary), or text such as text/event-stream. */
    produces?: string
  }
  interface FastifyInstance {
    /** Every route with its authentication, for the route-table test and the docs. */
    routeTable: RouteInfo[]
  }
}

/** The HTTP API, built from injected parts; tests build it on a real database and call it with inject. */
export async function buildApp(deps: AppDeps): Promise<FastifyInstance> {
  const app = Fastify({
    logger: { level: deps.logLevel ?? 'info', serializers: { req: requestForLog }, ...(deps.logStream ? { stream: deps.logStream } : {}) },
    bodyLimit: 10 * 1024 * 1024,
    // Path parameters are limited by their route's schema (a 400 naming the field and its limit), not by
    // the router's default of 100 characters (a 414 that named neither). Node's header size limit still
    // bounds the whole URL.
    routerOptions: { maxParamLength: 4096 },
    // requests arriving while the server closes get dcp's error format (the hook below), not fastify's own
    return503OnClosing: false,
    // errors the router raises before any route runs (a bad URL, a path parameter over 4096 characters)
    frameworkErrors: (error, _request, reply) => {
      const status = error.statusCode && error.statusCode < 500 ? error.statusCode : 400
      void (reply as FastifyReply).status(status).send(errorBody('VALIDATION_ERROR', error.message))
    },
  })
  // JSON and (for uploads) multipart only: anything else is a 415, not a string handed to the schemas.
  app.removeContentTypeParser('text/plain')
  registerJsonParser(app)
  app.setValidatorCompiler(validatorCompiler)
  app.setSerializerCompiler(responseSerializer({ strict: deps.strictResponses ?? process.env.DCP_STRICT_RESPONSES === '1' }))
  const routeTable: RouteInfo[] = []
  registerErrorContract(app, () => routeTable)
  let closing = false
  app.addHook('preClose', (done) => {
    closing = true
    done()
  })
  app.addHook('onRequest', (_request, reply, done) => {
    if (!closing) return done()
    void reply.status(503).header('connection', 'close').header('retry-after', '5').send(errorBody('SERVICE_UNAVAILABLE', 'the server is shutting down; retry shortly'))
  })
  app.decorate('routeTable', routeTable)
  app.addHook('onRoute', (route) => {
    const methods = Array.isArray(route.method) ? route.method : [route.method]
    for (const method of methods) if (method !== 'HEAD') routeTable.push({ method, url: route.url, auth: route.config?.auth ?? 'none', ...(route.config?.success ? { success: route.config.success } : {}), ...(route.config?.idempotent ? { idempotent: true } : {}), ...(route.config?.ticketInQuery ? { ticketInQuery: true } : {}), ...documented(route.config) })
  })
  registerUploadSlots(app, deps.uploads ?? { total: 4, perCustomer: 2 })
  const tickets = new StreamTickets(deps.streamTicketTtlMs ?? STREAM_DEFAULTS.ticketTtlMs)
  registerAuth(app, { db: deps.db, cached: (name, key, load) => deps.projections.cached(name, key, load), adminKey: deps.adminKey, internalToken: deps.internalToken, tickets, ...(deps.authFailures ? { failures: deps.authFailures } : {}) })
  const loadToken = randomBytes(24).toString('hex')
  await app.register(rateLimit, {
    max: deps.rateLimit?.max ?? 1000,
    timeWindow: deps.rateLimit?.windowMs ?? 60_000,
    // a dashboard benchmark's own requests: its load is the point
    allowList: (request) => request.headers['x-dcp-load'] === loadToken,
    keyGenerator: (request) => {
      const key = request.headers['x-api-key']
      return typeof key === 'string' ? `key:${sha256(key)}` : `ip:${request.ip}`
    },
    // what this returns is thrown, and the error handler answers it: an Error, so that its message reaches
    // the body (a plain object's `error.message` was lost on the way)
    errorResponseBuilder: (_request, context) =>
      Object.assign(new Error(`rate limit of ${context.max} requests per ${context.after} exceeded; retry in ${Math.ceil(context.ttl / 1000)} s`), { statusCode: 429 }),
  })
  await app.register(multipart)
  await app.register(swagger, {
    openapi: {
      info: { title: 'dcp — Distributed Compute Platform API', version },
      components: {
        securitySchemes: {
          apiKey: { type: 'apiKey', in: 'header', name: 'X-API-Key' },
          adminKey: { type: 'apiKey', in: 'header', name: 'X-Admin-Key' },
          internalToken: { type: 'apiKey', in: 'header', name: 'X-Internal-Token' },
          sdkToken: { type: 'apiKey', in: 'header', name: 'X-SDK-Token' },
          streamTicket: { type: 'apiKey', in: 'query', name: 'ticket', description: 'a single-use ticket from POST /api/v1/dashboard/stream-tickets, for clients that cannot send X-API-Key (EventSource); `api_key` is refused' },
        },
      },
    },
    transform: jsonSchemaTransform,
    transformObject: (document) => ('openapiObject' in document ? describeOperations(document.openapiObject, routeTable) : document.swaggerObject),
  })
  await app.register(swaggerUi, { routePrefix: '/docs', uiConfig: { url: '/api/v1/openapi.json' } as never })

  const services: Services = {
    store: deps.store,
    projections: deps.projections,
    db: deps.db,
    blobs: deps.blobs,
    blobCollector: deps.blobCollector ?? new BlobCollector({ blobs: deps.blobs, store: deps.store, db: deps.db, waitFor: (position, ms) => deps.projections.waitFor(position, ms), ...(deps.now ? { now: deps.now } : {}) }),
    hub: deps.hub,
    scheduler: deps.scheduler,
    training: deps.training,
    adapters: deps.adapters ?? new InProcessAdapters(),
    prices: deps.prices ?? DEFAULT_PRICES,
    limits: { maxModelBytes: deps.maxModelBytes ?? 256 * 1024 * 1024, maxQueuedInputs: deps.maxQueuedInputs ?? 1_000_000, maxQueuedBytes: deps.maxQueuedBytes ?? 1024 ** 3, maxQueuedBytesPerCustomer: deps.maxQueuedBytesPerCustomer ?? 256 * 1024 ** 2, minPerfDurationS: deps.minPerfDurationS ?? 60, validationSpotRate: deps.validationSpotRate ?? VALIDATION_DEFAULTS.spotRate, maxPageValues: deps.maxPageValues ?? 2_000_000, maxStorageBytes: deps.maxStorageBytes ?? 10 * 1024 ** 3 },
    now: deps.now ?? (() => new Date()),
    loadToken,
    streams: { tickets, maxPerCustomer: deps.maxStreamsPerCustomer ?? STREAM_DEFAULTS.maxPerCustomer, credentialCheckMs: deps.streamCredentialCheckMs ?? STREAM_DEFAULTS.credentialCheckMs },
    benchmarks: undefined as unknown as BenchmarkRunner,
  }
  services.benchmarks = new BenchmarkRunner({
    store: deps.store,
    blobs: deps.blobs,
    waitFor: (position) => readYourWrites(services, position),
    now: services.now,
    log: (message) => app.log.warn(message),
    maxPerCustomer: deps.maxBenchmarksPerCustomer ?? 1,
  })
  app.addHook('onClose', () => services.benchmarks.stop())
  // before the routes, whose create handlers it wraps
  registerIdempotency(app, services)
  app.addHook('onClose', async () => {
    await services.adapters.close?.()
  })
  // a benchmark left running by a crash ends as failed (its read model exists once the projections run)
  await runningBenchmarks(deps.db).then((running) => services.benchmarks.recover(running), (error: Error) => app.log.warn(`benchmarks not recovered: ${error.message}`))
  await app.register(
    async (api) => {
      api.get('/openapi.json', { config: { auth: 'none' }, schema: { hide: true } }, async () => app.swagger())
      await api.register(healthRoutes, { services })
      await api.register(adminRoutes, { services })
      await api.register(deviceAdminRoutes, { services })
      await api.register(modelRoutes, { services })
      await api.register(deviceRoutes, { services })
      await api.register(inferenceRoutes, { services })
      await api.register(projectRoutes, { services })
      await api.register(usageRoutes, { services })
      await api.register(trainingRoutes, { services })
      await api.register(datasetRoutes, { services })
      await api.register(efficiencyRoutes, { services })
      await api.register(dashboardRoutes, { services })
    },
    { prefix: '/api/v1' },
  )
  await app.register(webRoutes, { services })
  deps.hub.attach(app.server)
  return app
}

/** What a route's config adds to its OpenAPI operation. */
function documented(config: { links?: Record<string, OperationLink>; requestBody?: Record<string, unknown>; produces?: string } | undefined): Pick<RouteInfo, 'links' | 'requestBody' | 'produces'> {
  return { ...(config?.links ? { links: config.links } : {}), ...(config?.requestBody ? { requestBody: config.requestBody } : {}), ...(config?.produces ? { produces: config.produces } : {}) }
}

/** Live stream defaults (AppDeps says what each is). */
export const STREAM_DEFAULTS = { maxPerCustomer: 20, ticketTtlMs: 60_000, credentialCheckMs: 2000 }

/** Query parameters whose values are secrets (or as good as: a stream ticket), masked in the request log. */
const SECRET_PARAMETER = /key|ticket|token|secret|password/i

/**
 * A request as the log shows it: the query's secret values masked (`?api_key=[redacted]`), so that a key or
 * ticket sent in a URL never reaches the logs. (Headers are not logged at all.)
 */
export function requestForLog(request: { method: string; url: string; host?: string; ip?: string; socket?: { remotePort?: number } }) {
  return { method: request.method, url: redactUrl(request.url), host: request.host, remoteAddress: request.ip, remotePort: request.socket?.remotePort }
}

export function redactUrl(url: string): string {
  const at = url.indexOf('?')
  if (at < 0) return url
  const parameters = url.slice(at + 1).split('&').map((pair) => {
    const eq = pair.indexOf('=')
    const name = eq < 0 ? pair : pair.slice(0, eq)
    let decoded = name
    try {
      decoded = decodeURIComponent(name.replaceAll('+', ' '))
    } catch {} // a malformed name: matched as it is
    return SECRET_PARAMETER.test(decoded) ? `${name}=[redacted]` : pair
  })
  return `${url.slice(0, at)}?${parameters.join('&')}`
}

const SECURITY: Record<Exclude<AuthKind, 'none'>, string> = { api_key: 'apiKey', admin: 'adminKey', internal: 'internalToken', sdk: 'sdkToken' }

const ERROR_SCHEMA = {
  type: 'object',
  required: ['error'],
  properties: {
    error: {
      type: 'object',
      required: ['code', 'message'],
      properties: {
        code: { type: 'string', example: 'VALIDATION_ERROR' },
        message: { type: 'string', example: 'body.input.shape: Required' },
        job_id: { type: 'string', description: 'the job a failed, timed-out or interrupted synchronous inference request created (poll it)' },
      },
    },
  },
}
const IDEMPOTENCY_PARAMETER = {
  in: 'header',
  name: 'Idempotency-Key',
  required: false,
  schema: { type: 'string', minLength: 1, maxLength: 255, pattern: '^[\\x21-\\x7e]+$' },
  description:
    'Makes a retry safe: a request with the same key and the same body within 24 hours gets the first answer (the same ids; marked `Idempotent-Replayed: true`) and creates nothing; the same key with another body is 422 IDEMPOTENCY_MISMATCH. Keys are per customer.',
}
const ERROR_CONTENT = { 'application/json': { schema: { $ref: '#/components/schemas/Error' } } }

/**
 * Completes each operation of the OpenAPI document with what the routes do not say in their zod schemas: the
 * header it authenticates with, its success statuses (a plain 200 unless the route's `success` says
 * otherwise), and the error contract, `{"error":{"code","message"}}`, for every 4xx and 5xx answer; and
 * what a route's config documents: the links of its first success status, the requestBody of a route that
 * reads its body itself, the media type of a body that is not JSON.
 */
function describeOperations(document: Record<string, any>, routes: RouteInfo[]): Record<string, any> {
  document.components = { ...document.components, schemas: { ...document.components?.schemas, Error: ERROR_SCHEMA } }
  for (const route of routes) {
    const path = route.url.replace(/:([A-Za-z]+)/g, '{$1}')
    const operation = document.paths?.[path]?.[route.method.toLowerCase()]
    if (!operation) continue
    if (route.auth !== 'none') operation.security = [{ [SECURITY[route.auth]]: [] }]
    // the ticket is a credential, the other way in, rather than a parameter of the request
    if (route.ticketInQuery) {
      operation.security.push({ streamTicket: [] })
      operation.parameters = operation.parameters?.filter((p: { in: string; name: string }) => !(p.in === 'query' && p.name === 'ticket'))
    }
    if (route.idempotent) operation.parameters = [...(operation.parameters ?? []), IDEMPOTENCY_PARAMETER]
    // a body that may be null may also be left out (zod's `.nullish()`): @fastify/swagger marks every body required
    if (operation.requestBody?.content?.['application/json']?.schema?.nullable) operation.requestBody.required = false
    const responses: Record<string, unknown> = {}
    // the body's schema, from the route's `schema.response`, with what the status means
    const described = (status: string, description: string) => ({ ...operation.responses?.[status], description })
    if (route.success) for (const [status, description] of Object.entries(route.success)) responses[status] = described(status, description!)
    else responses['200'] = described('200', operation.responses?.['200']?.description ?? 'Success')
    const first = Object.keys(responses)[0]!
    if (route.produces) responses[first] = { ...(responses[first] as object), content: { [route.produces]: { schema: route.produces.startsWith('text/') ? { type: 'string' } : { type: 'string', format: 'binary' } } } }
    if (route.links) responses[first] = { ...(responses[first] as object), links: route.links }
    if (route.requestBody) operation.requestBody = route.requestBody
    // other statuses the route gives a body of its own (e.g. the detailed health's 503)
    for (const [status, response] of Object.entries(operation.responses ?? {})) if (!(status in responses) && (response as { content?: unknown }).content) responses[status] = { description: status, ...(response as object) }
    responses['4XX'] = {
      description:
        'Refused: 400 VALIDATION_ERROR (naming the field), 401 AUTH_REQUIRED or AUTH_INVALID, 403 FORBIDDEN, 404 NOT_FOUND, 405 METHOD_NOT_ALLOWED, ' +
        '409 (a state that does not allow it, e.g. CANNOT_CANCEL; IDEMPOTENCY_IN_PROGRESS), 413 PAYLOAD_TOO_LARGE, 415 UNSUPPORTED_MEDIA_TYPE, 422 IDEMPOTENCY_MISMATCH (an Idempotency-Key reused for another request), 429 RATE_LIMITED (with Retry-After), ...',
      content: ERROR_CONTENT,
    }
    responses['5XX'] = { description: "500 INTERNAL_ERROR (dcp's own fault), or 502/503/504 when something it depends on failed, is unavailable or timed out", content: ERROR_CONTENT }
    operation.responses = responses
  }
  allowNullInNullableEnums(document)
  return document
}

/**
 * OpenAPI 3.0: `nullable: true` does not admit null to an `enum` that does not list it (the 3.0.3
 * clarification), so a nullable enum lists null too: `"preprocessing": null` clears it, as documented.
 */
function allowNullInNullableEnums(node: unknown): void {
  if (Array.isArray(node)) return node.forEach(allowNullInNullableEnums)
  if (!node || typeof node !== 'object') return
  const schema = node as { nullable?: boolean; enum?: unknown[] }
  if (schema.nullable === true && Array.isArray(schema.enum) && !schema.enum.includes(null)) schema.enum = [...schema.enum, null]
  for (const value of Object.values(node)) allowNullInNullableEnums(value)
}
