import type { FastifyPluginAsync } from 'fastify'
import type { ZodTypeProvider } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { enrollmentTokenDecider, enrollmentTokenStream } from '../domain/enrollment-token.js'
import { DomainError } from '../domain/errors.js'
import { INSTANCE_TYPES } from '../protocol/frames.js'
import { findDevice } from '../projections/devices.js'
import { listEnrollmentTokens } from '../projections/enrollment-tokens.js'
import { sha256 } from './auth.js'
import { execute, readYourWrites, type Services } from './context.js'
import { deviceLogs, LogsQuery } from './device-logs.js'
import { newId, newSecret } from './ids.js'
import { freeText } from './text.js'

export const ENROLLMENT_TOKEN_PREFIX = 'dcp_e_'

const TokenParams = z.object({ id: z.string().min(1).max(64) })
const DeviceParams = z.object({ id: z.string().min(1).max(64) })

/**
 * Operators' routes (`X-Admin-Key`) over who may be a device: enrollment tokens (what a contributor's devices
 * enroll with, and the instance type the platform asserts for them), bans, and releasing a quarantined device.
 */
export const deviceAdminRoutes: FastifyPluginAsync<{ services: Services }> = async (base, { services }) => {
  const app = base.withTypeProvider<ZodTypeProvider>()
  const config = { auth: 'admin' as const }

  app.post('/admin/enrollment-tokens', {
    config: { ...config, success: { 201: 'The token (shown once) and its settings' } },
    schema: {
      summary: 'Create an enrollment token for a contributor (the token is shown once)',
      tags: ['admin'],
      body: z.object({
        label: freeText(200),
        expires_at: z.iso.datetime({ offset: true }).optional().describe('ISO time after which no device enrolls with it (default: never)'),
        max_devices: z.number().int().min(1).max(1_000_000).optional().describe('devices it may enroll (default: no limit)'),
        instance_type: z.enum(INSTANCE_TYPES).default('user').describe('asserted for every device it enrolls; `aws` only for machines the platform runs (default user)'),
      }),
    },
  }, async (request, reply) => {
    const { label, expires_at, max_devices, instance_type } = request.body
    const at = services.now().toISOString()
    const expiresAt = expires_at === undefined ? null : new Date(expires_at).toISOString()
    if (expiresAt !== null && expiresAt <= at) throw new DomainError('VALIDATION_ERROR', 'body.expires_at: must be in the future')
    const token = newSecret(ENROLLMENT_TOKEN_PREFIX)
    const tokenId = newId('enr')
    const prefix = token.slice(0, ENROLLMENT_TOKEN_PREFIX.length + 6)
    const command = { type: 'CreateEnrollmentToken' as const, tokenId, label, prefix, tokenHash: sha256(token), instanceType: instance_type, expiresAt, maxDevices: max_devices ?? null, at }
    await execute(services, enrollmentTokenStream(tokenId), enrollmentTokenDecider, command, { metadata: { occurredAt: at } })
    return reply.status(201).send({ id: tokenId, label, prefix, instance_type, expires_at: expiresAt, max_devices: max_devices ?? null, created_at: at, enrollment_token: token })
  })

  app.get('/admin/enrollment-tokens', { config, schema: { summary: 'List enrollment tokens (never the tokens themselves)', tags: ['admin'] } }, async () => {
    const tokens = await listEnrollmentTokens(services.db)
    return { enrollment_tokens: tokens, total: tokens.length }
  })

  app.delete('/admin/enrollment-tokens/:id', {
    config: { ...config, success: { 204: 'Revoked; its devices are disconnected and cannot come back' } },
    schema: { summary: 'Revoke an enrollment token and cut off every device enrolled with it', tags: ['admin'], params: TokenParams },
  }, async (request, reply) => {
    const at = services.now().toISOString()
    const revoked = await execute(services, enrollmentTokenStream(request.params.id), enrollmentTokenDecider, { type: 'RevokeEnrollmentToken', at }, { metadata: { occurredAt: at } })
    const last = await services.hub.enrollmentRevoked(request.params.id, revoked.state.devices)
    if (last) await readYourWrites(services, last)
    return reply.status(204).send()
  })

  /** The device's ban and quarantine as GET /devices/:id shows them, once the read model has the change. */
  async function standing(deviceId: string) {
    const device = await findDevice(services.db, deviceId)
    if (!device) throw new DomainError('NOT_FOUND', `device ${deviceId} not found`)
    return { id: device.id, banned: device.banned, quarantined: device.quarantined }
  }

  app.get('/admin/devices/:id/logs', {
    config,
    schema: { summary: "Pull a device's recent log lines over its socket: every line, whoever's work it is about", tags: ['admin'], params: DeviceParams, querystring: LogsQuery },
  }, async (request) => deviceLogs(services, request.params.id, request.query, null))

  app.post('/admin/devices/:id/ban', {
    config,
    schema: {
      summary: 'Ban a device: disconnected at once, its tasks re-queued without using attempts, its SDK token refused, no reconnecting',
      tags: ['admin'],
      params: DeviceParams,
      body: z.object({ reason: freeText(500) }),
    },
  }, async (request) => {
    await readYourWrites(services, await services.hub.ban(request.params.id, request.body.reason))
    return standing(request.params.id)
  })

  app.delete('/admin/devices/:id/ban', {
    config,
    schema: { summary: 'Lift a ban: the device may connect again', tags: ['admin'], params: DeviceParams },
  }, async (request) => {
    await readYourWrites(services, await services.hub.unban(request.params.id))
    return standing(request.params.id)
  })

  app.post('/admin/devices/:id/release', {
    config,
    schema: { summary: 'Release a quarantined device: it takes work again', tags: ['admin'], params: DeviceParams },
  }, async (request) => {
    await readYourWrites(services, await services.hub.release(request.params.id))
    return standing(request.params.id)
  })
}
