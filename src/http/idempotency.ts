import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { handleCommand } from '../commands/handle-command.js'
import { DomainError } from '../domain/errors.js'
import { idempotencyDecider, type IdempotencyCommand, idempotencyStream, seedOf } from '../domain/idempotency.js'
import type { EventStore } from '../event-store/port.js'
import { customerOf, sha256 } from './auth.js'
import { derivedId, newId } from './ids.js'

/**
 * `Idempotency-Key` on the routes that create (see README, "Idempotent requests", and docs/event-store.md).
 * A route opts in with `config.idempotent`; the key is claimed in the log before the handler runs (for an
 * upload, once the handler has read it: `claimUpload`), and the answer is recorded as it is sent. A repeat
 * within 24 hours gets the first answer, marked `Idempotent-Replayed: true`, and runs nothing.
 *
 * A server can stop between the create and the record of its answer. So the route names what it creates
 * with `createdId` (the same id for every run of the request under one key), creates it on a new stream
 * (expecting none), and says in `recover` how to answer from it: a retry that takes over the claim asks
 * `recover` first, and runs the route only when nothing was created.
 */
export interface IdempotentRoute {
  /** Request headers that change what the route does (e.g. `x-async`): part of what a repeat must match. Default none. */
  headers?: readonly string[]
  /** A multipart upload: the handler reads it, then calls `claimUpload` with its fields and file. Default false. */
  upload?: boolean
  /**
   * Sends the route's answer for what this request created (found by `createdId`), or resolves undefined
   * when it created nothing; may throw the route's error answer (one with a `job_id`).
   */
  recover(request: FastifyRequest, reply: FastifyReply): Promise<FastifyReply | undefined>
  /** How long the route may wait on top of its work (a synchronous inference: its timeout), in ms. Default 0. */
  waits?(request: FastifyRequest): number
}

/** The key a request holds, and what became of its claim. */
interface HeldKey {
  key: string
  customerId: string
  streamId: string
  /** Set when this request claimed the key (it runs the route and records the answer). */
  claimId?: string
  /** What the claimed request's creates are named by (`createdId`). */
  seed?: string
  settled?: boolean
}

declare module 'fastify' {
  interface FastifyContextConfig {
    /** The route takes an `Idempotency-Key`: its JSON body (or upload), parameters, query and `headers` are the request. */
    idempotent?: IdempotentRoute
  }
  interface FastifyRequest {
    idempotency: HeldKey | undefined
  }
}

export const IDEMPOTENCY_HEADER = 'idempotency-key'
export const REPLAYED_HEADER = 'idempotent-replayed'
/** 1 to 255 visible ASCII characters (a UUID is the usual choice). */
const KEY = /^[\x21-\x7e]{1,255}$/
/** How long a repeat waits for the first request, still running, to answer. */
const WAIT_MS = 60_000
/**
 * How long a claimed request may run, besides what it `waits`, before its claim counts as abandoned (its
 * server stopped) and a retry takes it over. Creates take well under it (the longest waits are the 10 s for
 * the read models). Short, because a takeover is safe: it answers from what the first run created.
 */
export const RUNS_FOR_MS = 2 * 60 * 1000

export interface IdempotencyOptions {
  store: EventStore
  now(): Date
}

export function registerIdempotency(app: FastifyInstance, options: IdempotencyOptions): void {
  app.decorateRequest('idempotency', undefined)

  app.addHook('preHandler', async (request, reply) => {
    const route = request.routeOptions.config?.idempotent
    if (!route) return
    const key = keyOf(request)
    if (key === undefined) return
    const customerId = customerOf(request)
    request.idempotency = { key, customerId, streamId: idempotencyStream(customerId, sha256(key)) }
    if (route.upload) return // the handler claims once it has read the upload
    const body = { params: request.params, query: request.query, headers: headersOf(request, route), body: request.body ?? null }
    return claim(options, request, reply, body)
  })

  // the answer is recorded before it leaves, so a retry after it sees it
  app.addHook('onSend', async (request, reply, payload) => {
    const held = request.idempotency
    if (!held?.claimId || held.settled) return payload
    held.settled = true
    await settle(options, request, reply, held, payload).catch((error: unknown) => request.log.error({ err: error }, 'recording the idempotent answer failed'))
    return payload
  })
}

/**
 * For an upload route: claims the request's key for these fields and file (the multipart boundary differs
 * between retries, so the raw body cannot be compared). Returns the sent reply when the key was answered
 * before (return it from the handler), undefined when the handler should go on.
 */
export async function claimUpload(options: IdempotencyOptions, request: FastifyRequest, reply: FastifyReply, upload: { fields: Record<string, string>; file?: { name: string | undefined; sha256: string } | undefined }): Promise<FastifyReply | undefined> {
  if (!request.idempotency) return undefined
  return claim(options, request, reply, { fields: upload.fields, file: upload.file ?? null })
}

/**
 * The id the request's create gives what it creates: derived from its claim's seed, so that every run of the
 * request under one key gives the same (a new one each call without a key).
 */
export function createdId(request: FastifyRequest, prefix: string): string {
  const seed = request.idempotency?.seed
  return seed ? derivedId(prefix, seed) : newId(prefix)
}

/**
 * 1. claim the key for this request; 2. if it stands for the same request already, replay its answer, or
 * wait for it while the first request still runs (a release frees the key, and this request claims it);
 * 3. a claim that took over the seed of an earlier run (abandoned, or released) answers from what that run
 * created, if it did, instead of running the route.
 */
async function claim(options: IdempotencyOptions, request: FastifyRequest, reply: FastifyReply, parts: unknown): Promise<FastifyReply | undefined> {
  const held = request.idempotency!
  const route = request.routeOptions.config.idempotent!
  const fingerprint = sha256(canonicalJson({ method: request.method, route: request.routeOptions.url, parts }))
  const started = performance.now()
  for (let pause = 25; ; pause = Math.min(pause * 2, 250)) {
    const claimId = randomUUID()
    const now = options.now()
    const at = now.toISOString()
    const runsUntil = new Date(now.getTime() + RUNS_FOR_MS + (route.waits?.(request) ?? 0)).toISOString()
    const command: IdempotencyCommand = {
      type: 'ClaimKey',
      claim: { claim_id: claimId, customer_id: held.customerId, key_sha256: sha256(held.key), fingerprint, method: request.method, route: request.routeOptions.url ?? request.url, claimed_at: at, runs_until: runsUntil },
    }
    const result = await handleCommand(options.store, held.streamId, idempotencyDecider, command, { metadata: { customerId: held.customerId, occurredAt: at } })
    const claimed = result.events[0]
    if (claimed?.type === 'IdempotencyKeyClaimed') {
      held.claimId = claimId
      held.seed = seedOf(claimed.data)
      return held.seed === claimId ? undefined : recover(request, reply, route)
    }
    const answer = result.state.answer
    if (answer) {
      return reply.status(answer.status).header('content-type', answer.content_type).header(REPLAYED_HEADER, 'true').send(answer.body)
    }
    if (performance.now() - started > WAIT_MS) {
      void reply.header('retry-after', '1')
      throw new DomainError('IDEMPOTENCY_IN_PROGRESS', `a request with this Idempotency-Key is still running after ${WAIT_MS / 1000} s; retry later for its answer`)
    }
    await sleep(pause)
  }
}

/** Answers from what an earlier run of the request created, if it did (undefined: run the route). */
async function recover(request: FastifyRequest, reply: FastifyReply, route: IdempotentRoute): Promise<FastifyReply | undefined> {
  void reply.header(REPLAYED_HEADER, 'true') // the answer is the first run's, not a new run's
  const recovered = await route.recover(request, reply)
  if (!recovered) reply.removeHeader(REPLAYED_HEADER)
  return recovered
}

/**
 * Records what became of a claimed request: its answer when it created something (a 2xx, or an error that
 * names the job it created, as a synchronous inference that timed out does), else a release, so that a
 * retry runs it again.
 */
async function settle(options: IdempotencyOptions, request: FastifyRequest, reply: FastifyReply, held: HeldKey, payload: unknown): Promise<void> {
  const at = options.now().toISOString()
  const body = typeof payload === 'string' ? payload : Buffer.isBuffer(payload) ? payload.toString('utf8') : payload == null ? '' : undefined
  const status = reply.statusCode
  const command: IdempotencyCommand =
    body !== undefined && (status < 400 || namesCreatedJob(body))
      ? { type: 'AnswerRequest', answer: { claim_id: held.claimId!, status, content_type: String(reply.getHeader('content-type') ?? 'application/json; charset=utf-8'), body, answered_at: at } }
      : { type: 'ReleaseKey', claimId: held.claimId!, status, at }
  await handleCommand(options.store, held.streamId, idempotencyDecider, command, { metadata: { customerId: held.customerId, occurredAt: at } })
}

/** An error answer that carries the id of the job the request created (`error.job_id`). */
function namesCreatedJob(body: string): boolean {
  try {
    const parsed = JSON.parse(body) as { error?: { job_id?: unknown } }
    return typeof parsed.error?.job_id === 'string'
  } catch {
    return false
  }
}

/** The request's key, undefined without one; a malformed key is refused. */
function keyOf(request: FastifyRequest): string | undefined {
  const value = request.headers[IDEMPOTENCY_HEADER]
  if (value === undefined) return undefined
  if (typeof value !== 'string' || !KEY.test(value)) throw new DomainError('VALIDATION_ERROR', 'Idempotency-Key: must be one header of 1 to 255 visible ASCII characters')
  return value
}

function headersOf(request: FastifyRequest, route: IdempotentRoute): Record<string, unknown> {
  return Object.fromEntries((route.headers ?? []).map((name) => [name, request.headers[name] ?? null]))
}

/** JSON with every object's keys in order: the same request, whatever order its client wrote the keys in. */
export function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_key, v: unknown) => (v && typeof v === 'object' && !Array.isArray(v) ? Object.fromEntries(Object.entries(v).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) : v))
}
