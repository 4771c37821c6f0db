/**
 * Trust: 4 honest contributed devices (real `dcp worker --instance-type user` processes) and 1 that answers
 * with perturbed outputs (a device played in this process over a real socket: test/helpers/liar.ts).
 *
 * - baseline: a BENCH_TRUST_INPUTS-input batch (default 20,000) with `validation: none` on the 4 honest
 *   devices only (the liar not yet connected).
 * - dcp: the same batch with `validation: quorum` with the liar connected: every result from a contributed
 *   device runs again on another one, disagreements go to a third run, the liar is outvoted and quarantined.
 *
 * Every result of the quorum run is compared with onnxruntime in this process (`wrong_results`); `disputed`
 * is the liar's outvoted runs and `quarantined` the devices the platform quarantined, from `GET /devices/:id`.
 * Targets (issue #20): wrong_results=0, quarantined=1, ratio >= 0.4.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import * as ort from 'onnxruntime-node'
import { playDevice } from '../test/helpers/liar.js'
import { denseOnnxModel } from '../test/helpers/onnx.js'
import { api, DCP_BIN, startDcp, stopDcp } from './dcp-process.js'
import { uploadModel, waitForDevices } from './inference.js'
import type { BenchContext } from './run.js'

const INPUTS = Number(process.env.BENCH_TRUST_INPUTS ?? 20_000)
const HONEST = 4
const PAGE = 10_000
const TOLERANCE = 1e-4
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))
const fixed = (x: number, digits = 2) => (Number.isFinite(x) ? x.toFixed(digits) : 'NaN')

const inputOf = (i: number) => Array.from({ length: 10 }, (_, j) => (((i + 1) * 7919 + j * 104729) % 1000) / 1000)

/** POSTs the batch and waits for its end; seconds from the POST to `completed`. */
async function runBatch(base: string, modelId: string, validation: 'none' | 'quorum', log: (line: string) => void): Promise<{ jobId: string; seconds: number }> {
  const body = JSON.stringify({ model_id: modelId, name: `trust-${validation}`, inputs: Array.from({ length: INPUTS }, (_, i) => ({ data: inputOf(i), shape: [1, 10] })), options: { validation } })
  const started = performance.now()
  const queued = await api(base, 'POST', '/inference/batch', body)
  if (queued.status !== 202) throw new Error(`batch refused: ${queued.status} ${JSON.stringify(queued.body).slice(0, 300)}`)
  for (;;) {
    const { body: job } = await api(base, 'GET', `/inference/${queued.body.job_id}?limit=1`)
    if (job.status === 'completed' || job.status === 'failed') {
      const seconds = (performance.now() - started) / 1000
      log(`${validation}: ${job.status} in ${fixed(seconds)} s (${JSON.stringify(job.progress)})`)
      if (job.status !== 'completed') throw new Error(`the ${validation} batch ended ${job.status}`)
      return { jobId: queued.body.job_id, seconds }
    }
    await sleep(200)
  }
}

/** Results that differ from onnxruntime's (or are missing). */
async function wrongResults(base: string, jobId: string, session: ort.InferenceSession): Promise<number> {
  let wrong = 0
  let seen = 0
  for (let offset = 0; offset < INPUTS; offset += PAGE) {
    const { body } = await api(base, 'GET', `/inference/${jobId}?limit=${PAGE}&offset=${offset}`)
    for (const r of body.results as { index: number; result?: { data: number[] } }[]) {
      seen++
      const out = await session.run({ input: new ort.Tensor('float32', Float32Array.from(inputOf(r.index)), [1, 10]) })
      const want = Array.from(out.output!.data as Float32Array)
      const got = r.result?.data
      if (!got || got.length !== want.length || got.some((v, i) => Math.abs(v - want[i]!) > TOLERANCE * Math.max(Math.abs(v), Math.abs(want[i]!)) + 1e-6)) wrong++
    }
  }
  return wrong + (INPUTS - seen)
}

export async function trustBench({ database, log }: BenchContext): Promise<string> {
  const bytes = denseOnnxModel({ inputs: 10, outputs: 2 })
  const session = await ort.InferenceSession.create(bytes)
  const dataDir = await mkdtemp(path.join(tmpdir(), 'dcp-bench-trust-'))
  const { child, url } = await startDcp(database.url, dataDir, log, { workers: 0 })
  const workers: ChildProcess[] = []
  try {
    const modelId = await uploadModel(url, bytes)
    for (let i = 0; i < HONEST; i++) {
      workers.push(spawn(process.execPath, [DCP_BIN, 'worker', '--server', url, '--state-dir', path.join(dataDir, `w${i}`), '--instance-type', 'user', '--max-tasks', '1', '--no-train'], { stdio: 'ignore' }))
    }
    await waitForDevices(url, HONEST, 60_000)
    log(`trust: ${HONEST} honest contributed workers online; batch of ${INPUTS} inputs`)
    await runBatch(url, modelId, 'none', log) // warm-up: the model downloaded and loaded on every worker, the server's paths hot
    const baseline = await runBatch(url, modelId, 'none', log)
    const liar = await playDevice(url, bytes, 'perturb', { batchInputs: 256, maxTasks: 1 })
    await waitForDevices(url, HONEST + 1, 30_000)
    log(`trust: the liar ${liar.deviceId} is connected`)
    const quorum = await runBatch(url, modelId, 'quorum', log)
    const wrong = await wrongResults(url, quorum.jobId, session)
    const { body: devices } = await api(url, 'GET', '/devices?limit=100')
    let quarantined = 0
    let disputed = 0
    for (const d of devices.devices as { id: string }[]) {
      const { body: device } = await api(url, 'GET', `/devices/${d.id}`)
      if (device.quarantined) quarantined++
      disputed += device.reputation?.disputed ?? 0
    }
    liar.stop()
    liar.device.kill()
    const inputsPerS = INPUTS / quorum.seconds
    const baselinePerS = INPUTS / baseline.seconds
    log(`trust: quorum ${fixed(inputsPerS, 0)} inputs/s against none on the honest devices ${fixed(baselinePerS, 0)} inputs/s; the liar answered ${liar.tasks} tasks`)
    return `RESULT name=trust wrong_results=${wrong} disputed=${disputed} quarantined=${quarantined} inputs_per_s=${fixed(inputsPerS, 0)} baseline_inputs_per_s=${fixed(baselinePerS, 0)} ratio=${fixed(inputsPerS / baselinePerS, 3)}`
  } finally {
    workers.forEach((w) => w.kill('SIGTERM'))
    await stopDcp(child)
    await session.release()
    await rm(dataDir, { recursive: true, force: true }).catch(() => {})
  }
}
