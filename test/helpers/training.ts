import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import type { Test } from 'tap'
import type { AppDeps } from '../../src/http/app.js'
import { DeviceWorker, type DeviceWorkerOptions } from '../../src/sdk/worker.js'
import { multipart, testApp } from './app.js'
import { type Weights, weightsFromBase64, weightsToBase64 } from '../../src/domain/fedavg.js'
import { loadTrainable } from '../../src/sdk/trainer/index.js'
import { eventually, SimDevice } from './device.js'
import { mlpOnnxModel } from './onnx.js'

/** The model the training tests learn with: 8 inputs, 16 hidden (Relu), 4 classes (Softmax). */
export const MLP = { inputs: 8, hidden: 16, outputs: 4 }

/** A training job body in the spec's shape; `overrides` replace whole sections' fields. */
export function trainingBody(modelId: string, overrides: { data?: object; training?: object; resources?: object } = {}) {
  return {
    model_id: modelId,
    data_config: { type: 'stream', total_samples: 20_000, batch_size: 32, ...overrides.data },
    training_config: { epochs: 5, learning_rate: 0.001, optimizer: 'adam', target_accuracy: 0.9, sync_mode: 'async', local_steps: 20, sync_interval_ms: 300, ...overrides.training },
    resource_config: { min_devices: 1, ...overrides.resources },
  }
}

/** A test app on a real socket, a customer, the MLP uploaded, and `devices` in-process workers that can train. */
export async function trainingSetup(t: Test, options: { devices?: number; roundDeadlineMs?: number; worker?: Partial<DeviceWorkerOptions>; app?: Partial<AppDeps> } = {}) {
  const context = await testApp(t, { rateLimit: { max: 100_000, windowMs: 60_000 }, ...options.app }, { heartbeatIntervalMs: 1000, roundDeadlineMs: options.roundDeadlineMs ?? 5000 })
  const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
  const alice = await context.customer()
  const bytes = mlpOnnxModel({ ...MLP, seed: 7 })
  const upload = multipart({ name: 'mlp' }, { name: 'mlp.onnx', content: bytes })
  const uploaded = await context.app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...upload.headers, 'x-api-key': alice.key }, payload: upload.payload })
  if (uploaded.statusCode !== 201) throw new Error(`upload failed: ${uploaded.statusCode} ${uploaded.body}`)
  const model = uploaded.json() as { id: string; checksum: string }
  const dir = await mkdtemp(path.join(tmpdir(), 'dcp-training-'))
  const workers: DeviceWorker[] = []
  t.teardown(async () => {
    await Promise.all(workers.map((w) => w.stop({ drain: false })))
    await rm(dir, { recursive: true, force: true })
  })
  const startDevice = async (more: Partial<DeviceWorkerOptions> = {}) => {
    // the platform asserts which devices are cloud instances: an aws worker enrolls with an aws token
    const aws = (more.instanceType ?? options.worker?.instanceType) === 'aws' && !(more.enrollmentToken ?? options.worker?.enrollmentToken)
    const enrollment = aws ? { enrollmentToken: (await context.enrollmentToken({ instance_type: 'aws' })).token } : {}
    const worker = new DeviceWorker({ server: url, stateDir: path.join(dir, `w${workers.length}`), log: () => {}, ...options.worker, ...enrollment, ...more })
    workers.push(worker)
    await worker.start()
    return worker
  }
  for (let i = 0; i < (options.devices ?? 0); i++) await startDevice()
  const api = async (method: string, route: string, payload?: unknown) => {
    const response = await fetch(`${url}/api/v1${route}`, {
      method,
      headers: { 'x-api-key': alice.key, ...(payload ? { 'content-type': 'application/json' } : {}) },
      ...(payload ? { body: JSON.stringify(payload) } : {}),
    })
    return { status: response.status, body: (await response.json()) as any }
  }
  const waitFor = (jobId: string, done: (job: any) => boolean, timeoutMs = 60_000, what = 'the job') =>
    eventually(async () => {
      const r = await api('GET', `/training/${jobId}`)
      return done(r.body) ? r.body : undefined
    }, timeoutMs, `${what} ${jobId}`, 100)
  return { ...context, url, api, alice, model, bytes, workers, startDevice, waitFor, dir }
}

/** How a malicious device lies: its weights are `scale` × the weights it was sent; it claims `samples` and `steps`. */
export interface Lies {
  scale?: number
  samples?: number
  steps?: number
}

/**
 * A device that poisons every round it is given: a real WebSocket speaking the training protocol by hand.
 * On `train_start` and each `train_weights` it answers at once with the weights it was sent (the model
 * file's own at round 0, read from `modelBytes`) scaled by `lies.scale` (default −10), claiming
 * `lies.samples` (default 10⁹). It heartbeats until the test ends; `updates` counts what it sent, `errors`
 * collects the hub's `error` frames.
 */
export async function maliciousDevice(t: Test, url: string, modelBytes: Uint8Array, lies: Lies = {}, register: { instanceType?: 'aws' | 'user' } = {}) {
  const device = await SimDevice.connect(url)
  await device.register({ canTrain: true, ...register })
  const beat = setInterval(() => device.heartbeat(), 300)
  const initial = loadTrainable(modelBytes).getWeights()
  const state = { updates: 0, errors: [] as { code: string; message: string }[], stopped: false }
  const poison = (weights: Weights) => Object.fromEntries(Object.entries(weights).map(([name, values]) => [name, values.map((v) => v * (lies.scale ?? -10))]))
  const answer = (frame: any) => {
    if (state.stopped) return
    const weights = frame.weights ? weightsFromBase64(frame.weights) : initial
    device.send({
      type: 'train_update',
      job_id: frame.job_id,
      base_round: frame.round,
      weights: weightsToBase64(poison(weights)),
      samples: lies.samples ?? 1e9,
      steps: lies.steps ?? 1e9,
      loss: 0.01,
      metrics: { cpu_ms: 1, gpu_ms: 0, wall_ms: 1 },
      power_watts: 1,
    })
    state.updates++
  }
  device.socket.on('message', (raw) => {
    const frame = JSON.parse(raw.toString())
    if (frame.type === 'train_start' || frame.type === 'train_weights') answer(frame)
    if (frame.type === 'error') state.errors.push(frame)
  })
  t.teardown(() => {
    state.stopped = true
    clearInterval(beat)
    device.socket.close()
  })
  return { device, state }
}
