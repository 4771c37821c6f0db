import { existsSync } from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import type { FastifyPluginAsync } from 'fastify'
import type { ZodTypeProvider } from 'fastify-type-provider-zod'
import * as tar from 'tar'
import { z } from 'zod'
import { DomainError } from '../domain/errors.js'
import { Capabilities, Hardware, INSTANCE_TYPES, PLATFORMS } from '../protocol/frames.js'
import { DEVICE_STATUSES, deviceStats, findDevice, listDevices } from '../projections/devices.js'
import { findModelFile } from '../projections/models.js'
import { customerOf } from './auth.js'
import { readYourWrites, type Services } from './context.js'
import { DeviceLogs, deviceLogs, LogsQuery } from './device-logs.js'
import { pageQuery } from './pagination.js'
import { pythonSdist } from './python-sdist.js'
import { page, Timestamp } from './responses.js'
import { deviceReputation } from '../projections/reputation.js'

const DeviceParams = z.object({ id: z.string().min(1).max(64) })
const SdkPackageQuery = z.object({ platform: z.enum(['nodejs', 'python']).default('nodejs') })

/** A device's ban or quarantine: null when it has none. */
export const Banned = z.object({ reason: z.string(), at: Timestamp }).nullable().describe('the ban: disconnected, refused until lifted; null when not banned')
export const Quarantined = z.object({ reason: z.string(), at: Timestamp }).nullable().describe('held back by the platform (e.g. its results failed validation): connected, given no work; null when not')
export const DeviceStatus = z.enum(DEVICE_STATUSES).describe('offline: not connected; busy: holds a task; idle: connected, holds none')
const Device = z.object({
  id: z.string(),
  status: DeviceStatus,
  platform: z.enum(PLATFORMS),
  sdk_version: z.string(),
  sdk_uuid: z.string().describe('the SDK installation; usage is reported per SDK UUID'),
  instance_type: z.enum(INSTANCE_TYPES).describe('as the platform asserts it (its enrollment token), not as the device claims'),
  hardware: Hardware,
  capabilities: Capabilities,
  running_tasks: z.number().int(),
  metrics: z.object({
    load: z.number().nullable().describe('from its last heartbeat; null before the first'),
    memory_used_mb: z.number().nullable(),
    power_watts: z.number().nullable().describe('its own estimate of its power draw'),
    heartbeats: z.number().int(),
  }),
  registered_at: Timestamp,
  last_seen_at: Timestamp,
  disconnect_reason: z.string().optional().describe('why it last disconnected; absent while connected'),
  enrollment_token_id: z.string().nullable().describe('the enrollment token it enrolled with (its contributor); null for the shared secret or open enrollment'),
  banned: Banned,
  quarantined: Quarantined,
})
const DeviceDetail = Device.extend({
  reputation: z.object({
    validated: z.number().int().describe('results validated: its run accepted or agreeing'),
    disputed: z.number().int().describe('results outvoted by other devices'),
    completed: z.number().int(),
    failed_elsewhere_ok: z.number().int().describe('its failed attempts of tasks that then completed on another device'),
  }).describe('since it was last released from quarantine'),
})
const DeviceStats = z.object({
  total: z.number().int(),
  idle: z.number().int(),
  busy: z.number().int(),
  offline: z.number().int(),
  by_platform: z.record(z.string(), z.number().int()).describe('devices per platform (those with any)'),
  by_instance_type: z.record(z.string(), z.number().int()).describe('devices per instance type (those with any)'),
  connections: z.number().int().describe('device sockets open on this node'),
})
/**
 * A download's body: a stream, which fastify sends as it is. Its route describes its bytes as a binary string
 * (for the OpenAPI document), so the type provider takes the body for a string.
 */
const fileBody = (stream: object) => stream as unknown as string
const Binary = (description: string) => z.string().meta({ format: 'binary' }).describe(description)
const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url))
/** What the SDK package holds: the worker and the protocol it speaks. */
const SDK_FILES = ['package.json', 'package-lock.json', '.npmrc', 'src/protocol', 'src/sdk', 'src/cli/args.ts', 'src/cli/worker.ts', 'docs/device-protocol.md']

/** `/devices` for customers (the fleet is shared: every customer sees it) and `/sdk` downloads for devices. */
export const deviceRoutes: FastifyPluginAsync<{ services: Services }> = async (base, { services }) => {
  const app = base.withTypeProvider<ZodTypeProvider>()
  const config = { auth: 'api_key' as const }

  app.get('/devices', {
    config: { ...config, links: { getDevice: { operationId: 'getDevice', parameters: { id: '$response.body#/devices/0/id' } } } },
    schema: {
      summary: 'List devices',
      operationId: 'listDevices',
      tags: ['devices'],
      querystring: pageQuery().extend({ status: z.enum(DEVICE_STATUSES).optional() }),
      response: { 200: page('devices', Device) },
    },
  }, async (request) => {
    const { devices, total } = await listDevices(services.db, request.query)
    return { devices, total, limit: request.query.limit, offset: request.query.offset }
  })

  app.get('/devices/stats', { config, schema: { summary: 'Device statistics', operationId: 'getDeviceStats', tags: ['devices'], response: { 200: DeviceStats } } }, async () => ({
    ...(await deviceStats(services.db)),
    connections: services.hub.connections,
  }))

  app.get('/devices/:id', {
    config: { ...config, links: { getDeviceLogs: { operationId: 'getDeviceLogs', parameters: { id: '$response.body#/id' } } } },
    schema: { summary: 'A device: hardware, capabilities, metrics', operationId: 'getDevice', tags: ['devices'], params: DeviceParams, response: { 200: DeviceDetail } },
  }, async (request) => {
    // read-your-writes: the device's latest outcomes and verdicts (a sync answer does not wait for the read models)
    await readYourWrites(services, await services.store.headPosition())
    const device = await findDevice(services.db, request.params.id)
    if (!device) throw new DomainError('NOT_FOUND', `device ${request.params.id} not found`)
    const reputation = await deviceReputation(services.db, request.params.id)
    return { ...device, reputation: { validated: reputation.validated, disputed: reputation.disputed, completed: reputation.completed, failed_elsewhere_ok: reputation.failedElsewhereOk } }
  })

  app.get('/devices/:id/logs', {
    config,
    schema: {
      summary: "Pull a device's recent log lines over its socket: only the lines about your own jobs, models, projects and datasets",
      operationId: 'getDeviceLogs',
      tags: ['devices'],
      params: DeviceParams,
      querystring: LogsQuery,
      response: { 200: DeviceLogs },
    },
  }, async (request) => {
    // read-your-writes: a job created just now owns the lines about it
    await readYourWrites(services, await services.store.headPosition())
    return deviceLogs(services, request.params.id, request.query, customerOf(request))
  })

  app.get('/sdk/models/:id', {
    config: { auth: 'sdk' },
    schema: {
      summary: 'Download a model file (for a device holding a task on it)',
      operationId: 'downloadModelFile',
      tags: ['sdk'],
      params: DeviceParams,
      response: { 200: { description: 'The model file; its checksum in X-Checksum', content: { 'application/octet-stream': { schema: Binary('the model file as uploaded') } } } },
    },
  }, async (request, reply) => {
    const deviceId = request.caller.keyId!
    const model = await findModelFile(services.db, request.params.id)
    if (!model) throw new DomainError('NOT_FOUND', `model ${request.params.id} not found`)
    if (!services.scheduler.holdsModel(deviceId, model.model_id) && !services.training.holdsModel(deviceId, model.model_id)) {
      throw new DomainError('FORBIDDEN', `device ${deviceId} holds no task and trains no job on model ${model.model_id}`)
    }
    const sha = model.checksum.replace(/^sha256:/, '')
    return reply
      .header('content-type', 'application/octet-stream')
      .header('content-length', String(model.size))
      .header('x-checksum', model.checksum)
      .send(fileBody(services.blobs.open(sha)))
  })

  app.get('/sdk/package', {
    config: { auth: 'sdk' },
    schema: {
      summary: 'Download the device SDK to install or update a device: the Node.js SDK (tar.gz), or with platform=python the Python SDK (an sdist for pip)',
      operationId: 'downloadSdkPackage',
      tags: ['sdk'],
      querystring: SdkPackageQuery,
      response: { 200: { description: 'The SDK package', content: { 'application/gzip': { schema: Binary('dcp-sdk-node.tgz, or dcp_device-<version>.tar.gz (platform=python)') } } } },
    },
  }, async (request, reply) => {
    if (request.query.platform === 'python') {
      const sdist = await pythonSdist(path.join(REPO_ROOT, 'sdk/python'))
      return reply.header('content-type', 'application/gzip').header('content-disposition', `attachment; filename="${sdist.fileName}"`).send(fileBody(sdist.bytes))
    }
    const files = SDK_FILES.filter((f) => existsSync(path.join(REPO_ROOT, f)))
    return reply
      .header('content-type', 'application/gzip')
      .header('content-disposition', 'attachment; filename="dcp-sdk-node.tgz"')
      .send(fileBody(tar.create({ gzip: true, cwd: REPO_ROOT, portable: true }, files)))
  })
}
