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
import { DeviceLogs, deviceLogs, LogsQuery } from './device-logs.js'
import { Banned, Quarantined } from './devices.js'
import { newId, newSecret } from './ids.js'
import { NullableTimestamp, Timestamp } from './responses.js'
import { freeText } from './text.js'

export const ENROLLMENT_TOKEN_PREFIX = 'dcp_e_'

const TokenParams = z.object({ id: z.string().min(1).max(64) })
const DeviceParams = z.object({ id: z.string().min(1).max(64) })

const TokenSettings = {
  id: z.string(),
  label: z.string(),
  prefix: z.string().describe('the first characters of the token, to tell tokens apart'),
  instance_type: z.enum(INSTANCE_TYPES).describe('asserted for every device it enrolls'),
  expires_at: NullableTimestamp.describe('after this no device enrolls with it; null: never'),
  max_devices: z.number().int().nullable().describe('devices it may enroll; null: no limit'),
  created_at: Timestamp,
}
const NewToken = z.object({ ...TokenSettings, enrollment_token: z.string().describe('the token itself (`dcp_e_...`), for the devices to enroll with: shown this once, never again') })
const Tokens = z.object({
  enrollment_tokens: z.array(z.object({ ...TokenSettings, devices: z.number().int().describe('devices enrolled with it'), revoked: z.boolean(), revoked_at: NullableTimestamp })),
  total: z.number().int(),
})
/** A device's standing after a ban, an unban or a release, as GET /devices/:id shows it. */
const Standing = z.object({ id: z.string(), banned: Banned, quarantined: Quarantined })
const standingLinks = { getDevice: { operationId: 'getDevice', parameters: { id: '$response.body#/id' } } }

/**
 * Operators' routes (`X-Admin-Key`) over who may be a device: enrollment tokens (what a contributor's devices
 * enroll with, and the instance type the platform asserts for them), bans, and releasing a quarantined device.
 */
export const deviceAdminRoutes: FastifyPluginAsync<{ services: Services }> = async (base, { services }) => {
  const app = base.withTypeProvider<ZodTypeProvider>()
  const config = { auth: 'admin' as const }

  app.post('/admin/enrollment-tokens', {
    config: { ...config, success: { 201: 'The token (shown once) and its settings' }, links: { revokeEnrollmentToken: { operationId: 'revokeEnrollmentToken', parameters: { id: '$response.body#/id' } } } },
    schema: {
      summary: 'Create an enrollment token for a contributor (the token is shown once)',
      operationId: 'createEnrollmentToken',
      tags: ['admin'],
      response: { 201: NewToken },
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

  app.get('/admin/enrollment-tokens', { config, schema: { summary: 'List enrollment tokens (never the tokens themselves)', operationId: 'listEnrollmentTokens', tags: ['admin'], response: { 200: Tokens } } }, async () => {
    const tokens = await listEnrollmentTokens(services.db)
    return { enrollment_tokens: tokens, total: tokens.length }
  })

  app.delete('/admin/enrollment-tokens/:id', {
    config: { ...config, success: { 204: 'Revoked; its devices are disconnected and cannot come back' } },
    schema: { summary: 'Revoke an enrollment token and cut off every device enrolled with it', operationId: 'revokeEnrollmentToken', tags: ['admin'], params: TokenParams },
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
    schema: { summary: "Pull a device's recent log lines over its socket: every line, whoever's work it is about", operationId: 'getDeviceLogsAsAdmin', tags: ['admin'], params: DeviceParams, querystring: LogsQuery, response: { 200: DeviceLogs } },
  }, async (request) => deviceLogs(services, request.params.id, request.query, null))

  app.post('/admin/devices/:id/ban', {
    config: { ...config, links: { ...standingLinks, unbanDevice: { operationId: 'unbanDevice', parameters: { id: '$response.body#/id' } } } },
    schema: {
      summary: 'Ban a device: disconnected at once, its tasks re-queued without using attempts, its SDK token refused, no reconnecting',
      operationId: 'banDevice',
      tags: ['admin'],
      params: DeviceParams,
      response: { 200: Standing },
      body: z.object({ reason: freeText(500) }),
    },
  }, async (request) => {
    await readYourWrites(services, await services.hub.ban(request.params.id, request.body.reason))
    return standing(request.params.id)
  })

  app.delete('/admin/devices/:id/ban', {
    config: { ...config, links: standingLinks },
    schema: { summary: 'Lift a ban: the device may connect again', operationId: 'unbanDevice', tags: ['admin'], params: DeviceParams, response: { 200: Standing } },
  }, async (request) => {
    await readYourWrites(services, await services.hub.unban(request.params.id))
    return standing(request.params.id)
  })

  app.post('/admin/devices/:id/release', {
    config: { ...config, links: standingLinks },
    schema: { summary: 'Release a quarantined device: it takes work again', operationId: 'releaseDevice', tags: ['admin'], params: DeviceParams, response: { 200: Standing } },
  }, async (request) => {
    await readYourWrites(services, await services.hub.release(request.params.id))
    return standing(request.params.id)
  })
}
