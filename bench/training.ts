/**
 * Training: time to accuracy of a 2-layer MLP (BENCH_TRAIN_INPUTS inputs, default 32; BENCH_TRAIN_HIDDEN
 * hidden units, default 128, Relu; 4 classes, Softmax) on the seeded synthetic 4-class task (BENCH_TRAIN_CLUSTERS
 * clusters per class, default 8: not linearly separable), to a validation
 * accuracy of BENCH_TRAIN_TARGET (default 0.9), Adam at 0.001, batches of 32, the accuracy checked every 50
 * steps on 1,000 held-out samples.
 *
 * - baseline: the same trainer in this process with no platform: sample a batch, step, and every 50 steps
 *   check the accuracy, until the target (the median of BENCH_TRAIN_REPEATS runs, default 3).
 * - dcp: `dcp start --workers 0` as a child process with one, then two, `dcp worker` processes; a job
 *   (async FedAvg, 50 local steps) with the same seed, model and settings, from POST /training to the
 *   job's `completed_at` (the server's clock, so polling adds nothing), model downloads included.
 *
 * RESULT ratio = baseline_s / tta_1_s (1: the platform adds nothing to one device's training).
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { createOptimizer, evaluate, loadTrainable, syntheticTask, trainStep } from '../src/sdk/trainer/index.js'
import { mixSeeds } from '../src/sdk/trainer/random.js'
import { mlpOnnxModel } from '../test/helpers/onnx.js'
import { api, DCP_BIN, startDcp, stopDcp } from './dcp-process.js'
import type { BenchContext } from './run.js'

const INPUTS = Number(process.env.BENCH_TRAIN_INPUTS ?? 32)
const HIDDEN = Number(process.env.BENCH_TRAIN_HIDDEN ?? 128)
const OUTPUTS = 4
const CLUSTERS = Number(process.env.BENCH_TRAIN_CLUSTERS ?? 8)
const TARGET = Number(process.env.BENCH_TRAIN_TARGET ?? 0.9)
const REPEATS = Number(process.env.BENCH_TRAIN_REPEATS ?? 3)
const SEED = 1234
const BATCH = 32
const LOCAL_STEPS = 50
const LEARNING_RATE = 0.001
const VALIDATION = 1000
const MAX_STEPS = 200_000

type Log = (line: string) => void
const fixed = (x: number, digits = 2) => x.toFixed(digits)
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

/** The trainer alone: seconds and steps to the target. */
function baselineRun(model: Buffer, run: number): { seconds: number; steps: number; accuracy: number } {
  const started = performance.now()
  const trainable = loadTrainable(model)
  const task = syntheticTask({ inputs: INPUTS, outputs: OUTPUTS, seed: SEED, clustersPerClass: CLUSTERS })
  const validation = task.validationSet(VALIDATION)
  const optimizer = createOptimizer('adam', LEARNING_RATE)
  for (let step = 1; step <= MAX_STEPS; step++) {
    const batch = task.sample(BATCH, mixSeeds(run, step))
    trainStep(trainable, optimizer, batch.x, batch.labels, 'cross_entropy')
    if (step % LOCAL_STEPS !== 0) continue
    const { accuracy } = evaluate(trainable, validation.x, validation.labels, { loss: 'cross_entropy' })
    if (accuracy >= TARGET) return { seconds: (performance.now() - started) / 1000, steps: step, accuracy }
  }
  throw new Error(`the baseline did not reach ${TARGET} in ${MAX_STEPS} steps`)
}

/** One job on `devices` workers: seconds from submission to completion by the server's clock. */
async function platformRun(url: string, modelId: string, devices: number, log: Log): Promise<{ seconds: number; rounds: number; batches: number; accuracy: number }> {
  const body = {
    model_id: modelId,
    data_config: { type: 'stream', total_samples: 1_000_000, batch_size: BATCH, seed: SEED, clusters_per_class: CLUSTERS },
    training_config: { epochs: 10, learning_rate: LEARNING_RATE, optimizer: 'adam', target_accuracy: TARGET, sync_mode: 'async', local_steps: LOCAL_STEPS },
    resource_config: { min_devices: devices, max_devices: devices },
  }
  const submitted = await api(url, 'POST', '/training', JSON.stringify(body))
  if (submitted.status !== 202) throw new Error(`POST /training: ${submitted.status} ${JSON.stringify(submitted.body)}`)
  const jobId = submitted.body.job_id as string
  for (const deadline = Date.now() + 600_000; Date.now() < deadline; await sleep(100)) {
    const { body: job } = await api(url, 'GET', `/training/${jobId}`)
    if (job.status === 'queued' || job.status === 'running') continue
    if (job.status !== 'completed' || job.end_reason !== 'target_accuracy') throw new Error(`job ${jobId} ended ${job.status} (${job.end_reason ?? job.error})`)
    const seconds = (Date.parse(job.completed_at) - Date.parse(job.created_at)) / 1000
    log(`dcp, ${devices} device(s): ${fixed(seconds)} s to ${fixed(job.validation_accuracy, 3)} in ${job.progress.rounds} rounds, ${job.progress.batches_completed} batches`)
    return { seconds, rounds: job.progress.rounds, batches: job.progress.batches_completed, accuracy: job.validation_accuracy }
  }
  throw new Error(`job ${jobId} did not finish in 10 minutes`)
}

export async function trainingBench({ database, log }: BenchContext): Promise<string> {
  const model = mlpOnnxModel({ inputs: INPUTS, hidden: HIDDEN, outputs: OUTPUTS, seed: 1 })
  log(`model: MLP ${INPUTS}-${HIDDEN}-${OUTPUTS}, ${CLUSTERS} clusters per class, target accuracy ${TARGET}, batches of ${BATCH}, Adam ${LEARNING_RATE}, checked every ${LOCAL_STEPS} steps`)
  const runs = Array.from({ length: REPEATS }, (_, i) => baselineRun(model, i + 1))
  for (const [i, r] of runs.entries()) log(`baseline run ${i + 1}: ${fixed(r.seconds, 3)} s, ${r.steps} steps, accuracy ${fixed(r.accuracy, 3)}`)
  const baseline = [...runs].sort((a, b) => a.seconds - b.seconds)[Math.floor(runs.length / 2)]!

  const dataDir = await mkdtemp(path.join(tmpdir(), 'dcp-bench-training-'))
  const { child, url } = await startDcp(database.url, dataDir, log, { workers: 0 })
  const workers: ChildProcess[] = []
  const startWorker = () => workers.push(spawn(process.execPath, [DCP_BIN, 'worker', '--server', url, '--state-dir', path.join(dataDir, `worker-${workers.length}`)], { stdio: 'ignore' }))
  const idle = async (n: number) => {
    for (const deadline = Date.now() + 60_000; Date.now() < deadline; await sleep(200)) if ((await api(url, 'GET', '/devices/stats')).body.idle >= n) return
    throw new Error(`${n} workers did not connect`)
  }
  try {
    const form = new FormData()
    form.append('name', 'bench-mlp')
    form.append('model', new Blob([model]), 'mlp.onnx')
    const uploaded = await api(url, 'POST', '/models', form)
    if (uploaded.status !== 201) throw new Error(`model upload: ${uploaded.status} ${JSON.stringify(uploaded.body)}`)
    startWorker()
    await idle(1)
    const one = await platformRun(url, uploaded.body.id, 1, log)
    startWorker()
    await idle(2)
    const two = await platformRun(url, uploaded.body.id, 2, log)
    const ratio = baseline.seconds / one.seconds
    log(`baseline ${fixed(baseline.seconds, 3)} s (${baseline.steps} steps); dcp ${fixed(one.seconds)} s on one device (${one.batches} batches), ${fixed(two.seconds)} s on two (${two.batches} batches)`)
    return `RESULT name=training baseline_s=${fixed(baseline.seconds, 3)} tta_1_s=${fixed(one.seconds, 3)} tta_2_s=${fixed(two.seconds, 3)} baseline_steps=${baseline.steps} batches_1=${one.batches} batches_2=${two.batches} ratio=${fixed(ratio, 3)}`
  } finally {
    workers.forEach((w) => w.exitCode === null && w.kill('SIGTERM'))
    await stopDcp(child)
    await rm(dataDir, { recursive: true, force: true })
  }
}
