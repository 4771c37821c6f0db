import { Readable } from 'node:stream'
import type { BlobStore } from '../blobs/blob-store.js'
import { mlpOnnxModel } from '../benchmarks/models.js'
import { DomainError } from '../domain/errors.js'
import { benchmarkDecider, benchmarkStream, type BenchmarkStartedData, type PerfStep } from '../domain/benchmark.js'
import { type ModelDescription, modelDecider, modelStream } from '../domain/model.js'
import { inspectModelFile } from '../domain/model-file.js'
import type { EventStore, Position } from '../event-store/port.js'
import { handleCommand, type KnownState } from './handle-command.js'

/** One request through the whole HTTP stack (fastify's inject), as the customer, past the rate limit. */
export type LoadRequest = (method: 'GET' | 'POST', url: string, payload?: unknown) => Promise<{ status: number; body: any }>

export interface BenchmarkDeps {
  store: EventStore
  blobs: BlobStore
  /** Read-your-writes for the model a benchmark uploads. */
  waitFor(position: Position): Promise<void>
  now(): Date
  log?(message: string): void
  /** Benchmarks one customer may run at once (their load is exempt from the rate limit). Default 1. */
  maxPerCustomer?: number
}

export interface QuickConfig {
  mode: 'inference' | 'training' | 'gpu-training'
  /** Inference: requests to send (default 100) and at most this many at once (default 4). */
  requests: number
  concurrency: number
  /** Training: epochs (default 1) and batch size (default 32). */
  epochs: number
  batch_size: number
}

export interface PerfConfig {
  duration: number
  instance_type: 'aws' | 'user' | 'all'
  rps_steps: number[]
  max_concurrency: number
}

/** The benchmark model: a 2-layer MLP, 16 inputs, 32 hidden, 4 classes; small, and trainable. */
const MODEL = { inputs: 16, hidden: 32, outputs: 4 }
const TRAINING_TIMEOUT_MS = 10 * 60_000

/**
 * Runs the dashboard's benchmarks as a customer would: it uploads a benchmark model, opens a `benchmark`
 * project, and sends real requests through the HTTP stack; each run is a stream of events (started, each
 * perf step, completed or failed), so its results are read models like everything else.
 */
export class BenchmarkRunner {
  private readonly running = new Set<Promise<void>>()
  /** Benchmarks running (or starting) per customer: their load bypasses the rate limit, so their number is bounded. */
  private readonly runningBy = new Map<string, number>()
  private stopped = false

  constructor(private readonly deps: BenchmarkDeps) {}

  /** Records the start and runs the benchmark in the background; resolves once it is recorded. */
  async start(customerId: string, request: LoadRequest, mode: BenchmarkStartedData['mode'], config: QuickConfig | PerfConfig): Promise<BenchmarkStartedData> {
    if (this.stopped) throw new DomainError('SERVICE_UNAVAILABLE', 'the server is shutting down')
    const max = this.deps.maxPerCustomer ?? 1
    const own = this.runningBy.get(customerId) ?? 0
    if (own >= max) throw new DomainError('RATE_LIMITED', `${own} benchmark${own === 1 ? ' is' : 's are'} already running for you, the most a customer may run at once; wait for ${own === 1 ? 'it' : 'one'} to end`)
    this.runningBy.set(customerId, own + 1)
    const done = () => {
      const left = (this.runningBy.get(customerId) ?? 1) - 1
      if (left <= 0) this.runningBy.delete(customerId)
      else this.runningBy.set(customerId, left)
    }
    try {
      return await this.launch(customerId, request, mode, config, done)
    } catch (error) {
      done()
      throw error
    }
  }

  private async launch(customerId: string, request: LoadRequest, mode: BenchmarkStartedData['mode'], config: QuickConfig | PerfConfig, done: () => void): Promise<BenchmarkStartedData> {
    const modelId = await this.uploadModel(customerId)
    const project = await request('POST', '/api/v1/projects', { name: `benchmark ${mode}`, type: 'benchmark', model_id: modelId })
    if (project.status !== 201) throw new Error(`creating the benchmark project: ${project.status} ${JSON.stringify(project.body)}`)
    const at = this.deps.now().toISOString()
    const benchmark: BenchmarkStartedData = {
      benchmark_id: `bench_${this.deps.now().getTime().toString(36)}${Math.random().toString(36).slice(2, 8)}`,
      customer_id: customerId,
      mode,
      config: { ...config, model_id: modelId },
      project_id: project.body.project_id,
      started_at: at,
    }
    const known: KnownState<ReturnType<typeof benchmarkDecider.initialState>> = { state: benchmarkDecider.initialState(), revision: -1 }
    const started = await handleCommand(this.deps.store, benchmarkStream(benchmark.benchmark_id), benchmarkDecider, { type: 'StartBenchmark', benchmark }, { known, metadata: { customerId, occurredAt: at } })
    await this.deps.waitFor(started.position)
    const run = this.run(benchmark, modelId, request, config).finally(() => {
      this.running.delete(run)
      done()
    })
    this.running.add(run)
    return benchmark
  }

  /** Benchmarks the read model shows running when this process starts were cut short by a crash: record them failed. */
  async recover(running: { benchmark_id: string; customer_id: string }[]): Promise<void> {
    for (const b of running) {
      const at = this.deps.now().toISOString()
      await handleCommand(this.deps.store, benchmarkStream(b.benchmark_id), benchmarkDecider, { type: 'FailBenchmark', error: 'the server stopped while it ran', at }, { metadata: { customerId: b.customer_id, occurredAt: at } }).catch(
        (error: Error) => this.deps.log?.(`benchmark ${b.benchmark_id}: recording the interruption: ${error.message}`),
      )
    }
  }

  /** Ends the benchmarks in flight (each is recorded as failed) and starts no more. */
  async stop(): Promise<void> {
    this.stopped = true
    await this.idle()
  }

  /** Resolves when every benchmark in flight has ended (for shutdown and tests). */
  async idle(): Promise<void> {
    await Promise.allSettled([...this.running])
  }

  private async run(benchmark: BenchmarkStartedData, modelId: string, request: LoadRequest, config: QuickConfig | PerfConfig): Promise<void> {
    const stream = benchmarkStream(benchmark.benchmark_id)
    const record = (command: Parameters<typeof benchmarkDecider.decide>[0]) =>
      handleCommand(this.deps.store, stream, benchmarkDecider, command, { metadata: { customerId: benchmark.customer_id, occurredAt: this.deps.now().toISOString() } })
    try {
      let result: Record<string, unknown>
      if (benchmark.mode === 'perf') result = await this.perf(benchmark, modelId, request, config as PerfConfig, (step) => record({ type: 'RecordStep', step }).then(() => undefined))
      else if (benchmark.mode === 'inference') result = await this.inference(benchmark, modelId, request, config as QuickConfig)
      else result = await this.training(modelId, request, config as QuickConfig, benchmark.mode === 'gpu-training')
      await record({ type: 'CompleteBenchmark', result, at: this.deps.now().toISOString() })
    } catch (error) {
      this.deps.log?.(`benchmark ${benchmark.benchmark_id}: ${(error as Error).message}`)
      await record({ type: 'FailBenchmark', error: (error as Error).message.slice(0, 2000), at: this.deps.now().toISOString() }).catch(() => undefined)
    }
  }

  /** `requests` synchronous inferences, `concurrency` at a time: latency percentiles and throughput. */
  private async inference(benchmark: BenchmarkStartedData, modelId: string, request: LoadRequest, config: QuickConfig): Promise<Record<string, unknown>> {
    const latencies: number[] = []
    const devices = new Set<string>()
    let errors = 0
    let next = 0
    const started = performance.now()
    const worker = async () => {
      while (next < config.requests && !this.stopped) {
        const i = next++
        const t0 = performance.now()
        const r = await request('POST', '/api/v1/inference', { model_id: modelId, project_id: benchmark.project_id, input: { data: inputOf(i), shape: [1, MODEL.inputs] } })
        if (r.status === 200) {
          latencies.push(performance.now() - t0)
          devices.add(r.body.device_id)
        } else errors++
      }
    }
    await Promise.all(Array.from({ length: config.concurrency }, worker))
    if (this.stopped) throw new Error('the server shut down during the benchmark')
    const seconds = (performance.now() - started) / 1000
    if (latencies.length === 0) throw new Error(`no request succeeded (${errors} errors)`)
    return { requests: config.requests, completed: latencies.length, errors, seconds: round(seconds), throughput_rps: round(latencies.length / seconds), latency_ms: percentiles(latencies), devices: devices.size }
  }

  /** A training job on the benchmark model to 0.9 validation accuracy: time to accuracy and what it used. */
  private async training(modelId: string, request: LoadRequest, config: QuickConfig, gpu: boolean): Promise<Record<string, unknown>> {
    const submitted = await request('POST', '/api/v1/training', {
      model_id: modelId,
      data_config: { type: 'stream', total_samples: 20_000, batch_size: config.batch_size },
      training_config: { epochs: config.epochs, learning_rate: 0.001, optimizer: 'adam', target_accuracy: 0.9, sync_mode: 'async', local_steps: 20, sync_interval_ms: 1000 },
      resource_config: { min_devices: 1, prefer_gpu: gpu },
    })
    if (submitted.status !== 202) throw new Error(`POST /training: ${submitted.status} ${submitted.body?.error?.message ?? ''}`)
    const jobId = submitted.body.job_id as string
    for (const deadline = Date.now() + TRAINING_TIMEOUT_MS; Date.now() < deadline && !this.stopped; await sleep(250)) {
      const { body: job } = await request('GET', `/api/v1/training/${jobId}`)
      if (job.status === 'queued' || job.status === 'running') continue
      if (job.status !== 'completed') throw new Error(`training job ${jobId} ended ${job.status}: ${job.error ?? ''}`)
      const rounds = await request('GET', `/api/v1/training/${jobId}/rounds?limit=10000`)
      const devices = Math.max(0, ...((rounds.body.rounds ?? []) as { devices: number }[]).map((r) => r.devices))
      const seconds = (Date.parse(job.completed_at) - Date.parse(job.started_at ?? job.created_at)) / 1000
      return {
        job_id: jobId,
        end_reason: job.end_reason,
        validation_accuracy: job.validation_accuracy,
        time_to_accuracy_s: job.end_reason === 'target_accuracy' ? round(seconds) : null,
        seconds: round(seconds),
        rounds: job.progress.rounds,
        samples: job.progress.samples_seen,
        epochs: config.epochs,
        batch_size: config.batch_size,
        prefer_gpu: gpu,
        devices,
        trained_model_id: job.trained_model_id,
      }
    }
    if (this.stopped) throw new Error('the server shut down during the benchmark')
    throw new Error(`training job ${jobId} did not finish within ${TRAINING_TIMEOUT_MS / 60_000} minutes`)
  }

  /**
   * Step load: each rate of `rps_steps` for `duration / steps` seconds, requests started on a fixed schedule
   * with at most `max_concurrency` in flight (a request due while they are is skipped and counted); a step
   * ends when its time is up and its requests have answered, and is recorded then.
   */
  private async perf(benchmark: BenchmarkStartedData, modelId: string, request: LoadRequest, config: PerfConfig, recordStep: (step: PerfStep) => Promise<void>): Promise<Record<string, unknown>> {
    const stepMs = (config.duration * 1000) / config.rps_steps.length
    const options = config.instance_type === 'all' ? {} : { instance_type: config.instance_type }
    let inFlight = 0
    const steps: PerfStep[] = []
    for (const [index, rps] of config.rps_steps.entries()) {
      if (this.stopped) throw new Error('the server shut down during the benchmark')
      const startedAt = this.deps.now().toISOString()
      const began = performance.now()
      const latencies: number[] = []
      const calls: Promise<void>[] = []
      let errors = 0
      let skipped = 0
      let sent = 0
      for (let due = 0; due < stepMs && !this.stopped; due += 1000 / rps) {
        const wait = began + due - performance.now()
        if (wait > 0) await sleep(wait)
        if (inFlight >= config.max_concurrency) {
          skipped++
          continue
        }
        inFlight++
        const i = sent++
        const t0 = performance.now()
        calls.push(
          request('POST', '/api/v1/inference', { model_id: modelId, project_id: benchmark.project_id, input: { data: inputOf(i), shape: [1, MODEL.inputs] }, options })
            .then((r) => (r.status === 200 ? void latencies.push(performance.now() - t0) : void errors++), () => void errors++)
            .finally(() => inFlight--),
        )
      }
      const remaining = began + stepMs - performance.now()
      if (remaining > 0) await sleep(remaining)
      await Promise.all(calls)
      const seconds = (performance.now() - began) / 1000
      const step: PerfStep = {
        index,
        target_rps: rps,
        achieved_rps: round(latencies.length / seconds),
        requests: sent,
        completed: latencies.length,
        errors,
        skipped,
        latency_ms: percentiles(latencies),
        started_at: startedAt,
        ended_at: this.deps.now().toISOString(),
      }
      steps.push(step)
      await recordStep(step)
    }
    const total = steps.reduce((n, s) => n + s.requests, 0)
    return {
      steps: steps.length,
      requests: total,
      completed: steps.reduce((n, s) => n + s.completed, 0),
      errors: steps.reduce((n, s) => n + s.errors, 0),
      skipped: steps.reduce((n, s) => n + s.skipped, 0),
      max_achieved_rps: Math.max(...steps.map((s) => s.achieved_rps)),
    }
  }

  /** The benchmark model, registered for the customer (one file in the blob store, a new model each run). */
  private async uploadModel(customerId: string): Promise<string> {
    const bytes = mlpOnnxModel({ ...MODEL, seed: 1 })
    const pending = await this.deps.blobs.write(Readable.from([bytes]))
    await pending.keep()
    const info = inspectModelFile(bytes, 'onnx')
    const at = this.deps.now().toISOString()
    const model: ModelDescription = {
      model_id: `model_bench${this.deps.now().getTime().toString(36)}${Math.random().toString(36).slice(2, 6)}`,
      customer_id: customerId,
      name: 'benchmark MLP 16-32-4',
      format: 'onnx',
      size: bytes.length,
      checksum: `sha256:${pending.sha256}`,
      input_shape: info.inputs[0]?.shape ?? null,
      output_shape: info.outputs[0]?.shape ?? null,
      inputs: info.inputs,
      outputs: info.outputs,
      input_schema: null,
      output_schema: null,
      labels: null,
      preprocessing: null,
      postprocessing: null,
      adapter_options: null,
      validation: null,
      validation_tolerance: null,
      max_batch_size: null,
      max_queue_delay_ms: null,
      uploaded_at: at,
    }
    const uploaded = await handleCommand(this.deps.store, modelStream(model.model_id), modelDecider, { type: 'UploadModel', model }, { metadata: { customerId, occurredAt: at } })
    await this.deps.waitFor(uploaded.position)
    return model.model_id
  }
}

/** Input `i` of the benchmark: 16 deterministic values in [-1, 1). */
function inputOf(i: number): number[] {
  let seed = (i + 1) * 2654435761
  return Array.from({ length: MODEL.inputs }, () => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31
    return Math.round(((seed / 2 ** 31) * 2 - 1) * 1000) / 1000
  })
}

const round = (x: number) => Math.round(x * 100) / 100
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

/** Nearest-rank percentiles of the latencies, in ms (nulls when there are none). */
export function percentiles(values: number[]): PerfStep['latency_ms'] {
  if (values.length === 0) return { p50: null, p90: null, p95: null, p99: null, mean: null }
  const sorted = [...values].sort((a, b) => a - b)
  const at = (p: number) => round(sorted[Math.min(sorted.length - 1, Math.ceil(p * sorted.length) - 1)]!)
  return { p50: at(0.5), p90: at(0.9), p95: at(0.95), p99: at(0.99), mean: round(sorted.reduce((a, b) => a + b, 0) / sorted.length) }
}

