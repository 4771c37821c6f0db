import { type ChildProcess, spawn } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import * as ort from 'onnxruntime-node'
import type { Test } from 'tap'
import type { AppDeps } from '../../src/http/app.js'
import { multipart, testApp } from './app.js'
import { eventually } from './device.js'
import { denseOnnxModel } from './onnx.js'

export const DCP_BIN = fileURLToPath(new URL('../../bin/dcp.js', import.meta.url))

export interface InferenceSetupOptions {
  /** Real `dcp worker` processes to start (instance type user unless listed in `aws`). */
  workers?: number
  /** Indexes of the workers that register as cloud (`aws`) instances. */
  aws?: number[]
  /** Extra model upload fields (JSON-encoded where the API wants JSON). */
  modelFields?: Record<string, string>
  model?: Buffer
  leaseTimeoutMs?: number
  /** Tasks a device may hold per task it runs at once (the scheduler's default when absent). */
  prefetch?: number
  /** Longest a lease lives whatever the heartbeats (the scheduler's default when absent). */
  maxLeaseMs?: number
  /** Task inputs whose JSON is larger than this go to the blob store (the scheduler's default when absent). */
  inlineInputsMaxBytes?: number
  overrides?: Partial<AppDeps>
}

/** A test app on a real socket, a customer, a model built in the test, and real worker processes. */
export async function inferenceSetup(t: Test, options: InferenceSetupOptions = {}) {
  const context = await testApp(t, { rateLimit: { max: 100_000, windowMs: 60_000 }, ...options.overrides }, { heartbeatIntervalMs: 2000, leaseTimeoutMs: options.leaseTimeoutMs ?? 10_000, prefetch: options.prefetch, ...(options.maxLeaseMs ? { maxLeaseMs: options.maxLeaseMs } : {}), ...(options.inlineInputsMaxBytes ? { inlineInputsMaxBytes: options.inlineInputsMaxBytes } : {}) })
  const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
  const alice = await context.customer()
  const bytes = options.model ?? denseOnnxModel({ inputs: 10, outputs: 2 })
  const body = multipart({ name: 'my-classifier', ...options.modelFields }, { name: 'my_model.onnx', content: bytes })
  const uploaded = await context.app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': alice.key }, payload: body.payload })
  if (uploaded.statusCode !== 201) throw new Error(`upload failed: ${uploaded.statusCode} ${uploaded.body}`)
  const model = uploaded.json()
  const dir = await mkdtemp(path.join(tmpdir(), 'dcp-inference-'))
  const workers: ChildProcess[] = []
  t.teardown(async () => {
    workers.forEach((w) => w.exitCode === null && w.kill('SIGKILL'))
    await rm(dir, { recursive: true, force: true })
  })
  // the platform asserts which devices are cloud instances: those enroll with an aws token
  const awsToken = options.aws?.length ? (await context.enrollmentToken({ instance_type: 'aws', label: 'test cloud workers' })).token : undefined
  const startWorker = (i: number, server = url) => {
    const type = options.aws?.includes(i) ? 'aws' : 'user'
    const enrollment = type === 'aws' ? ['--enrollment-token', awsToken!] : []
    const child = spawn(process.execPath, [DCP_BIN, 'worker', '--server', server, '--state-dir', path.join(dir, `w${i}`), '--instance-type', type, ...enrollment], { stdio: 'ignore' })
    workers[i] = child
    return child
  }
  for (let i = 0; i < (options.workers ?? 0); i++) startWorker(i)
  const api = async (method: string, route: string, payload?: unknown, headers: Record<string, string> = {}) => {
    const response = await fetch(`${url}/api/v1${route}`, {
      method,
      headers: { 'x-api-key': alice.key, ...(payload ? { 'content-type': 'application/json' } : {}), ...headers },
      ...(payload ? { body: JSON.stringify(payload) } : {}),
    })
    return { status: response.status, body: (await response.json()) as any }
  }
  if (options.workers) await eventually(async () => (await api('GET', '/devices/stats')).body.idle === options.workers, 30_000, 'workers idle')
  const session = await ort.InferenceSession.create(bytes)
  const direct = async (data: number[], shape = [1, data.length]) => {
    const out = await session.run({ [session.inputNames[0]!]: new ort.Tensor('float32', Float32Array.from(data), shape) })
    return Array.from(out[session.outputNames[0]!]!.data as Float32Array)
  }
  return { ...context, url, api, model, direct, alice, workers, startWorker, dir }
}

export const close = (a: number[], b: number[]) => a.length === b.length && a.every((v, i) => Math.abs(v - b[i]!) < 1e-6)
export const input = (seed: number) => Array.from({ length: 10 }, (_, i) => ((i + 1) * (seed + 1)) / 10)

/** Polls a job until `done` says so, and returns its last view. */
export async function poll(api: Awaited<ReturnType<typeof inferenceSetup>>['api'], jobId: string, done: (body: any) => boolean, timeoutMs = 60_000, query = '') {
  return eventually(async () => {
    const r = await api('GET', `/inference/${jobId}${query}`)
    return done(r.body) ? r.body : undefined
  }, timeoutMs, `job ${jobId}`)
}
