import { existsSync } from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import type { FastifyPluginAsync } from 'fastify'
import type { ZodTypeProvider } from 'fastify-type-provider-zod'
import * as tar from 'tar'
import { z } from 'zod'
import { DomainError } from '../domain/errors.js'
import { DEVICE_STATUSES, deviceStats, findDevice, listDevices } from '../projections/devices.js'
import { findModelFile } from '../projections/models.js'
import { customerOf } from './auth.js'
import { readYourWrites, type Services } from './context.js'
import { deviceLogs, LogsQuery } from './device-logs.js'
import { pageQuery } from './pagination.js'
import { pythonSdist } from './python-sdist.js'
import { deviceReputation } from '../projections/reputation.js'

const DeviceParams = z.object({ id: z.string().min(1).max(64) })
const SdkPackageQuery = z.object({ platform: z.enum(['nodejs', 'python']).default('nodejs') })
const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url))
/** What the SDK package holds: the worker and the protocol it speaks. */
const SDK_FILES = ['package.json', 'package-lock.json', '.npmrc', 'src/protocol', 'src/sdk', 'src/cli/args.ts', 'src/cli/worker.ts', 'docs/device-protocol.md']

/** `/devices` for customers (the fleet is shared: every customer sees it) and `/sdk` downloads for devices. */
export const deviceRoutes: FastifyPluginAsync<{ services: Services }> = async (base, { services }) => {
  const app = base.withTypeProvider<ZodTypeProvider>()
  const config = { auth: 'api_key' as const }

  app.get('/devices', {
    config,
    schema: {
      summary: 'List devices',
      tags: ['devices'],
      querystring: pageQuery().extend({ status: z.enum(DEVICE_STATUSES).optional() }),
    },
  }, async (request) => {
    const { devices, total } = await listDevices(services.db, request.query)
    return { devices, total, limit: request.query.limit, offset: request.query.offset }
  })

  app.get('/devices/stats', { config, schema: { summary: 'Device statistics', tags: ['devices'] } }, async () => ({
    ...(await deviceStats(services.db)),
    connections: services.hub.connections,
  }))

  app.get('/devices/:id', { config, schema: { summary: 'A device: hardware, capabilities, metrics', tags: ['devices'], params: DeviceParams } }, async (request) => {
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
      tags: ['devices'],
      params: DeviceParams,
      querystring: LogsQuery,
    },
  }, async (request) => {
    // read-your-writes: a job created just now owns the lines about it
    await readYourWrites(services, await services.store.headPosition())
    return deviceLogs(services, request.params.id, request.query, customerOf(request))
  })

  app.get('/sdk/models/:id', {
    config: { auth: 'sdk' },
    schema: { summary: 'Download a model file (for a device holding a task on it)', tags: ['sdk'], params: DeviceParams },
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
      .send(services.blobs.open(sha))
  })

  app.get('/sdk/package', {
    config: { auth: 'sdk' },
    schema: {
      summary: 'Download the device SDK to install or update a device: the Node.js SDK (tar.gz), or with platform=python the Python SDK (an sdist for pip)',
      tags: ['sdk'],
      querystring: SdkPackageQuery,
    },
  }, async (request, reply) => {
    if (request.query.platform === 'python') {
      const sdist = await pythonSdist(path.join(REPO_ROOT, 'sdk/python'))
      return reply.header('content-type', 'application/gzip').header('content-disposition', `attachment; filename="${sdist.fileName}"`).send(sdist.bytes)
    }
    const files = SDK_FILES.filter((f) => existsSync(path.join(REPO_ROOT, f)))
    return reply
      .header('content-type', 'application/gzip')
      .header('content-disposition', 'attachment; filename="dcp-sdk-node.tgz"')
      .send(tar.create({ gzip: true, cwd: REPO_ROOT, portable: true }, files))
  })
}
