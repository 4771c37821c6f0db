import { type ChildProcess, spawn } from 'node:child_process'
import { mkdir } from 'node:fs/promises'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { adaptersFromEnv } from '../adapters/config.js'
import { BlobCollector } from '../blobs/blob-gc.js'
import { BlobStore } from '../blobs/blob-store.js'
import { DEV_API_KEY, DEV_CUSTOMER_ID, ensureDevCustomer } from '../commands/dev-customer.js'
import { TaskScheduler } from '../commands/scheduler.js'
import { allReputations } from '../projections/reputation.js'
import { TrainingCoordinator } from '../commands/training.js'
import { PROJECT_ROOT, pythonRuntime, SETUP_HINT, TorchTool } from '../commands/torch-tool.js'
import { type Config, ConfigError, loadConfig } from '../config.js'
import { DeviceHub } from '../device-hub/hub.js'
import { handleCommand } from '../commands/handle-command.js'
import { enrollmentTokenDecider, enrollmentTokenStream } from '../domain/enrollment-token.js'
import { connectedDevices } from '../projections/devices.js'
import { enrollmentTokenIdByHash } from '../projections/enrollment-tokens.js'
import { buildApp } from '../http/app.js'
import { sha256 } from '../http/auth.js'
import { ENROLLMENT_TOKEN_PREFIX } from '../http/device-admin.js'
import { newId, newSecret } from '../http/ids.js'
import { ensureInternalToken } from '../internal-token.js'
import { openPlatform, type Platform } from '../platform.js'
import { parse, UsageError, wholeNumber } from './args.js'

const DCP_BIN = fileURLToPath(new URL('../../bin/dcp.js', import.meta.url))

/** `dcp start`: Postgres (embedded unless DATABASE_URL), migrations, projections, the API, the device hub, local workers. */
export async function startCommand(args: string[]): Promise<number> {
  const config = configFrom(args)
  // before anything starts: a missing environment is the user's next step, not a stack trace
  const devicePython = config.pythonWorkers > 0 ? localDevicePython(config) : undefined
  // Signals are caught from the start: one that comes while starting stops once start-up has finished.
  const signalled = new Promise<string>((resolve) => {
    process.once('SIGINT', () => resolve('SIGINT'))
    process.once('SIGTERM', () => resolve('SIGTERM'))
  })
  const platform = await openPlatform(config, { publish: true, log: (line) => config.logLevel === 'debug' && console.log(line) })
  platform.projections.start()
  // Serve only once the read models exist and have caught up with the log.
  await platform.projections.waitFor(await platform.store.headPosition(), 30 * 60_000)
  const blobs = new BlobStore(path.join(config.dataDir, 'blobs'))
  await blobs.init()
  const internalToken = await ensureInternalToken(config.dataDir)
  if (!config.production) {
    await platform.projections.waitFor(await ensureDevCustomer(platform.store, sha256(DEV_API_KEY), new Date().toISOString()), 60_000)
    console.log(`dcp: development mode: customer ${DEV_CUSTOMER_ID} with API key "${DEV_API_KEY}" (NODE_ENV=production or --production turns this off)`)
  }
  const log = (message: string) => console.error(`dcp: ${message}`)
  if (config.production && !config.enrollmentSecret) console.log('dcp: production: a new device needs an enrollment token (POST /api/v1/admin/enrollment-tokens); others are refused (no ENROLLMENT_SECRET)')
  const scheduler: TaskScheduler = new TaskScheduler({
    store: platform.store,
    db: platform.database.db,
    blobs,
    inlineInputsMaxBytes: config.payloadInlineMaxBytes,
    leaseTimeoutMs: config.leaseTimeoutMs,
    maxLeaseMs: config.maxLeaseMs,
    maxAttempts: config.maxTaskAttempts,
    prefetch: config.taskPrefetch,
    reputations: () => allReputations(platform.database.db),
    // the hub records the quarantine on the device's stream (and takes it out of training)
    quarantine: (deviceId, reason): Promise<void> => hub.quarantine(deviceId, reason),
    log,
  })
  await scheduler.recover()
  const torch = new TorchTool({ python: pythonRuntime({ DCP_PYTHON: config.python }), log })
  const training = new TrainingCoordinator({ store: platform.store, db: platform.database.db, blobs, torch, onMembership: (device, job) => scheduler.setTraining(device, job), log })
  await training.recover()
  const hub: DeviceHub = new DeviceHub({
    store: platform.store,
    scheduler,
    training,
    waitFor: (p) => platform.projections.waitFor(p),
    heartbeatIntervalMs: config.heartbeatIntervalMs,
    enrollmentSecret: config.enrollmentSecret,
    production: config.production,
    findEnrollmentToken: (hash) => enrollmentTokenIdByHash(platform.database.db, hash),
    limits: config.deviceLimits,
    log,
  })
  await hub.markAllOffline(await connectedDevices(platform.database.db))
  const collector = new BlobCollector({ blobs, store: platform.store, db: platform.database.db, waitFor: (p, ms) => platform.projections.waitFor(p, ms), graceMs: config.blobGc.graceMs, log })
  const app = await buildApp({
    blobCollector: collector,
    store: platform.store,
    projections: platform.projections,
    db: platform.database.db,
    blobs,
    hub,
    scheduler,
    training,
    adapters: adaptersFromEnv(process.env),
    internalToken,
    adminKey: config.adminKey,
    maxModelBytes: config.maxModelBytes,
    maxQueuedInputs: config.maxQueuedInputs,
    maxQueuedBytes: config.maxQueuedBytes,
    uploads: config.uploads,
    maxStorageBytes: config.maxStorageBytes,
    maxQueuedBytesPerCustomer: config.maxQueuedBytesPerCustomer,
    validationSpotRate: config.validationSpotRate,
    prices: config.prices,
    rateLimit: config.rateLimit,
    authFailures: config.authFailures,
    maxStreamsPerCustomer: config.maxStreamsPerCustomer,
    logLevel: config.logLevel,
  })
  try {
    await app.listen({ port: config.port, host: config.host })
  } catch (error) {
    await platform.close()
    throw new UsageError(`cannot listen on ${config.host}:${config.port}: ${(error as Error).message}`)
  }
  const address = app.server.address()
  const port = typeof address === 'object' && address ? address.port : config.port
  console.log(`dcp listening on http://localhost:${port}/api/v1 (Postgres: ${platform.postgres}, data: ${config.dataDir})`)
  if (config.blobGc.intervalMs > 0) collector.start(config.blobGc.intervalMs)
  const local = config.workers + config.pythonWorkers
  const token = local > 0 ? await localWorkerToken(platform, local) : undefined
  const workers = [...await startWorkers(config, port, token), ...await startPythonWorkers(config, devicePython, port, token)]

  const signal = await signalled
  console.log(`dcp: ${signal}, shutting down`)
  await Promise.all(workers.map(stopWorker))
  await collector.stop()
  await hub.close()
  await training.stop()
  scheduler.stop()
  await app.close()
  await platform.close()
  return 0
}

function configFrom(args: string[]): Config {
  const { values, positionals } = parse(args, {
    port: { type: 'string' },
    host: { type: 'string' },
    'data-dir': { type: 'string' },
    production: { type: 'boolean' },
    workers: { type: 'string' },
    'python-workers': { type: 'string' },
  })
  if (positionals.length > 0) throw new UsageError(`dcp start takes no arguments, got ${positionals.join(' ')}`)
  const port = wholeNumber('port', values.port, 0, 65535)
  const workers = wholeNumber('workers', values.workers, 0, 64)
  const pythonWorkers = wholeNumber('python-workers', values['python-workers'], 0, 64)
  return loadConfig(process.env, {
    ...(port !== undefined ? { port } : {}),
    ...(workers !== undefined ? { workers } : {}),
    ...(pythonWorkers !== undefined ? { pythonWorkers } : {}),
    ...(values.host ? { host: String(values.host) } : {}),
    ...(values['data-dir'] ? { dataDir: path.resolve(String(values['data-dir'])) } : {}),
    ...(values.production ? { production: true } : {}),
  })
}

/**
 * An `aws` enrollment token for this start's local workers (machines the platform runs): for as many devices
 * as workers, valid ten minutes (a worker that enrolled keeps its identity in its state dir and comes back
 * without it). Handed to them in their environment, never printed.
 */
async function localWorkerToken(platform: Platform, workers: number): Promise<string> {
  const token = newSecret(ENROLLMENT_TOKEN_PREFIX)
  const tokenId = newId('enr')
  const now = new Date()
  const at = now.toISOString()
  const created = await handleCommand(platform.store, enrollmentTokenStream(tokenId), enrollmentTokenDecider, {
    type: 'CreateEnrollmentToken',
    tokenId,
    label: `dcp start local workers (${at})`,
    prefix: token.slice(0, ENROLLMENT_TOKEN_PREFIX.length + 6),
    tokenHash: sha256(token),
    instanceType: 'aws',
    expiresAt: new Date(now.getTime() + 10 * 60_000).toISOString(),
    maxDevices: workers,
    at,
  }, { metadata: { occurredAt: at } })
  await platform.projections.waitFor(created.position, 60_000)
  return token
}

/** Local worker processes, connected over real sockets like any device; each keeps its identity in `<data>/workers/<n>`. */
async function startWorkers(config: Config, port: number, enrollmentToken: string | undefined): Promise<ChildProcess[]> {
  const workers: ChildProcess[] = []
  for (let i = 1; i <= config.workers; i++) {
    const stateDir = path.join(config.dataDir, 'workers', String(i))
    await mkdir(stateDir, { recursive: true })
    const args = [DCP_BIN, 'worker', '--server', `http://127.0.0.1:${port}`, '--state-dir', stateDir, '--instance-type', 'aws']
    const env = { ...process.env, ...(enrollmentToken ? { DCP_ENROLLMENT_TOKEN: enrollmentToken } : {}) }
    // the IPC channel is how a worker learns that this process died (see src/cli/worker.ts). Its own
    // process group: a Ctrl-C in the terminal reaches this process only, which asks each worker once to
    // drain (a second signal, from the terminal, made it stop at once without draining)
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], env, detached: true })
    workers.push(child)
  }
  if (workers.length > 0) console.log(`dcp: started ${workers.length} local worker${workers.length === 1 ? '' : 's'} (--workers 0 for none)`)
  return workers
}

/** The Python local devices run with: DCP_PYTHON, else the managed environment's; a ConfigError saying how to get one. */
function localDevicePython(config: Config): string {
  const python = pythonRuntime({ DCP_PYTHON: config.python })
  if (python) return python
  const which = config.python ? `DCP_PYTHON (${config.python}) does not exist` : 'there is no .dcp/python'
  throw new ConfigError(`--python-workers needs a Python with the device's packages, and ${which}: ${SETUP_HINT}`)
}

/**
 * Local Python devices (`python -m dcp_device`, sdk/python), each with its identity in
 * `<data>/python-workers/<n>`, enrolled with the same `aws` token as the Node workers. The package runs from
 * this checkout's sources (PYTHONPATH), so DCP_PYTHON needs only its dependencies. Their own process group,
 * like the Node workers: Ctrl-C reaches this process, which asks each once to drain.
 */
async function startPythonWorkers(config: Config, python: string | undefined, port: number, enrollmentToken: string | undefined): Promise<ChildProcess[]> {
  if (!python || config.pythonWorkers === 0) return []
  const sources = path.join(PROJECT_ROOT, 'sdk', 'python')
  const pythonPath = [sources, process.env.PYTHONPATH].filter(Boolean).join(path.delimiter)
  // stdin a pipe from this process: when it dies, even by SIGKILL, the pipe closes and the device stops
  // (DCP_DEVICE_PARENT_PIPE, sdk/python/dcp_device/__main__.py) instead of reconnecting to nothing forever
  const env = { ...process.env, PYTHONPATH: pythonPath, DCP_DEVICE_PARENT_PIPE: '1', ...(enrollmentToken ? { DCP_ENROLLMENT_TOKEN: enrollmentToken } : {}) }
  const workers: ChildProcess[] = []
  for (let i = 1; i <= config.pythonWorkers; i++) {
    const stateDir = path.join(config.dataDir, 'python-workers', String(i))
    await mkdir(stateDir, { recursive: true })
    const args = ['-m', 'dcp_device', '--server', `ws://127.0.0.1:${port}`, '--state-dir', stateDir, '--instance-type', 'aws']
    const child = spawn(python, args, { stdio: ['pipe', 'inherit', 'inherit'], env, detached: true })
    child.on('error', (error) => console.error(`dcp: python worker ${i} (${python}): ${error.message}`))
    workers.push(child)
  }
  console.log(`dcp: started ${workers.length} local Python device${workers.length === 1 ? '' : 's'} with ${python}`)
  return workers
}

/** Asks a worker to drain (SIGTERM), and kills it if it takes more than 10 s. */
function stopWorker(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve()
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000)
    child.once('exit', () => {
      clearTimeout(timer)
      resolve()
    })
    child.kill('SIGTERM')
  })
}
