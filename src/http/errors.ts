import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { hasZodFastifySchemaValidationErrors } from 'fastify-type-provider-zod'
import { BlobTooLargeError } from '../blobs/blob-store.js'
import { DomainError } from '../domain/errors.js'
import { EventStoreUnavailableError, PayloadTooLargeError, UnstorableEventError } from '../event-store/errors.js'
import { MAX_JSON_DEPTH, NUL_MESSAGE, nulField, unfitJson } from '../event-store/storable.js'

/** HTTP status of each error code: the spec's codes, and dcp's own where the spec is silent. */
const STATUS: Record<string, number> = {
  VALIDATION_ERROR: 400,
  AUTH_REQUIRED: 401,
  AUTH_INVALID: 401,
  FORBIDDEN: 403,
  NOT_FOUND: 404,
  NO_MODEL: 404,
  METHOD_NOT_ALLOWED: 405,
  CONFLICT: 409,
  DEVICE_OFFLINE: 409,
  CANNOT_CANCEL: 409,
  CANNOT_PAUSE: 409,
  CANNOT_RESUME: 409,
  /** A request with the same Idempotency-Key is still running (it answered nothing yet): retry later. */
  IDEMPOTENCY_IN_PROGRESS: 409,
  /** The Idempotency-Key was used in the last 24 hours for another request (route or body). */
  IDEMPOTENCY_MISMATCH: 422,
  INFERENCE_FAILED: 422,
  PAYLOAD_TOO_LARGE: 413,
  UNSUPPORTED_MEDIA_TYPE: 415,
  RATE_LIMITED: 429,
  QUOTA_EXCEEDED: 413,
  INTERNAL_ERROR: 500,
  /** A pre/post-processing Lambda function failed (its error in the message). */
  ADAPTER_FAILED: 502,
  /** A pre/post-processing Lambda function could not be invoked. */
  ADAPTER_UNAVAILABLE: 503,
  NO_DEVICES: 503,
  /** The queue of inputs waiting for a device is full (MAX_QUEUED_INPUTS). */
  QUEUE_FULL: 503,
  NO_TRAINING_DEVICES: 503,
  SERVICE_UNAVAILABLE: 503,
  TIMEOUT: 504,
}

export function statusOf(code: string): number {
  return STATUS[code] ?? 400
}

/** The error contract's body; `details` (e.g. a sync request's `job_id`) go beside the code and message. */
export function errorBody(code: string, message: string, details?: Record<string, unknown>) {
  return { error: { code, message, ...details } }
}

/** fastify's own client errors (bad JSON, wrong content type, too large, ...) and their codes here. */
const FASTIFY_CODES: Record<string, string> = {
  FST_ERR_CTP_INVALID_JSON_BODY: 'VALIDATION_ERROR',
  FST_ERR_CTP_EMPTY_JSON_BODY: 'VALIDATION_ERROR',
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: 'VALIDATION_ERROR',
  FST_ERR_CTP_INVALID_MEDIA_TYPE: 'UNSUPPORTED_MEDIA_TYPE',
  FST_ERR_CTP_BODY_TOO_LARGE: 'PAYLOAD_TOO_LARGE',
  FST_REQ_FILE_TOO_LARGE: 'PAYLOAD_TOO_LARGE',
  FST_PARTS_LIMIT: 'PAYLOAD_TOO_LARGE',
  FST_FILES_LIMIT: 'PAYLOAD_TOO_LARGE',
  FST_FIELDS_LIMIT: 'PAYLOAD_TOO_LARGE',
  FST_INVALID_MULTIPART_CONTENT_TYPE: 'UNSUPPORTED_MEDIA_TYPE',
  FST_ERR_VALIDATION: 'VALIDATION_ERROR',
}

/** A route's path as a pattern: `:name` is one segment, a trailing `*` anything. */
function pathPattern(url: string): RegExp {
  const source = url
    .split('/')
    .map((segment) => (segment.startsWith(':') ? '[^/]+' : segment === '*' ? '.*' : segment.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')))
    .join('/')
  return new RegExp(`^${source}/?$`)
}

/**
 * Every error leaves as `{"error":{"code","message"}}`: domain errors, validation, fastify's own, unknown
 * routes. `routes` (the route table, read when a request misses) tells a path that exists under other
 * methods, which is a 405 with `Allow`, from one that does not (404).
 */
export function registerErrorContract(app: FastifyInstance, routes: () => readonly { method: string; url: string }[] = () => []): void {
  const patterns = new Map<string, RegExp>()
  // The methods of the resource at `path`: those of the most concrete route template that matches it, as
  // OpenAPI matches a concrete path before a templated one (POST /inference/batch is its own resource, not
  // the job `batch` of GET /inference/:jobId, whose methods it used to advertise).
  const allowedMethods = (path: string) => {
    const methods = new Set<string>()
    let fewest = Infinity
    for (const route of routes()) {
      let pattern = patterns.get(route.url)
      if (!pattern) patterns.set(route.url, (pattern = pathPattern(route.url)))
      if (!pattern.test(path)) continue
      const parameters = route.url.split('/').filter((segment) => segment.startsWith(':') || segment === '*').length
      if (parameters < fewest) methods.clear()
      if (parameters <= fewest) {
        fewest = parameters
        methods.add(route.method)
      }
    }
    if (methods.has('GET')) methods.add('HEAD')
    return [...methods].sort()
  }
  // before the route's own validation: every route, whatever its schema
  // (callback style: no promise per request on the hot path)
  app.addHook('preValidation', (request, reply, done) => {
    const field = nulField(request.params, 'params') ?? nulField(request.query, 'querystring')
    const body = field ? undefined : unfitJson(request.body, 'body')
    if (!field && !body) return done()
    const message = body?.problem === 'depth' ? `${body.field}: nested more than ${MAX_JSON_DEPTH} levels deep (arrays and objects within each other); dcp takes at most ${MAX_JSON_DEPTH}` : `${field ?? body!.field}: ${NUL_MESSAGE}`
    void reply.status(400).send(errorBody('VALIDATION_ERROR', message))
  })
  const noRoute = (request: FastifyRequest, reply: FastifyReply) => {
    const path = request.url.split('?')[0]!
    const allowed = allowedMethods(path)
    if (allowed.length > 0) {
      return reply.status(405).header('allow', allowed.join(', ')).send(errorBody('METHOD_NOT_ALLOWED', `${request.method} is not allowed on ${path}; it takes ${allowed.join(', ')}`))
    }
    return reply.status(404).send(errorBody('NOT_FOUND', `no route ${request.method} ${path}`))
  }
  app.setNotFoundHandler((request, reply) => void noRoute(request, reply))
  app.setErrorHandler((error: FastifyError | Error, request, reply) => {
    // no route takes the request: that is the answer, whatever else is wrong with it (e.g. a body sent with
    // a method no route takes, which fastify reads, and refuses, before the not-found handler)
    if (request.is404) return noRoute(request, reply)
    if (error instanceof DomainError) return reply.status(statusOf(error.code)).send(errorBody(error.code, error.message, error.details))
    if (error instanceof BlobTooLargeError) return reply.status(413).send(errorBody('PAYLOAD_TOO_LARGE', error.message))
    // an event the log refused for its size (EventStoreDB's MaxAppendSize): the request carried too much
    if (error instanceof PayloadTooLargeError) return reply.status(413).send(errorBody('PAYLOAD_TOO_LARGE', `the request is too large to record: ${error.message}`))
    // the log cannot be reached for a moment (a restart, a network blip, a timed-out append): nothing was
    // recorded that the client is not told of, and a retry (with its Idempotency-Key) is safe
    if (error instanceof EventStoreUnavailableError) {
      void reply.header('retry-after', '1')
      return reply.status(503).send(errorBody('SERVICE_UNAVAILABLE', `the event store is unavailable; retry shortly (${error.message})`))
    }
    // the last line of defence for NUL (the hook above names the field when it is in the JSON, query or path)
    if (error instanceof UnstorableEventError) return reply.status(400).send(errorBody('VALIDATION_ERROR', `the request holds the NUL character (\\u0000) in a value dcp would store (${error.eventType})`))
    if (hasZodFastifySchemaValidationErrors(error)) {
      const where = error.validationContext ?? 'request'
      const message = error.validation
        .map((v) => `${where}${v.instancePath ? v.instancePath.replaceAll('/', '.') : ''}: ${v.message ?? 'invalid'}`)
        .join('; ')
      return reply.status(400).send(errorBody('VALIDATION_ERROR', message))
    }
    const fe = error as FastifyError
    const mapped = fe.code ? FASTIFY_CODES[fe.code] : undefined
    if (mapped) return reply.status(statusOf(mapped)).send(errorBody(mapped, fe.message))
    if (fe.statusCode === 429) return reply.status(429).send(errorBody('RATE_LIMITED', fe.message))
    if (fe.statusCode && fe.statusCode >= 400 && fe.statusCode < 500) {
      return reply.status(fe.statusCode).send(errorBody('VALIDATION_ERROR', fe.message))
    }
    request.log.error({ err: error }, 'request failed')
    return reply.status(500).send(errorBody('INTERNAL_ERROR', 'internal error'))
  })
}
