/**
 * Python devices: a TorchScript MLP (BENCH_PY_INPUTS inputs, default 64; two hidden layers of
 * BENCH_PY_HIDDEN, default 256, ReLU; 10 outputs), built by torch in the bench, over a batch of
 * BENCH_PY_BATCH inputs (default 20,000).
 *
 * - baseline: what a user would write instead of dcp, in one Python process (the managed environment's):
 *   `torch.jit.load` the file, then `model(x)` for each input in turn under `torch.no_grad()`, torch's
 *   default threads, after 200 calls of warm-up. Timed inside that process (loading and JSON excluded).
 * - dcp: `dcp start --workers 0 --python-workers 2` as a child process against the bench's database (two
 *   real `python -m dcp_device` processes), the model uploaded with the development key, both devices
 *   warmed up with a small batch; then POST /inference/batch with the inputs, timed until the job reports
 *   `completed` (polled every BENCH_POLL_MS, default 150). Every result is read back: each index exactly once
 *   and completed, every 100th equal to the baseline's output within 1e-5.
 *
 * The CPU the server, the devices (its children), Postgres and the bench used during the batch is printed.
 * RESULT ratio = dcp inputs/s / baseline inputs/s.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { runPython, TORCH_PRELUDE } from '../test/helpers/torch.js'
import { api, startDcp, stopDcp } from './dcp-process.js'
import { cpuSplit, waitForDevices } from './inference.js'
import type { BenchContext } from './run.js'

const INPUTS = Number(process.env.BENCH_PY_INPUTS ?? 64)
const HIDDEN = Number(process.env.BENCH_PY_HIDDEN ?? 256)
const OUTPUTS = 10
const BATCH = Number(process.env.BENCH_PY_BATCH ?? 20_000)
const POLL_MS = Number(process.env.BENCH_POLL_MS ?? 150)
const BATCH_TIMEOUT_MS = 30 * 60_000
const SAMPLE_EVERY = 100
const PAGE = 10_000
const TOLERANCE = 1e-5

type Log = (line: string) => void
const fixed = (x: number, digits = 2) => (Number.isFinite(x) ? x.toFixed(digits) : 'NaN')
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

/** Input `i`: deterministic values in [-1, 1) with three decimals (short JSON keeps the batch body small). */
function inputOf(i: number): number[] {
  let seed = (i + 1) * 2654435761
  return Array.from({ length: INPUTS }, () => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31
    return Math.floor((seed / 2 ** 31) * 2000) / 1000 - 1
  })
}

/** The TorchScript file, as torch.jit.save writes it. */
async function buildModel(): Promise<Buffer> {
  const b64 = await runPython<string>(`${TORCH_PRELUDE}
torch.manual_seed(5)
n, h, o = args
m = torch.nn.Sequential(torch.nn.Linear(n, h), torch.nn.ReLU(), torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, o))
print(json.dumps(save(torch.jit.script(m))))`, [INPUTS, HIDDEN, OUTPUTS])
  return Buffer.from(b64, 'base64')
}

/** The torch loop in one Python process: inputs/s, and the outputs of every SAMPLE_EVERY-th input. */
async function baseline(model: Buffer, inputs: number[][], log: Log): Promise<{ inputsPerS: number; sampled: Map<number, number[]> }> {
  const out = await runPython<{ seconds: number; threads: number; sampled: [number, number[]][] }>(`import base64, io, json, sys, time
import torch
args = json.load(sys.stdin)
m = torch.jit.load(io.BytesIO(base64.b64decode(args['model'])))
xs = [torch.tensor([x], dtype=torch.float32) for x in args['inputs']]
every = args['every']
with torch.no_grad():
    for x in xs[:200]:
        m(x)
    started = time.perf_counter()
    outputs = [m(x) for x in xs]
    seconds = time.perf_counter() - started
print(json.dumps({'seconds': seconds, 'threads': torch.get_num_threads(), 'sampled': [[i, outputs[i].reshape(-1).tolist()] for i in range(0, len(xs), every)]}))`, { model: model.toString('base64'), inputs, every: SAMPLE_EVERY })
  const inputsPerS = inputs.length / out.seconds
  log(`baseline: torch.jit.load + model(x) for ${inputs.length} inputs one by one in one process (${out.threads} torch threads): ${fixed(out.seconds, 2)} s = ${fixed(inputsPerS, 0)} inputs/s`)
  return { inputsPerS, sampled: new Map(out.sampled) }
}

async function uploadTorchScript(base: string, bytes: Buffer): Promise<string> {
  const form = new FormData()
  form.append('name', 'bench-mlp')
  form.append('format', 'torchscript')
  form.append('model', new Blob([bytes]), 'mlp.pt')
  const response = await api(base, 'POST', '/models', form)
  if (response.status !== 201) throw new Error(`model upload: ${response.status} ${JSON.stringify(response.body)}`)
  return response.body.id as string
}

/** POSTs a batch and waits for `completed`: its job id and the seconds from POST to completion. */
async function runBatch(base: string, modelId: string, inputs: number[][], log: Log, what: string, onAccepted: () => void = () => {}): Promise<{ jobId: string; seconds: number; acceptS: number; firstS: number }> {
  const body = JSON.stringify({ model_id: modelId, name: what, inputs: inputs.map((data) => ({ data, shape: [1, INPUTS] })) })
  const started = performance.now()
  const queued = await api(base, 'POST', '/inference/batch', body)
  if (queued.status !== 202) throw new Error(`${what}: ${queued.status} ${JSON.stringify(queued.body).slice(0, 500)}`)
  const acceptS = (performance.now() - started) / 1000
  onAccepted()
  const jobId = queued.body.job_id as string
  let lastLog = performance.now()
  let firstS = NaN
  for (;;) {
    const { status, body: job } = await api(base, 'GET', `/inference/${jobId}?limit=1`)
    if (status !== 200) throw new Error(`${what}: GET /inference/${jobId}: ${status} ${JSON.stringify(job)}`)
    const now = performance.now()
    if (Number.isNaN(firstS) && job.progress.completed > 0) firstS = (now - started) / 1000
    if (job.status === 'completed') return { jobId, seconds: (now - started) / 1000, acceptS, firstS }
    if (job.status === 'failed' || job.status === 'cancelled') throw new Error(`${what}: the job ended ${job.status} (${JSON.stringify(job.progress)})`)
    if (now - lastLog > 5000) {
      log(`  ${what}: ${fixed((now - started) / 1000, 0)} s: ${job.progress.completed} completed`)
      lastLog = now
    }
    if (now - started > BATCH_TIMEOUT_MS) throw new Error(`${what}: not completed within ${BATCH_TIMEOUT_MS / 1000} s`)
    await sleep(POLL_MS)
  }
}

/** Every index exactly once and completed; the sampled ones equal to the baseline's outputs. */
async function verify(base: string, jobId: string, n: number, sampled: Map<number, number[]>, log: Log): Promise<void> {
  const seen = new Uint8Array(n)
  const problems: string[] = []
  let compared = 0
  for (let offset = 0; offset < n; offset += PAGE) {
    const { status, body } = await api(base, 'GET', `/inference/${jobId}?limit=${PAGE}&offset=${offset}`)
    if (status !== 200) throw new Error(`results page at ${offset}: ${status} ${JSON.stringify(body).slice(0, 300)}`)
    for (const r of body.results as { index: number; status: string; result?: { data: number[] } }[]) {
      if (!(r.index >= 0 && r.index < n)) problems.push(`index ${r.index} out of range`)
      else if (seen[r.index]!++) problems.push(`index ${r.index} more than once`)
      if (r.status !== 'completed') problems.push(`index ${r.index} is ${r.status}`)
      const want = sampled.get(r.index)
      if (want && r.result) {
        compared++
        if (!(r.result.data.length === want.length && r.result.data.every((v, i) => Math.abs(v - want[i]!) <= TOLERANCE))) problems.push(`index ${r.index}: ${r.result.data} != torch ${want}`)
      }
    }
  }
  const missing = seen.reduce((count, s) => count + (s === 0 ? 1 : 0), 0)
  if (missing > 0) problems.push(`${missing} indices have no result`)
  if (compared < sampled.size) problems.push(`only ${compared} of ${sampled.size} sampled results compared`)
  if (problems.length > 0) throw new Error(`${problems.length} problems in the results, the first: ${problems.slice(0, 5).join('; ')}`)
  log(`dcp: every index has exactly one completed result; ${compared} sampled results equal torch's within ${TOLERANCE}`)
}

export async function pythonBench({ database, log }: BenchContext): Promise<string> {
  const model = await buildModel()
  const inputs = Array.from({ length: BATCH }, (_, i) => inputOf(i))
  log(`python: TorchScript MLP ${INPUTS}->${HIDDEN}->${HIDDEN}->${OUTPUTS} (${model.length} B); a batch of ${BATCH} inputs`)
  const loop = await baseline(model, inputs, log)

  const dataDir = await mkdtemp(path.join(tmpdir(), 'dcp-bench-python-'))
  const started = performance.now()
  const { child, url } = await startDcp(database.url, dataDir, log, { workers: 0, pythonWorkers: 2 })
  try {
    const modelId = await uploadTorchScript(url, model)
    await waitForDevices(url, 2, 120_000)
    log(`dcp: model ${modelId} uploaded, 2 Python devices online ${fixed((performance.now() - started) / 1000, 1)} s after the start`)
    const warm = await runBatch(url, modelId, inputs.slice(0, 200), log, 'warm-up')
    log(`dcp: warm-up batch of 200 in ${fixed(warm.seconds, 2)} s (both devices load the model)`)
    const watched = { serverPid: child.pid!, postgresPort: new URL(database.url).port || '5432' }
    let cpu = cpuSplit(watched)
    const batch = await runBatch(url, modelId, inputs, log, 'batch', () => {
      log(`dcp: batch accepted; until then ${cpu()}`)
      cpu = cpuSplit(watched)
    })
    const perS = BATCH / batch.seconds
    log(`dcp: batch of ${BATCH} completed ${fixed(batch.seconds, 2)} s after the POST (accepted after ${fixed(batch.acceptS, 2)} s, first results seen after ${fixed(batch.firstS, 2)} s) = ${fixed(perS, 0)} inputs/s; since accepted ${cpu()}`)
    await verify(url, batch.jobId, BATCH, loop.sampled, log)
    return `RESULT name=python inputs_per_s=${fixed(perS, 0)} baseline_inputs_per_s=${fixed(loop.inputsPerS, 0)} ratio=${fixed(perS / loop.inputsPerS, 3)}`
  } finally {
    const exit = await stopDcp(child)
    log(`dcp: stopped (exit ${exit})`)
    await rm(dataDir, { recursive: true, force: true }).catch(() => {})
  }
}
