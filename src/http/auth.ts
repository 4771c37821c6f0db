import { createHash, timingSafeEqual } from 'node:crypto'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { Kysely } from 'kysely'
import { DomainError } from '../domain/errors.js'
import { findCredential } from '../projections/customers.js'
import type { StreamTickets } from './stream-tickets.js'

/**
 * The four ways to call dcp, one per route (`config.auth`):
 * - `api_key`: a customer, `X-API-Key`;
 * - `admin`: operators, `X-Admin-Key` equal to ADMIN_KEY (admin routes refuse everything without it);
 * - `internal`: other services, `X-Internal-Token` (generated into `<data>/internal_token`);
 * - `sdk`: devices, `X-SDK-Token` issued at registration;
 * - `none`: health and docs.
 * API keys and SDK tokens are looked up by their SHA-256 in the credentials read model; the admin key and
 * the internal token are compared with the configured secret. Every comparison is constant-time.
 */
export type AuthKind = 'none' | 'api_key' | 'admin' | 'internal' | 'sdk'

export const AUTH_HEADERS: Record<Exclude<AuthKind, 'none'>, string> = {
  api_key: 'x-api-key',
  admin: 'x-admin-key',
  internal: 'x-internal-token',
  sdk: 'x-sdk-token',
}

export interface Caller {
  kind: AuthKind
  /** The customer calling (api_key), or owning the device (sdk). */
  customerId?: string
  /** The credential's id (an API key id, or the device id of an SDK token). */
  keyId?: string
  /** SHA-256 of the API key (api_key callers): a long-lived stream re-checks it to end when the key is revoked. */
  keyHash?: string
  /** The project a stream ticket was issued for, if it named one. */
  ticketProjectId?: string
}

declare module 'fastify' {
  interface FastifyRequest {
    caller: Caller
  }
  interface FastifyContextConfig {
    auth?: AuthKind
    /**
     * An API key route that also takes a single-use stream ticket as `?ticket=` (for EventSource, which cannot
     * send headers; see StreamTickets). `?api_key=` is refused there (400): keys never go in URLs.
     */
    ticketInQuery?: boolean
    /** The route's success statuses and what each means, for the OpenAPI document (default: 200). */
    success?: Partial<Record<200 | 201 | 202 | 204, string>>
  }
}

export interface AuthOptions {
  db: Kysely<any>
  /** Remembers a credential read until the credentials read model changes (Projections.cached). */
  cached?: <V>(name: string, key: string, load: () => Promise<V>) => Promise<V>
  adminKey: string | undefined
  internalToken: string
  /** Tickets for `ticketInQuery` routes. */
  tickets: StreamTickets
  /** Failed authentications one address may make per window before it is refused unheard (429). Default 30 per minute. */
  failures?: { max: number; windowMs: number }
}

/**
 * Failed authentications per address, counted before any credential is looked up: an address past the
 * limit gets 429 at once, so guessing admin keys or sending random API keys is bounded, and costs no
 * lookup. (The per-key rate limit, after authentication, bounds what a valid key may do.)
 */
export class AuthFailures {
  private readonly byAddress = new Map<string, { count: number; resetAt: number }>()

  constructor(readonly max: number, readonly windowMs: number, private readonly now: () => number = Date.now) {}

  /** Seconds until the address may try again, or 0 when it may now. */
  blockedFor(address: string): number {
    const entry = this.byAddress.get(address)
    if (!entry) return 0
    const now = this.now()
    if (entry.resetAt <= now) {
      this.byAddress.delete(address)
      return 0
    }
    return entry.count >= this.max ? Math.ceil((entry.resetAt - now) / 1000) : 0
  }

  record(address: string): void {
    const now = this.now()
    const entry = this.byAddress.get(address)
    if (entry && entry.resetAt > now) entry.count++
    else {
      if (this.byAddress.size >= 100_000) for (const [a, e] of this.byAddress) if (e.resetAt <= now) this.byAddress.delete(a)
      this.byAddress.set(address, { count: 1, resetAt: now + this.windowMs })
    }
  }
}

export const sha256 = (secret: string) => createHash('sha256').update(secret).digest('hex')

/** Constant-time equality of two secrets (hashed first, so lengths never leak). */
export function sameSecret(a: string, b: string): boolean {
  return timingSafeEqual(createHash('sha256').update(a).digest(), createHash('sha256').update(b).digest())
}

export function registerAuth(app: FastifyInstance, options: AuthOptions): void {
  app.decorateRequest('caller', undefined as unknown as Caller)
  const failures = new AuthFailures(options.failures?.max ?? 30, options.failures?.windowMs ?? 60_000)
  app.addHook('onRequest', async (request, reply) => {
    const kind = request.routeOptions.config?.auth ?? 'none'
    if (kind === 'none') {
      request.caller = { kind }
      return
    }
    const wait = failures.blockedFor(request.ip)
    if (wait > 0) {
      void reply.header('retry-after', String(wait))
      throw new DomainError('RATE_LIMITED', `too many failed authentications from this address; retry in ${wait} s`)
    }
    try {
      request.caller = await authenticate(request, kind, options)
    } catch (error) {
      if (error instanceof DomainError && (error.code === 'AUTH_INVALID' || error.code === 'AUTH_REQUIRED')) failures.record(request.ip)
      throw error
    }
  })
}

async function authenticate(request: FastifyRequest, kind: Exclude<AuthKind, 'none'>, options: AuthOptions): Promise<Caller> {
  const header = AUTH_HEADERS[kind]
  const value = request.headers[header]
  const headerSecret = Array.isArray(value) ? value[0] : value
  if (kind === 'api_key' && request.routeOptions.config?.ticketInQuery) {
    const query = (request.query ?? {}) as Record<string, unknown>
    if (query.api_key !== undefined) throw new DomainError('VALIDATION_ERROR', 'querystring.api_key: API keys are not taken in URLs; send X-API-Key, or get a single-use ticket from POST /api/v1/dashboard/stream-tickets and pass ?ticket=')
    if (headerSecret === undefined && typeof query.ticket === 'string') return ticketCaller(options.tickets, query.ticket)
  }
  const secret = headerSecret
  if (kind === 'admin' && !options.adminKey) throw new DomainError('FORBIDDEN', 'the admin API is disabled: set ADMIN_KEY to enable it')
  if (!secret) throw new DomainError('AUTH_REQUIRED', `missing ${headerName(header)} header`)
  switch (kind) {
    case 'admin':
      if (!sameSecret(secret, options.adminKey!)) throw new DomainError('AUTH_INVALID', `invalid ${headerName(header)}`)
      return { kind }
    case 'internal':
      if (!sameSecret(secret, options.internalToken)) throw new DomainError('AUTH_INVALID', `invalid ${headerName(header)}`)
      return { kind }
    case 'api_key':
    case 'sdk': {
      const hash = sha256(secret)
      const find = () => findCredential(options.db, hash)
      const credential = await (options.cached ? options.cached('customers', hash, find) : find())
      const wanted = kind === 'api_key' ? 'api_key' : 'sdk_token'
      const valid = credential !== undefined && timingSafeEqual(Buffer.from(credential.key_hash), Buffer.from(hash)) && credential.kind === wanted
      if (!valid) throw new DomainError('AUTH_INVALID', `invalid ${headerName(header)}`)
      if (credential.revoked_at) throw new DomainError('AUTH_INVALID', `this ${kind === 'api_key' ? 'API key' : 'SDK token'} was revoked`)
      if (credential.banned_at) throw new DomainError('FORBIDDEN', `device ${credential.key_id} is banned`)
      return { kind, keyId: credential.key_id, ...(credential.customer_id ? { customerId: credential.customer_id } : {}), ...(kind === 'api_key' ? { keyHash: hash } : {}) }
    }
  }
}

/** The caller a stream ticket stands for (consumed: a second use, or one after it expired, is 401). */
function ticketCaller(tickets: StreamTickets, ticket: string): Caller {
  const holder = tickets.consume(ticket)
  if (!holder) throw new DomainError('AUTH_INVALID', 'invalid stream ticket: unknown, expired or already used (get a new one from POST /api/v1/dashboard/stream-tickets)')
  return { kind: 'api_key', customerId: holder.customerId, keyId: holder.keyId, keyHash: holder.keyHash, ...(holder.projectId ? { ticketProjectId: holder.projectId } : {}) }
}

const headerName = (header: string) => header.replace(/(^|-)([a-z])/g, (_, dash: string, c: string) => dash + c.toUpperCase()).replace('Sdk', 'SDK').replace('Api', 'API')

/** The calling customer; routes with `auth: 'api_key'` always have one. */
export function customerOf(request: FastifyRequest): string {
  if (!request.caller.customerId) throw new DomainError('AUTH_REQUIRED', 'this route needs an API key')
  return request.caller.customerId
}
