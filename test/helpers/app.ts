import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import type { FastifyInstance } from 'fastify'
import type { Test } from 'tap'
import { BlobStore } from '../../src/blobs/blob-store.js'
import { TaskScheduler } from '../../src/commands/scheduler.js'
import { TrainingCoordinator } from '../../src/commands/training.js'
import { DeviceHub } from '../../src/device-hub/hub.js'
import type { HubLimits } from '../../src/device-hub/limits.js'
import { START } from '../../src/event-store/port.js'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import { type AppDeps, buildApp } from '../../src/http/app.js'
import type { Database } from '../../src/postgres/database.js'
import { enrollmentTokenIdByHash } from '../../src/projections/enrollment-tokens.js'
import { Projections } from '../../src/projections/projections.js'
import { allReputations } from '../../src/projections/reputation.js'
import { freshDatabase } from './database.js'
import { SimDevice } from './device.js'

export const ADMIN_KEY = 'admin-secret-for-the-tests'
export const INTERNAL_TOKEN = 'internal-token-for-the-tests-0123456789'

export interface TestApp {
  app: FastifyInstance
  hub: DeviceHub
  scheduler: TaskScheduler
  training: TrainingCoordinator
  database: Database
  store: PostgresEventStore
  projections: Projections
  blobs: BlobStore
  /** Creates a customer through the admin API and returns its id and API key. */
  customer(name?: string): Promise<{ id: string; key: string; keyId: string }>
  /** Creates an enrollment token through the admin API (default: an `aws` one, for machines the platform runs). */
  enrollmentToken(body?: { label?: string; instance_type?: 'aws' | 'user'; max_devices?: number; expires_at?: string }): Promise<{ id: string; token: string }>
}

/** The whole HTTP API on a fresh database, with every projection running; torn down with the test. */
export async function testApp(t: Test, overrides: Partial<AppDeps> = {}, options: { heartbeatIntervalMs?: number; leaseTimeoutMs?: number; enrollmentSecret?: string; roundDeadlineMs?: number; prefetch?: number; production?: boolean; limits?: Partial<HubLimits>; maxLeaseMs?: number; inlineInputsMaxBytes?: number } = {}): Promise<TestApp> {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  const projections = new Projections({ db: database.db, store, retryMs: 50 })
  projections.start()
  const dir = await mkdtemp(path.join(tmpdir(), 'dcp-blobs-'))
  const blobs = new BlobStore(dir)
  await blobs.init()
  await projections.waitFor(START)
  const scheduler: TaskScheduler = new TaskScheduler({
    store,
    db: database.db,
    blobs,
    ...(options.inlineInputsMaxBytes ? { inlineInputsMaxBytes: options.inlineInputsMaxBytes } : {}),
    leaseTimeoutMs: options.leaseTimeoutMs ?? 2000,
    maxAttempts: 3,
    ...(options.prefetch ? { prefetch: options.prefetch } : {}),
    ...(options.maxLeaseMs ? { maxLeaseMs: options.maxLeaseMs } : {}),
    reputations: () => allReputations(database.db),
    quarantine: (deviceId, reason): Promise<void> => hub.quarantine(deviceId, reason),
  })
  await scheduler.recover()
  const training = new TrainingCoordinator({ store, db: database.db, blobs, onMembership: (device, job) => scheduler.setTraining(device, job), roundDeadlineMs: options.roundDeadlineMs ?? 5000 })
  await training.recover()
  const hub: DeviceHub = new DeviceHub({
    store,
    scheduler,
    training,
    waitFor: (p) => projections.waitFor(p),
    heartbeatIntervalMs: options.heartbeatIntervalMs ?? 500,
    enrollmentSecret: options.enrollmentSecret,
    findEnrollmentToken: (hash) => enrollmentTokenIdByHash(database.db, hash),
    ...(options.production ? { production: true } : {}),
    ...(options.limits ? { limits: options.limits } : {}),
  })
  const app = await buildApp({ store, projections, db: database.db, blobs, hub, scheduler, training, adminKey: ADMIN_KEY, internalToken: INTERNAL_TOKEN, logLevel: 'silent', authFailures: { max: 1_000_000, windowMs: 60_000 }, ...overrides })
  t.teardown(async () => {
    await hub.close()
    await training.stop()
    scheduler.stop()
    await app.close()
    await projections.stop()
    await store.close()
    await rm(dir, { recursive: true, force: true })
  })
  let n = 0
  return {
    app,
    hub,
    scheduler,
    training,
    database,
    store,
    projections,
    blobs,
    async customer(name = `customer ${++n}`) {
      const response = await app.inject({ method: 'POST', url: '/api/v1/admin/customers', headers: { 'x-admin-key': ADMIN_KEY }, payload: { name } })
      if (response.statusCode !== 201) throw new Error(`creating a customer failed: ${response.statusCode} ${response.body}`)
      const body = response.json() as { id: string; api_key: string; key_id: string }
      return { id: body.id, key: body.api_key, keyId: body.key_id }
    },
    async enrollmentToken(body = {}) {
      const payload = { label: 'test devices', instance_type: 'aws', ...body }
      const response = await app.inject({ method: 'POST', url: '/api/v1/admin/enrollment-tokens', headers: { 'x-admin-key': ADMIN_KEY }, payload })
      if (response.statusCode !== 201) throw new Error(`creating an enrollment token failed: ${response.statusCode} ${response.body}`)
      const created = response.json() as { id: string; enrollment_token: string }
      return { id: created.id, token: created.enrollment_token }
    },
  }
}

/** A multipart/form-data body: fields and at most one file. */
export function multipart(fields: Record<string, string>, file?: { field?: string; name: string; content: Buffer }) {
  const boundary = `----dcp${Math.random().toString(16).slice(2)}`
  const parts: Buffer[] = []
  for (const [name, value] of Object.entries(fields)) {
    parts.push(Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="${name}"\r\n\r\n${value}\r\n`))
  }
  if (file) {
    parts.push(Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="${file.field ?? 'model'}"; filename="${file.name}"\r\nContent-Type: application/octet-stream\r\n\r\n`))
    parts.push(file.content, Buffer.from('\r\n'))
  }
  parts.push(Buffer.from(`--${boundary}--\r\n`))
  return { payload: Buffer.concat(parts), headers: { 'content-type': `multipart/form-data; boundary=${boundary}` } }
}

/**
 * A test app listening on a real socket, a first customer (`alice`), `connect` for simulated devices (real
 * WebSockets speaking the protocol by hand, killed when the test ends), `api` (a JSON request over the socket
 * as alice: status and parsed body) and `upload` (a model file as alice; throws unless 201).
 */
export async function listeningApp(t: Test, overrides: Partial<AppDeps> = {}, options: Parameters<typeof testApp>[2] = {}) {
  const context = await testApp(t, overrides, options)
  const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
  const alice = await context.customer()
  const devices: SimDevice[] = []
  t.teardown(() => devices.forEach((d) => d.kill()))
  const connect = async () => {
    const d = await SimDevice.connect(url)
    devices.push(d)
    return d
  }
  const api = async (method: string, route: string, payload?: unknown) => {
    const response = await fetch(`${url}/api/v1${route}`, { method, headers: { 'x-api-key': alice.key, ...(payload ? { 'content-type': 'application/json' } : {}) }, ...(payload ? { body: JSON.stringify(payload) } : {}) })
    return { status: response.status, body: (await response.json()) as any }
  }
  const upload = async (name: string, content: Buffer) => {
    const form = multipart({ name }, { name, content })
    const response = await context.app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...form.headers, 'x-api-key': alice.key }, payload: form.payload })
    if (response.statusCode !== 201) throw new Error(`upload failed: ${response.statusCode} ${response.body}`)
    return response.json() as { id: string; checksum: string; format: string }
  }
  return { ...context, url, alice, connect, api, upload }
}
