import path from 'node:path'
import { z } from 'zod'
import { readAdapterSettings } from './adapters/config.js'
import { BLOB_GC_DEFAULTS } from './blobs/blob-gc.js'
import { TASK_INPUTS_DEFAULTS } from './commands/task-inputs.js'
import { DEFAULT_PRICES, PriceTable } from './domain/pricing.js'

/** Every setting dcp reads from the environment, with its default. The README lists them. */
const Env = z.object({
  PORT: z.coerce.number().int().min(0).max(65535).default(3000),
  HOST: z.string().min(1).default('0.0.0.0'),
  /** Where dcp keeps its files: the embedded Postgres (`pg/`), blobs, the internal token. */
  DATA_DIR: z.string().min(1).default('data'),
  /** A Postgres server to use instead of the embedded one (read models, and the log unless EVENTSTORE_URL). */
  DATABASE_URL: z.string().url().optional(),
  /** An EventStoreDB server for the log (e.g. `esdb://localhost:2113?tls=false`). */
  EVENTSTORE_URL: z.string().min(1).optional(),
  NODE_ENV: z.enum(['development', 'production', 'test']).default('development'),
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  /** Secret for the admin API (`X-Admin-Key`); without it the admin routes refuse every request. */
  ADMIN_KEY: z.string().min(16, 'must be at least 16 characters').optional(),
  /** Largest model upload in bytes. */
  MAX_MODEL_BYTES: z.coerce.number().int().positive().default(256 * 1024 * 1024),
  /** Requests per API key (or per address without one) per window. */
  RATE_LIMIT_MAX: z.coerce.number().int().positive().default(1000),
  RATE_LIMIT_WINDOW_MS: z.coerce.number().int().positive().default(60_000),
  /** Failed authentications an address may make per rate-limit window; past it, 429 before any lookup. */
  AUTH_FAILURE_MAX: z.coerce.number().int().positive().default(30),
  /** Live project streams one customer may hold open at once (per node); more get 429 RATE_LIMITED. */
  MAX_STREAMS_PER_CUSTOMER: z.coerce.number().int().min(1).max(10_000).default(20),
  /** Devices heartbeat this often; three missed heartbeats mark a device offline. */
  HEARTBEAT_INTERVAL_MS: z.coerce.number().int().min(100).default(5000),
  /** A task lease ends this long after it was granted or last listed in a heartbeat. */
  LEASE_TIMEOUT_MS: z.coerce.number().int().min(100).default(30_000),
  /** Inputs that may wait for a device before new inference is refused with QUEUE_FULL. */
  MAX_QUEUED_INPUTS: z.coerce.number().int().min(1).default(1_000_000),
  /** Bytes of input values (4 a value) that may wait for a device, in all and per customer. */
  MAX_QUEUED_BYTES: z.coerce.number().int().min(1024).default(1024 ** 3),
  /** Model and dataset uploads in progress at once, in all and per customer. */
  MAX_UPLOADS: z.coerce.number().int().min(1).default(4),
  /** Bytes a customer's models and datasets may take together. */
  MAX_STORAGE_BYTES_PER_CUSTOMER: z.coerce.number().int().min(1).default(10 * 1024 ** 3),
  MAX_UPLOADS_PER_CUSTOMER: z.coerce.number().int().min(1).default(2),
  MAX_QUEUED_BYTES_PER_CUSTOMER: z.coerce.number().int().min(1024).default(256 * 1024 ** 2),
  /** Attempts before a task fails for good. */
  MAX_TASK_ATTEMPTS: z.coerce.number().int().min(1).max(100).default(3),
  TASK_PREFETCH: z.coerce.number().int().min(1).max(64).default(4),
  /** Longest a task lease lives whatever the heartbeats (default 10 × LEASE_TIMEOUT_MS). */
  MAX_LEASE_MS: z.coerce.number().int().min(100).optional(),
  /** Share of a contributed device's tasks that `validation: spot` runs again. */
  VALIDATION_SPOT_RATE: z.coerce.number().min(0).max(1).default(0.05),
  /** Secret a new `user` device may present to register instead of an enrollment token; without it, enrollment without a token is open in development and closed in production. */
  ENROLLMENT_SECRET: z.string().min(8).optional(),
  /** Heartbeats a device may send per heartbeat interval; more are dropped (docs/device-protocol.md §4.4). */
  DEVICE_HEARTBEATS_PER_INTERVAL: z.coerce.number().int().min(1).max(1000).default(5),
  /** Frames of any kind a device may send per second; more close its socket with 4429. */
  DEVICE_MAX_FRAMES_PER_SECOND: z.coerce.number().int().min(10).max(1_000_000).default(5000),
  /** The price table for estimated costs, as JSON (see src/domain/pricing.ts); default DEFAULT_PRICES. */
  PRICE_TABLE: z.string().optional(),
  /** A blob (model, dataset, weights) or unfinished upload younger than this, or released more recently, is never collected (default 24 h). */
  BLOB_GC_GRACE_MS: z.coerce.number().int().min(600_000).default(BLOB_GC_DEFAULTS.graceMs),
  /** How often unreferenced blobs are collected; 0: never (default 1 h). */
  BLOB_GC_INTERVAL_MS: z.coerce.number().int().min(0).default(BLOB_GC_DEFAULTS.intervalMs),
  /** A task's inputs (or a result's outputs) whose JSON is larger than this go to the blob store, their TaskQueued (TaskCompleted) event carrying the hash (default 64 KiB). */
  PAYLOAD_INLINE_MAX_BYTES: z.coerce.number().int().min(1024).max(512 * 1024).default(TASK_INPUTS_DEFAULTS.inlineMaxBytes),
  /** Local worker processes `dcp start` runs beside the server. */
  WORKERS: z.coerce.number().int().min(0).max(64).default(2),
  /** Local Python devices (`python -m dcp_device` from the managed environment or DCP_PYTHON) `dcp start` runs beside the server (default 0). */
  PYTHON_WORKERS: z.coerce.number().int().min(0).max(64).default(0),
  /** The Python (with torch and numpy) that checks TorchScript training jobs; default: `.dcp/python/bin/python` when it exists. */
  DCP_PYTHON: z.string().min(1).optional(),
})

export interface Config {
  port: number
  host: string
  dataDir: string
  databaseUrl: string | undefined
  eventStoreUrl: string | undefined
  production: boolean
  logLevel: z.infer<typeof Env>['LOG_LEVEL']
  adminKey: string | undefined
  maxModelBytes: number
  rateLimit: { max: number; windowMs: number }
  authFailures: { max: number; windowMs: number }
  maxStreamsPerCustomer: number
  heartbeatIntervalMs: number
  leaseTimeoutMs: number
  /** Longest a lease lives whatever the heartbeats. */
  maxLeaseMs: number
  validationSpotRate: number
  maxTaskAttempts: number
  /** Tasks a device may hold per task it runs at once (TaskScheduler `prefetch`). */
  taskPrefetch: number
  maxQueuedInputs: number
  maxQueuedBytes: number
  uploads: { total: number; perCustomer: number }
  maxStorageBytes: number
  maxQueuedBytesPerCustomer: number
  prices: PriceTable
  enrollmentSecret: string | undefined
  /** The hub's per-device frame limits (the rest keep HUB_LIMITS' defaults). */
  deviceLimits: { heartbeatsPerInterval: number; maxFramesPerSecond: number }
  workers: number
  /** Local Python devices `dcp start` runs (PYTHON_WORKERS, --python-workers; default 0). */
  pythonWorkers: number
  /** DCP_PYTHON: the Python for TorchScript training (unset: the managed environment's, if any). */
  python: string | undefined
  blobGc: { graceMs: number; intervalMs: number }
  /** Task inputs and outputs above this many bytes of JSON are kept out of their event, in the blob store. */
  payloadInlineMaxBytes: number
}

export class ConfigError extends Error {}

function parsePrices(text: string | undefined): PriceTable {
  if (text === undefined) return DEFAULT_PRICES
  let json: unknown
  try {
    json = JSON.parse(text)
  } catch {
    throw new ConfigError('invalid environment variable PRICE_TABLE: not JSON')
  }
  const parsed = PriceTable.safeParse(json)
  if (!parsed.success) throw new ConfigError(`invalid environment variable PRICE_TABLE: ${z.prettifyError(parsed.error).replaceAll('\n', ' ')}`)
  return parsed.data
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env, overrides: Partial<Config> = {}): Config {
  const parsed = Env.safeParse(Object.fromEntries(Object.entries(env).filter(([, v]) => v !== '')))
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!
    throw new ConfigError(`invalid environment variable ${issue.path.join('.')}: ${issue.message}`)
  }
  const e = parsed.data
  try {
    readAdapterSettings(env)
  } catch (error) {
    throw new ConfigError((error as Error).message)
  }
  return {
    python: e.DCP_PYTHON,
    port: e.PORT,
    host: e.HOST,
    dataDir: path.resolve(e.DATA_DIR),
    databaseUrl: e.DATABASE_URL,
    eventStoreUrl: e.EVENTSTORE_URL,
    production: e.NODE_ENV === 'production',
    logLevel: e.LOG_LEVEL,
    adminKey: e.ADMIN_KEY,
    maxModelBytes: e.MAX_MODEL_BYTES,
    rateLimit: { max: e.RATE_LIMIT_MAX, windowMs: e.RATE_LIMIT_WINDOW_MS },
    authFailures: { max: e.AUTH_FAILURE_MAX, windowMs: e.RATE_LIMIT_WINDOW_MS },
    maxStreamsPerCustomer: e.MAX_STREAMS_PER_CUSTOMER,
    heartbeatIntervalMs: e.HEARTBEAT_INTERVAL_MS,
    leaseTimeoutMs: e.LEASE_TIMEOUT_MS,
    maxLeaseMs: e.MAX_LEASE_MS ?? 10 * e.LEASE_TIMEOUT_MS,
    validationSpotRate: e.VALIDATION_SPOT_RATE,
    maxTaskAttempts: e.MAX_TASK_ATTEMPTS,
    taskPrefetch: e.TASK_PREFETCH,
    maxQueuedInputs: e.MAX_QUEUED_INPUTS,
    maxQueuedBytes: e.MAX_QUEUED_BYTES,
    uploads: { total: e.MAX_UPLOADS, perCustomer: e.MAX_UPLOADS_PER_CUSTOMER },
    maxStorageBytes: e.MAX_STORAGE_BYTES_PER_CUSTOMER,
    maxQueuedBytesPerCustomer: e.MAX_QUEUED_BYTES_PER_CUSTOMER,
    prices: parsePrices(e.PRICE_TABLE),
    enrollmentSecret: e.ENROLLMENT_SECRET,
    deviceLimits: { heartbeatsPerInterval: e.DEVICE_HEARTBEATS_PER_INTERVAL, maxFramesPerSecond: e.DEVICE_MAX_FRAMES_PER_SECOND },
    workers: e.WORKERS,
    pythonWorkers: e.PYTHON_WORKERS,
    blobGc: { graceMs: e.BLOB_GC_GRACE_MS, intervalMs: e.BLOB_GC_INTERVAL_MS },
    payloadInlineMaxBytes: e.PAYLOAD_INLINE_MAX_BYTES,
    ...Object.fromEntries(Object.entries(overrides).filter(([, v]) => v !== undefined)),
  }
}
