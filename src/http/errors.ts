import type { FastifyError, FastifyInstance } from 'fastify'
import { DomainError } from '../domain/errors.js'

/** HTTP status of each error code; the spec's codes, and dcp's own where the spec is silent. */
const STATUS: Record<string, number> = {
  VALIDATION_ERROR: 400,
  INVALID_JSON: 400,
  UNAUTHORIZED: 401,
  FORBIDDEN: 403,
  NOT_FOUND: 404,
  CONFLICT: 409,
  PAYLOAD_TOO_LARGE: 413,
  UNSUPPORTED_MEDIA_TYPE: 415,
  RATE_LIMITED: 429,
  INTERNAL_ERROR: 500,
  SERVICE_UNAVAILABLE: 503,
}

export function errorBody(code: string, message: string) {
  return { error: { code, message } }
}

/** Every error leaves as `{"error":{"code","message"}}`: domain errors, fastify's own, unknown routes. */
export function registerErrorContract(app: FastifyInstance): void {
  app.setNotFoundHandler((request, reply) => {
    void reply.status(404).send(errorBody('NOT_FOUND', `no route ${request.method} ${request.url.split('?')[0]}`))
  })
  app.setErrorHandler((error: FastifyError | DomainError | Error, request, reply) => {
    if (error instanceof DomainError) {
      return reply.status(STATUS[error.code] ?? 400).send(errorBody(error.code, error.message))
    }
    const fe = error as FastifyError
    if (fe.code === 'FST_ERR_CTP_INVALID_JSON_BODY' || fe.code === 'FST_ERR_CTP_EMPTY_JSON_BODY') {
      return reply.status(400).send(errorBody('INVALID_JSON', fe.message))
    }
    if (fe.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') return reply.status(415).send(errorBody('UNSUPPORTED_MEDIA_TYPE', fe.message))
    if (fe.code === 'FST_ERR_CTP_BODY_TOO_LARGE') return reply.status(413).send(errorBody('PAYLOAD_TOO_LARGE', fe.message))
    if (fe.statusCode && fe.statusCode >= 400 && fe.statusCode < 500) {
      return reply.status(fe.statusCode).send(errorBody(fe.code ?? 'BAD_REQUEST', fe.message))
    }
    request.log.error({ err: error }, 'request failed')
    return reply.status(500).send(errorBody('INTERNAL_ERROR', 'internal error'))
  })
}
