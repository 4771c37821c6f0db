/**
 * Inference: a small ONNX model (Gemm 10->2, Softmax, built in code) run four ways.
 *
 * - direct: onnxruntime-node in this process, one `session.run` after another (BENCH_DIRECT_CALLS, default
 *   20,000, after 1,000 of warm-up).
 * - baseline: what a user would write instead of dcp, a minimal fastify server in this process
 *   (POST /infer {data, shape} -> {data, shape}) running the same session, under autocannon.
 * - dcp: `node bin/dcp.js start --workers 2` as a child process against the bench's database (two real
 *   local worker processes), the model uploaded with the development key, under autocannon on synchronous
 *   POST /api/v1/inference. The child gets RATE_LIMIT_MAX raised: the default 1000 a minute would turn the
 *   run into 429s.
 * - batch: POST /api/v1/inference/batch with BENCH_BATCH_INPUTS inputs (default 100,000), timed until the
 *   job reports `completed` (polled every BENCH_POLL_MS, default 150); every result is then read back a
 *   page at a time, each index must have exactly one completed result, and every 1000th (at least 100 of
 *   them) must equal onnxruntime's output. Baseline: the direct loop over the same inputs.
 *
 * autocannon runs BENCH_CONNECTIONS (default 32) connections for BENCH_SECONDS (default 10), after
 * BENCH_1CONN_SECONDS (default 5) on one connection: the latency without queueing. The one-connection runs
 * take their p50 from every response's time (bench/latency-thread.mjs), to the microsecond: autocannon's own
 * percentiles are whole milliseconds. autocannon runs in a worker thread for the baseline's windows, so it
 * does not share the server's event loop. The CPU each process used is printed for the dcp windows.
 *
 * The RESULT line: dcp_rps, baseline_rps and their ratio, p50/p99 at 32 connections (whole ms),
 * dcp_p50_1conn_ms and baseline_p50_1conn_ms, merged_mean, batch_inputs_per_s and batch_ratio (dcp's batch
 * against the direct loop). merged_mean is the number of jobs per dispatched device task in the
 * 32-connection dcp window, read from the event store: TaskLeased events of single inference jobs' tasks
 * recorded in the window, over the distinct lease ids they carry (tasks merged into one device task share
 * one lease; 1.00 when none are merged). Targets (#23): ratio >= 0.25 at 32 connections, dcp_p50_1conn_ms
 * within 3 ms of baseline_p50_1conn_ms, batch_ratio >= 0.8.
 */
import { readdirSync, readFileSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { availableParallelism, tmpdir } from 'node:os'
import path from 'node:path'
import { Worker } from 'node:worker_threads'
import autocannon from 'autocannon'
import Fastify from 'fastify'
import * as ort from 'onnxruntime-node'
import type { Database } from '../src/postgres/database.js'
import { denseOnnxModel } from '../test/helpers/onnx.js'
import { API_KEY, api, startDcp, stopDcp } from './dcp-process.js'
import { cpuSeconds } from './proc.js'
import type { BenchContext } from './run.js'

const DIRECT_CALLS = Number(process.env.BENCH_DIRECT_CALLS ?? 20_000)
const CONNECTIONS = Number(process.env.BENCH_CONNECTIONS ?? 32)
const SECONDS = Number(process.env.BENCH_SECONDS ?? 10)
const ONE_CONNECTION_SECONDS = Number(process.env.BENCH_1CONN_SECONDS ?? 5)
const BATCH_INPUTS = Number(process.env.BENCH_BATCH_INPUTS ?? 100_000)
const POLL_MS = Number(process.env.BENCH_POLL_MS ?? 150)
/** How long the batch may take before the bench gives up on it. */
const BATCH_TIMEOUT_MS = Number(process.env.BENCH_BATCH_TIMEOUT_S ?? 3600) * 1000
const PAGE = 10_000
const TOLERANCE = 1e-5

type Log = (line: string) => void
interface Tensor {
  data: number[]
  shape: number[]
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))
const fixed = (x: number, digits = 2) => (Number.isFinite(x) ? x.toFixed(digits) : 'NaN')

/** Input `i`: ten deterministic values in [0, 1) with three decimals (short JSON keeps the batch body small). */
function inputOf(i: number): number[] {
  let seed = (i + 1) * 2654435761
  return Array.from({ length: 10 }, () => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31
    return Math.floor((seed / 2 ** 31) * 1000) / 1000
  })
}

async function runDirect(session: ort.InferenceSession, data: number[]): Promise<number[]> {
  const out = await session.run({ input: new ort.Tensor('float32', Float32Array.from(data), [1, 10]) })
  return Array.from(out.output!.data as Float32Array)
}

const close = (a: number[], b: number[]) => a.length === b.length && a.every((v, i) => Math.abs(v - b[i]!) <= TOLERANCE)

/** Per-call time of `session.run` in this process. */
async function directBench(session: ort.InferenceSession, log: Log): Promise<void> {
  const data = inputOf(0)
  for (let i = 0; i < 1000; i++) await runDirect(session, data)
  const started = performance.now()
  for (let i = 0; i < DIRECT_CALLS; i++) await runDirect(session, data)
  const ms = performance.now() - started
  log(`direct: ${DIRECT_CALLS} calls in ${fixed(ms, 0)} ms: mean ${fixed((ms * 1000) / DIRECT_CALLS, 1)} µs, ${fixed((DIRECT_CALLS / ms) * 1000, 0)} calls/s`)
}

/** The processes whose CPU the bench reports: the dcp server (its children are the workers) and the bench's Postgres. */
export interface Watched {
  serverPid: number
  /** The port of the Postgres server the bench's database is on. */
  postgresPort: string
}

const childrenOf = (pid: number): number[] => {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number)
  } catch {
    return [] // gone
  }
}

/** The local postmaster started with `-p <port>` and its children (backends, background workers); none for a remote server. */
function postgresPids(port: string): number[] {
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const argv = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0')
      if (!argv[0]?.endsWith('postgres')) continue
      const p = argv.indexOf('-p')
      if (p >= 0 && argv[p + 1] === port) return [Number(entry), ...childrenOf(Number(entry))]
    } catch {} // gone meanwhile
  }
  return []
}

function cpuSnapshot({ serverPid, postgresPort }: Watched) {
  const self = process.cpuUsage()
  return {
    server: cpuSeconds(serverPid),
    workers: childrenOf(serverPid).reduce((sum, pid) => sum + cpuSeconds(pid), 0),
    postgres: new Map(postgresPids(postgresPort).map((pid) => [pid, cpuSeconds(pid)])),
    bench: (self.user + self.system) / 1e6,
  }
}

/** Starts counting; the returned function gives each part's CPU since then, in % of one core. */
export function cpuSplit(watched: Watched): () => string {
  const before = cpuSnapshot(watched)
  const started = performance.now()
  return () => {
    const after = cpuSnapshot(watched)
    const seconds = (performance.now() - started) / 1000
    const pct = (cpu: number) => `${fixed((cpu / seconds) * 100, 0)}%`
    // a backend that started meanwhile counts from 0; one that exited meanwhile is missed
    let postgres = 0
    for (const [pid, cpu] of after.postgres) postgres += cpu - (before.postgres.get(pid) ?? 0)
    return (
      `cpu: server ${pct(after.server - before.server)}, workers ${pct(after.workers - before.workers)} (both), ` +
      `postgres ${after.postgres.size ? pct(postgres) : '-'}, bench ${pct(after.bench - before.bench)} (of ${availableParallelism()} cores)`
    )
  }
}

/** The direct loop over the batch's inputs; keeps the outputs of the sampled indices. */
async function directLoop(session: ort.InferenceSession, n: number, sampled: (i: number) => boolean, log: Log) {
  const expected = new Map<number, number[]>()
  const started = performance.now()
  for (let i = 0; i < n; i++) {
    const output = await runDirect(session, inputOf(i))
    if (sampled(i)) expected.set(i, output)
  }
  const seconds = (performance.now() - started) / 1000
  log(`batch baseline: the direct loop over ${n} inputs in ${fixed(seconds, 2)} s = ${fixed(n / seconds, 0)} inputs/s`)
  return { expected, inputsPerS: n / seconds }
}

interface LoadResult {
  rps: number
  p50: number
  p99: number
  non2xx: number
  errors: number
}

function summarise(what: string, result: autocannon.Result, log: Log): LoadResult {
  const figures = { rps: result.requests.average, p50: result.latency.p50, p99: result.latency.p99, non2xx: result.non2xx, errors: result.errors + result.timeouts }
  log(
    `${what}: ${result.requests.total} requests in ${result.duration} s = ${fixed(figures.rps, 0)} rps; latency p50 ${figures.p50} ms, p99 ${figures.p99} ms, ` +
      `max ${result.latency.max} ms; non-2xx ${figures.non2xx}, errors ${result.errors}, timeouts ${result.timeouts}`,
  )
  return figures
}

const LATENCY_THREAD = new URL('./latency-thread.mjs', import.meta.url)

/** What bench/latency-thread.mjs posts back. */
interface ThreadRun {
  /** Of every 2xx response, in ms (fractional). */
  times: number[]
  requests: number
  duration: number
  non2xx: number
  errors: number
  timeouts: number
}

/** The value below which a share `q` of the sorted values lies (nearest rank). */
const quantile = (sorted: number[], q: number) => (sorted.length === 0 ? NaN : sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)]!)

/**
 * One connection for ONE_CONNECTION_SECONDS, the latency without queueing: autocannon in a worker thread of
 * its own (bench/latency-thread.mjs), so that it shares no event loop with a server in this process. Returns
 * the median response time to the microsecond, where autocannon's own percentiles are whole milliseconds.
 * `options` must be cloneable (no callbacks).
 */
async function oneConnection(what: string, options: autocannon.Options, log: Log): Promise<number> {
  const worker = new Worker(LATENCY_THREAD, { workerData: { ...options, connections: 1, duration: ONE_CONNECTION_SECONDS } })
  const run = await new Promise<ThreadRun>((resolve, reject) => {
    worker.once('message', resolve)
    worker.once('error', reject)
    worker.once('exit', (code) => reject(new Error(`${what}: the latency thread exited with ${code} before its result`)))
  }).finally(() => worker.terminate())
  const sorted = run.times.sort((a, b) => a - b)
  const ms = (q: number) => fixed(quantile(sorted, q), 3)
  log(
    `${what}: ${run.requests} requests in ${run.duration} s = ${fixed(run.requests / run.duration, 0)} rps; latency p50 ${ms(0.5)} ms, p99 ${ms(0.99)} ms, ` +
      `max ${ms(1)} ms; non-2xx ${run.non2xx}, errors ${run.errors}, timeouts ${run.timeouts}`,
  )
  return quantile(sorted, 0.5)
}

/** A minimal fastify server doing the same inference in-process, under autocannon from a worker thread. */
async function baselineBench(session: ort.InferenceSession, body: string, log: Log): Promise<{ load: LoadResult; p50OneConnection: number }> {
  const app = Fastify({ logger: false })
  app.post<{ Body: Tensor }>('/infer', {
    schema: {
      body: {
        type: 'object',
        required: ['data', 'shape'],
        properties: { data: { type: 'array', items: { type: 'number' } }, shape: { type: 'array', items: { type: 'integer' } } },
      },
    },
  }, async (request) => {
    const out = await session.run({ input: new ort.Tensor('float32', Float32Array.from(request.body.data), request.body.shape) })
    return { data: Array.from(out.output!.data as Float32Array), shape: out.output!.dims }
  })
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  try {
    const options = { url: `${url}/infer`, method: 'POST' as const, headers: { 'content-type': 'application/json' }, body, connections: CONNECTIONS }
    await autocannon({ ...options, duration: 2, workers: 1 }) // warm-up
    const p50OneConnection = await oneConnection('baseline, 1 connection', options, log)
    return { load: summarise('baseline', await autocannon({ ...options, duration: SECONDS, workers: 1 }), log), p50OneConnection }
  } finally {
    await app.close()
  }
}

export async function uploadModel(base: string, bytes: Buffer): Promise<string> {
  const form = new FormData()
  form.append('name', 'bench-dense')
  form.append('model', new Blob([bytes]), 'dense.onnx')
  const response = await api(base, 'POST', '/models', form)
  if (response.status !== 201) throw new Error(`model upload: ${response.status} ${JSON.stringify(response.body)}`)
  return response.body.id as string
}

export async function waitForDevices(base: string, n: number, timeoutMs: number): Promise<void> {
  const deadline = performance.now() + timeoutMs
  for (;;) {
    const { body } = await api(base, 'GET', '/devices')
    const online = (body.devices as { status: string }[]).filter((d) => d.status !== 'offline').length
    if (online >= n) return
    if (performance.now() > deadline) throw new Error(`only ${online} of ${n} devices online after ${timeoutMs} ms`)
    await sleep(200)
  }
}

/** The database's clock, which stamps the events (`recorded_at`). */
async function databaseNow(database: Database): Promise<string> {
  return (await database.pool.query<{ now: string }>('select clock_timestamp()::text as now')).rows[0]!.now
}

/**
 * Dispatches of single inference jobs' tasks between two instants of the database's clock: their TaskLeased
 * events (one per task and attempt) and the distinct lease ids these carry. Tasks merged into one device task
 * share a lease id, so dispatches / leases is the number of jobs per dispatched task. Streams as in
 * src/domain/task.ts and inference-job.ts: `task-<id>` opens with TaskQueued naming its job, whose
 * `inference-<job>` stream holds InferenceRequested with the job's kind.
 */
async function dispatchesOfSingleJobs(database: Database, from: string, to: string): Promise<{ dispatches: number; leases: number }> {
  const { rows } = await database.pool.query<{ dispatches: number; leases: number }>(
    `select count(*)::int as dispatches, count(distinct leased.data->>'lease_id')::int as leases
       from events leased
      where leased.type = 'TaskLeased' and leased.recorded_at >= $1::timestamptz and leased.recorded_at < $2::timestamptz
        and exists (select 1 from events queued
                      join events requested on requested.stream_id = 'inference-' || (queued.data->>'job_id') and requested.type = 'InferenceRequested'
                     where queued.stream_id = leased.stream_id and queued.type = 'TaskQueued' and requested.data->>'kind' = 'single')`,
    [from, to],
  )
  return rows[0]!
}

interface SyncFigures {
  load: LoadResult
  p50OneConnection: number
  /** Of the 32-connection window (dispatchesOfSingleJobs). */
  dispatches: number
  leases: number
}

/** Synchronous single inference under autocannon; the first error bodies are kept. */
async function syncBench(base: string, database: Database, watched: Watched, modelId: string, session: ort.InferenceSession, log: Log): Promise<SyncFigures> {
  const data = inputOf(0)
  const body = JSON.stringify({ model_id: modelId, input: { data, shape: [1, 10] } })
  const first = await api(base, 'POST', '/inference', body)
  if (first.status !== 200) throw new Error(`dcp: the first inference failed: ${first.status} ${JSON.stringify(first.body)}`)
  if (!close(first.body.result.data, await runDirect(session, data))) throw new Error(`dcp: result ${JSON.stringify(first.body.result)} differs from onnxruntime`)
  const errorBodies: string[] = []
  const request = {
    onResponse: (status: number, text: string) => {
      if ((status < 200 || status > 299) && errorBodies.length < 5) errorBodies.push(`${status} ${text.slice(0, 300)}`)
    },
  }
  const plain = { url: `${base}/api/v1/inference`, method: 'POST' as const, headers: { 'content-type': 'application/json', 'x-api-key': API_KEY }, body, connections: CONNECTIONS }
  const options = { ...plain, requests: [request] }
  summarise('dcp warm-up', await autocannon({ ...options, duration: 3 }), log)
  const p50OneConnection = await oneConnection('dcp, 1 connection', plain, log)
  errorBodies.length = 0
  const cpu = cpuSplit(watched)
  const from = await databaseNow(database)
  const load = summarise('dcp', await autocannon({ ...options, duration: SECONDS }), log)
  const to = await databaseNow(database)
  log(`dcp: ${cpu()}`)
  for (const text of errorBodies) log(`dcp: error response: ${text}`)
  const { dispatches, leases } = await dispatchesOfSingleJobs(database, from, to)
  log(`dcp: ${dispatches} dispatches of single jobs' tasks (TaskLeased) under ${leases} lease ids: merged_mean ${fixed(dispatches / leases)} jobs per dispatched task`)
  return { load, p50OneConnection, dispatches, leases }
}

/** POSTs the batch, waits for `completed`; undefined when the server refuses it (logged). */
async function runBatch(base: string, watched: Watched, modelId: string, n: number, log: Log): Promise<{ jobId: string; seconds: number } | undefined> {
  const body = JSON.stringify({ model_id: modelId, name: 'bench', inputs: Array.from({ length: n }, (_, i) => ({ data: inputOf(i), shape: [1, 10] })) })
  log(`batch: POST /inference/batch with ${n} inputs, body ${fixed(body.length / 1024 / 1024)} MiB`)
  let cpu = cpuSplit(watched)
  const started = performance.now()
  const queued = await api(base, 'POST', '/inference/batch', body)
  const accepted = performance.now()
  if (queued.status !== 202) {
    log(`batch: the server refused the batch: ${queued.status} ${JSON.stringify(queued.body).slice(0, 500)}`)
    return undefined
  }
  const jobId = queued.body.job_id as string
  log(`batch: ${jobId} accepted in ${fixed((accepted - started) / 1000)} s; ${cpu()}`)
  cpu = cpuSplit(watched)
  let lastLog = accepted
  for (;;) {
    const { status, body: job } = await api(base, 'GET', `/inference/${jobId}?limit=1`)
    if (status !== 200) throw new Error(`batch: GET /inference/${jobId}: ${status} ${JSON.stringify(job)}`)
    const now = performance.now()
    if (job.status === 'completed' || job.status === 'failed' || job.status === 'cancelled') {
      const seconds = (now - started) / 1000
      log(`batch: ${job.status} after ${fixed(seconds)} s (${JSON.stringify(job.progress)}); since accepted: ${cpu()}`)
      if (job.status !== 'completed') throw new Error(`batch: the job ended ${job.status}`)
      return { jobId, seconds }
    }
    if (now - lastLog > 5000) {
      log(`  batch: ${fixed((now - started) / 1000, 0)} s: ${job.status}, ${job.progress.completed} completed, ${job.progress.failed} failed`)
      lastLog = now
    }
    if (now - started > BATCH_TIMEOUT_MS) throw new Error(`batch: not completed within ${BATCH_TIMEOUT_MS / 1000} s (${JSON.stringify(job.progress)})`)
    await sleep(POLL_MS)
  }
}

/** Reads every result back a page at a time: each index once and completed, the sampled ones equal to onnxruntime. */
async function verifyBatch(base: string, jobId: string, n: number, expected: Map<number, number[]>, log: Log): Promise<void> {
  const seen = new Uint8Array(n)
  const problems: string[] = []
  let compared = 0
  const started = performance.now()
  for (let offset = 0; offset < n; offset += PAGE) {
    const { status, body } = await api(base, 'GET', `/inference/${jobId}?limit=${PAGE}&offset=${offset}`)
    if (status !== 200) throw new Error(`batch: results page at ${offset}: ${status} ${JSON.stringify(body).slice(0, 300)}`)
    for (const r of body.results as { index: number; status: string; result?: Tensor }[]) {
      if (!(r.index >= 0 && r.index < n)) problems.push(`index ${r.index} out of range`)
      else if (seen[r.index]!++) problems.push(`index ${r.index} more than once`)
      if (r.status !== 'completed') problems.push(`index ${r.index} is ${r.status}`)
      const want = expected.get(r.index)
      if (want && r.result) {
        compared++
        if (!close(r.result.data, want)) problems.push(`index ${r.index}: ${JSON.stringify(r.result.data)} != onnxruntime ${JSON.stringify(want)}`)
      }
    }
  }
  const missing = seen.reduce((count, s) => count + (s === 0 ? 1 : 0), 0)
  if (missing > 0) problems.push(`${missing} indices have no result (the first: ${seen.indexOf(0)})`)
  if (compared < expected.size) problems.push(`only ${compared} of ${expected.size} sampled results had an output`)
  log(`batch: read ${n} results back in ${fixed((performance.now() - started) / 1000)} s; ${compared} sampled results compared with onnxruntime`)
  if (problems.length > 0) throw new Error(`batch: ${problems.length} problems in the results, the first: ${problems.slice(0, 10).join('; ')}`)
  log('batch: every index has exactly one completed result; the sampled ones equal onnxruntime within 1e-5')
}

export async function inferenceBench({ database, log }: BenchContext): Promise<string> {
  const bytes = denseOnnxModel({ inputs: 10, outputs: 2 })
  const session = await ort.InferenceSession.create(bytes)
  log(`inference: Gemm 10->2 + Softmax (${bytes.length} B); autocannon ${CONNECTIONS} connections for ${SECONDS} s; batch of ${BATCH_INPUTS} inputs`)
  await directBench(session, log)
  const step = Math.max(1, Math.min(1000, Math.floor(BATCH_INPUTS / 100)))
  const loop = await directLoop(session, BATCH_INPUTS, (i) => i % step === 0, log)
  const baseline = await baselineBench(session, JSON.stringify({ data: inputOf(0), shape: [1, 10] }), log)

  const dataDir = await mkdtemp(path.join(tmpdir(), 'dcp-bench-inference-'))
  const started = performance.now()
  const { child, url } = await startDcp(database.url, dataDir, log, { workers: 2 })
  try {
    log(`dcp: pid ${child.pid} listening on ${url} (${fixed(performance.now() - started, 0)} ms to start)`)
    const modelId = await uploadModel(url, bytes)
    await waitForDevices(url, 2, 60_000)
    log(`dcp: model ${modelId} uploaded, 2 workers online ${fixed((performance.now() - started) / 1000, 1)} s after the start`)
    const watched = { serverPid: child.pid!, postgresPort: new URL(database.url).port || '5432' }
    const dcp = await syncBench(url, database, watched, modelId, session, log)
    const batch = await runBatch(url, watched, modelId, BATCH_INPUTS, log)
    if (batch) await verifyBatch(url, batch.jobId, BATCH_INPUTS, loop.expected, log)
    const batchPerS = batch ? BATCH_INPUTS / batch.seconds : NaN
    if (batch) log(`batch: ${fixed(batchPerS, 0)} inputs/s through dcp against ${fixed(loop.inputsPerS, 0)} direct = ${fixed(batchPerS / loop.inputsPerS, 3)}`)
    return (
      `RESULT name=inference dcp_rps=${fixed(dcp.load.rps, 0)} baseline_rps=${fixed(baseline.load.rps, 0)} ratio=${fixed(dcp.load.rps / baseline.load.rps, 3)} ` +
      `dcp_p50_ms=${dcp.load.p50} dcp_p99_ms=${dcp.load.p99} baseline_p50_ms=${baseline.load.p50} ` +
      `dcp_p50_1conn_ms=${fixed(dcp.p50OneConnection, 3)} baseline_p50_1conn_ms=${fixed(baseline.p50OneConnection, 3)} ` +
      `merged_mean=${fixed(dcp.dispatches / dcp.leases)} batch_inputs_per_s=${fixed(batchPerS, 0)} batch_ratio=${fixed(batchPerS / loop.inputsPerS, 3)}`
    )
  } finally {
    const exit = await stopDcp(child)
    log(`dcp: stopped (exit ${exit})`)
    await session.release()
    await rm(dataDir, { recursive: true, force: true }).catch(() => {})
  }
}
