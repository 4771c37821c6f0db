import { performance } from 'node:perf_hooks'
import { setImmediate as nextTurn } from 'node:timers/promises'
import { parseDataset, splitDataset } from '../datasets/parse.js'
import { weightsFromBase64, weightsToBase64 } from '../domain/fedavg.js'
import { type DeviceFrame, errorText, minUpdateIntervalMs, type TrainData, type TrainStart, type TrainWeights } from '../protocol/frames.js'
import { createOptimizer, type Labels, loadTrainable, type LossKind, syntheticTask, type TrainableModel, trainStep } from './trainer/index.js'
import { mixSeeds, Random } from './trainer/random.js'

/** A source of training batches. */
export interface Batches {
  next(size: number): { x: Float32Array; labels: Labels }
}

export interface TrainingSessionOptions {
  frame: TrainStart
  modelBytes: Uint8Array
  /** The dataset file, for a dataset job. */
  datasetBytes?: Uint8Array
  send(frame: DeviceFrame): boolean
  powerWatts(): number
  log(level: 'info' | 'warn', message: string): void
}

/** Async mode: how long a device waits for the mixed weights after an update before training on from its own. */
const ASYNC_REPLY_WAIT_MS = 2000
/** Training keeps the event loop for at most this long at a time (heartbeats and frames go on meanwhile). */
const SLICE_MS = 20

/**
 * One device's part of a federated training job: train `local_steps` batches from the job's weights, send
 * the new weights and the samples seen, and go on. In the sync modes it waits for the next round's weights
 * first; in async mode it trains on and pulls the job's weights every `sync_interval_ms`.
 */
export class TrainingSession {
  readonly jobId: string
  private readonly model: TrainableModel
  private readonly batches: Batches
  private readonly loss: LossKind
  private baseRound: number
  private latest: TrainWeights | undefined
  private stopped = false
  private wake: (() => void) | undefined
  private endPause: (() => void) | undefined
  private pullTimer: NodeJS.Timeout | undefined
  readonly finished: Promise<void>

  constructor(private readonly options: TrainingSessionOptions) {
    const frame = options.frame
    this.jobId = frame.job_id
    this.model = loadTrainable(options.modelBytes)
    if (frame.weights) this.model.setWeights(weightsFromBase64(frame.weights))
    this.baseRound = frame.round
    this.loss = frame.config.loss
    this.batches = batchesFor(frame.data, this.model, this.loss, options.datasetBytes)
    if (frame.config.sync_mode === 'async') {
      this.pullTimer = setInterval(() => options.send({ type: 'weights_request', job_id: this.jobId }), frame.config.sync_interval_ms)
      this.pullTimer.unref()
    }
    this.finished = this.run().catch((error: Error) => {
      options.log('warn', `training ${this.jobId} stopped: ${error.message}`)
      if (!this.stopped) options.send({ type: 'train_error', job_id: this.jobId, error: errorText(error) })
      this.stop()
    })
  }

  /** New weights from the hub: the next round starts from them. */
  weights(frame: TrainWeights): void {
    if (!this.latest || frame.round >= this.latest.round) this.latest = frame
    this.wake?.()
  }

  stop(): void {
    this.stopped = true
    clearInterval(this.pullTimer)
    this.wake?.()
    this.endPause?.()
  }

  private async run(): Promise<void> {
    const config = this.options.frame.config
    const optimizer = createOptimizer(config.optimizer, config.learning_rate)
    const sync = config.sync_mode !== 'async'
    while (!this.stopped) {
      this.adoptLatest()
      const cpuBefore = process.cpuUsage()
      const started = performance.now()
      let sliceStart = started
      let lossSum = 0
      let steps = 0
      for (; steps < config.local_steps && !this.stopped; steps++) {
        const batch = this.batches.next(config.batch_size)
        lossSum += trainStep(this.model, optimizer, batch.x, batch.labels, this.loss)
        if (performance.now() - sliceStart > SLICE_MS) {
          await nextTurn()
          sliceStart = performance.now()
        }
      }
      if (this.stopped || steps === 0) return
      this.options.send({
        type: 'train_update',
        job_id: this.jobId,
        base_round: this.baseRound,
        weights: weightsToBase64(this.model.getWeights()),
        samples: steps * config.batch_size,
        steps,
        loss: lossSum / steps,
        // the process's CPU time over the local steps (a training device runs no inference meanwhile)
        metrics: { cpu_ms: cpuMs(process.cpuUsage(cpuBefore)), gpu_ms: 0, wall_ms: performance.now() - started },
        power_watts: this.options.powerWatts(),
      })
      // the weight sync: sync modes wait for the round's weights; async waits a moment for the mixed weights
      // the hub answers every update with, and trains on from its own if they are late
      await this.untilNewerRound(sync ? Infinity : ASYNC_REPLY_WAIT_MS)
      // async: the hub refuses a device's updates closer together than this; counted from the reply, which
      // comes after the hub took the update
      if (!sync) await this.pause(minUpdateIntervalMs(config.sync_interval_ms))
    }
  }

  private async pause(ms: number): Promise<void> {
    if (ms <= 0 || this.stopped) return
    // only stop ends it early (new weights do not: the update would come too soon)
    await new Promise<void>((resolve) => {
      this.endPause = resolve
      setTimeout(resolve, ms).unref()
    })
    this.endPause = undefined
  }

  private adoptLatest(): void {
    const latest = this.latest
    if (!latest || latest.round < this.baseRound) return
    this.latest = undefined
    this.model.setWeights(weightsFromBase64(latest.weights))
    this.baseRound = latest.round
  }

  private async untilNewerRound(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs
    while (!this.stopped && !(this.latest && this.latest.round > this.baseRound) && Date.now() < deadline) {
      await new Promise<void>((resolve) => {
        this.wake = resolve
        if (Number.isFinite(timeoutMs)) setTimeout(resolve, Math.max(0, deadline - Date.now())).unref()
      })
      this.wake = undefined
    }
  }
}

const cpuMs = (usage: NodeJS.CpuUsage) => (usage.user + usage.system) / 1000

/** Stream jobs draw batch n of the device's stream from seed (stream_seed, n); dataset jobs walk their shard in shuffled passes. */
function batchesFor(data: TrainData, model: TrainableModel, loss: LossKind, datasetBytes: Uint8Array | undefined): Batches {
  if (data.type === 'stream') {
    const task = syntheticTask({ inputs: model.inputSize, outputs: model.outputSize, seed: data.task_seed, kind: loss === 'mse' ? 'regression' : 'classification', clustersPerClass: data.clusters_per_class })
    let n = 0
    return { next: (size) => task.sample(size, mixSeeds(data.stream_seed, n++)) }
  }
  if (!datasetBytes) throw new Error('a dataset job without its dataset')
  const { train } = splitDataset(parseDataset(datasetBytes, data.format), { validationFraction: data.validation_fraction, seed: data.split_seed })
  const features = train.columns
  const start = Math.min(data.start, train.rows)
  const rows = Math.max(1, Math.min(data.end, train.rows) - start)
  const random = new Random(mixSeeds(data.split_seed, start))
  const order = Array.from({ length: rows }, (_, i) => start + i)
  let at = rows
  return {
    next(size) {
      const x = new Float32Array(size * features)
      const labels = loss === 'mse' ? new Float32Array(size) : new Int32Array(size)
      for (let i = 0; i < size; i++) {
        if (at >= rows) {
          shuffle(order, random)
          at = 0
        }
        const row = order[at++]!
        x.set(train.features.subarray(row * features, (row + 1) * features), i * features)
        labels[i] = train.labels[row]!
      }
      return { x, labels }
    },
  }
}

function shuffle(values: number[], random: Random): void {
  for (let i = values.length - 1; i > 0; i--) {
    const j = Math.floor(random.next() * (i + 1))
    ;[values[i], values[j]] = [values[j]!, values[i]!]
  }
}
