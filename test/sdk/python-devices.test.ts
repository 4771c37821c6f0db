import { spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import t, { type Test } from 'tap'
import { PROJECT_ROOT } from '../../src/commands/torch-tool.js'
import { type Position, START } from '../../src/event-store/port.js'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import { trainingStream } from '../../src/domain/training-job.js'
import { listeningApp } from '../helpers/app.js'
import { eventually } from '../helpers/device.js'
import { DCP_BIN } from '../helpers/inference.js'
import { denseOnnxModel } from '../helpers/onnx.js'
import { freshDatabase } from '../helpers/database.js'
import { close, runPython, TORCH_PRELUDE, testPython } from '../helpers/torch.js'
import { MLP, trainingBody } from '../helpers/training.js'

/**
 * Python devices end to end: a real server, real `python -m dcp_device` processes (this checkout's
 * sdk/python, run by the managed environment's python), real torch on both sides.
 */

const SDK_SOURCES = path.join(PROJECT_ROOT, 'sdk', 'python')

/**
 * `python -m dcp_device --verbose` against `url`, its identity in `stateDir`, killed when the test ends. Its
 * output is kept (for failure messages). `killOn(pattern)`: SIGKILL as soon as an output line matches (in
 * the handler that reads it, so the device gets no further than that line).
 */
function pythonDevice(t: Test, url: string, stateDir: string) {
  const env = { ...process.env, PYTHONPATH: SDK_SOURCES }
  const child = spawn(testPython(), ['-m', 'dcp_device', '--server', url.replace(/^http/, 'ws'), '--state-dir', stateDir, '--max-tasks', '2', '--verbose'], { env, stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  let trigger: { pattern: RegExp; resolve: (line: string) => void } | undefined
  const take = (chunk: Buffer) => {
    output += chunk
    const line = trigger && chunk.toString().split('\n').find((l) => trigger!.pattern.test(l))
    if (trigger && line) {
      child.kill('SIGKILL')
      trigger.resolve(line)
      trigger = undefined
    }
  }
  child.stdout!.on('data', take)
  child.stderr!.on('data', take)
  t.teardown(() => void (child.exitCode === null && child.signalCode === null && child.kill('SIGKILL')))
  const killOn = (pattern: RegExp) => new Promise<string>((resolve) => (trigger = { pattern, resolve }))
  return { child, output: () => output, killOn }
}

/** Per device, the inputs of a job's tasks it completed, and the devices whose leases on the job were returned (it went away holding them), from the log. */
async function jobOutcomes(store: PostgresEventStore, jobId: string) {
  const completed = new Map<string, number>()
  const returned = new Set<string>()
  for (let after: Position = START; ;) {
    const page = await store.readAll(after, 5000)
    if (page.length === 0) break
    after = page.at(-1)!.position
    for (const event of page) {
      const data = event.data as { job_id?: string; device_id?: string; inputs?: number }
      if (data.job_id !== jobId) continue
      if (event.type === 'TaskCompleted') completed.set(data.device_id!, (completed.get(data.device_id!) ?? 0) + (data.inputs ?? 1))
      if (event.type === 'TaskLeaseReturned') returned.add(data.device_id!)
    }
  }
  return { completed, returned }
}

/** A TorchScript file built by torch itself from `code` (a Python expression for the module, after `torch.manual_seed`). */
async function torchScript(code: string, seed: number): Promise<Buffer> {
  const b64 = await runPython<string>(`${TORCH_PRELUDE}\ntorch.manual_seed(${seed})\nprint(json.dumps(save(torch.jit.script(${code}))))`)
  return Buffer.from(b64, 'base64')
}

/** `torch.jit.load(file)(x)` for each input, run directly in one Python process. */
function torchOutputs(file: Buffer, inputs: number[][]): Promise<number[][]> {
  return runPython(`${TORCH_PRELUDE}
m = load(args['model'])
with torch.no_grad():
    print(json.dumps([m(torch.tensor([x], dtype=torch.float32)).reshape(-1).tolist() for x in args['inputs']]))`, { model: file.toString('base64'), inputs })
}

/** `n` inputs of `width` values in [-1, 1], four decimals (short JSON). */
const inputsOf = (n: number, width: number, seed: number) => Array.from({ length: n }, (_, i) => Array.from({ length: width }, (_, j) => Math.round(Math.sin((i + 1) * (j + 3) * (seed + 0.7)) * 1e4) / 1e4))

/** A batch's results per input index. */
function byIndex(results: { index: number; status: string }[]) {
  const indexed = new Map<number, typeof results>()
  for (const r of results) indexed.set(r.index, [...(indexed.get(r.index) ?? []), r])
  return indexed
}

t.test('Python devices: TorchScript inference equals torch, a device killed mid-batch loses and doubles nothing, and a TorchScript training job for Python devices reaches its target and serves', async (t) => {
  const context = await listeningApp(t, { rateLimit: { max: 100_000, windowMs: 60_000 } }, { heartbeatIntervalMs: 5000, leaseTimeoutMs: 10_000, roundDeadlineMs: 20_000 })
  const { url, api, upload } = context
  const dir = await mkdtemp(path.join(tmpdir(), 'dcp-python-devices-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  const idlePython = async (n: number, what: string) =>
    eventually(async () => {
      const devices = ((await api('GET', '/devices')).body.devices as { id: string; platform: string; status: string }[]).filter((d) => d.platform === 'python' && d.status === 'idle')
      return devices.length === n ? devices : undefined
    }, 60_000, what, 100)
  const finished = (jobId: string, timeoutMs = 60_000) =>
    eventually(async () => {
      const job = (await api('GET', `/inference/${jobId}?limit=10000`)).body
      return ['completed', 'failed', 'cancelled'].includes(job.status) ? job : undefined
    }, timeoutMs, `inference job ${jobId}`, 50)

  // given one Python device (A), and models and their expected outputs made by torch itself
  const a = pythonDevice(t, url, path.join(dir, 'a'))
  const mlpCode = 'torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))'
  const heavyCode = 'torch.nn.Sequential(torch.nn.Linear(32, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 4))'
  const [mlpFile, heavyFile, trainFile] = await Promise.all([torchScript(mlpCode, 1), torchScript(heavyCode, 2), torchScript(`torch.nn.Sequential(torch.nn.Linear(${MLP.inputs}, ${MLP.hidden}), torch.nn.ReLU(), torch.nn.Linear(${MLP.hidden}, ${MLP.outputs}))`, 3)])
  const small = inputsOf(12, 4, 1)
  const heavyInputs = inputsOf(6000, 32, 2)
  const [smallExpected, heavyExpected] = await Promise.all([torchOutputs(mlpFile, small), torchOutputs(heavyFile, heavyInputs)])
  const mlp = await upload('mlp.pt', mlpFile)
  t.equal(mlp.format, 'torchscript')
  const [deviceA] = await idlePython(1, `Python device A to register (${a.output()})`)

  // a. sync, async and batch TorchScript inference equal torch.jit.load(...)(x)
  const sync = await api('POST', '/inference', { model_id: mlp.id, input: { data: small[0], shape: [1, 4] } })
  t.equal(sync.status, 200, JSON.stringify(sync.body))
  t.equal(sync.body.device_id, deviceA!.id)
  t.ok(close(sync.body.result.data, smallExpected[0]!, 1e-5), `sync ${sync.body.result.data} vs torch ${smallExpected[0]}`)
  const queued = await api('POST', '/inference', { model_id: mlp.id, input: { data: small[1], shape: [1, 4] }, async: true })
  t.equal(queued.status, 202, JSON.stringify(queued.body))
  const asyncDone = await finished(queued.body.job_id)
  t.equal(asyncDone.status, 'completed')
  t.ok(close(asyncDone.result.data, smallExpected[1]!, 1e-5), `async ${asyncDone.result.data} vs torch ${smallExpected[1]}`)
  const batch = await api('POST', '/inference/batch', { model_id: mlp.id, inputs: small.map((x) => ({ data: x, shape: [1, 4] })) })
  t.equal(batch.status, 202, JSON.stringify(batch.body))
  const batchDone = await finished(batch.body.job_id)
  t.equal(batchDone.status, 'completed')
  t.same(batchDone.results.map((r: any) => r.index), small.map((_, i) => i))
  t.ok(batchDone.results.every((r: any) => close(r.result.data, smallExpected[r.index]!, 1e-5)), 'every batch result equals torch within 1e-5')

  // d. SIGKILL of a Python device mid-batch: A alone works on a batch, and is killed when it logs its first
  // finished task (a result it may or may not have sent: kill -9 between computing and reporting)
  const heavy = await upload('heavy.pt', heavyFile)
  const killed = a.killOn(/task \S+ completed/)
  const big = await api('POST', '/inference/batch', { model_id: heavy.id, inputs: heavyInputs.map((x) => ({ data: x, shape: [1, 32] })) })
  t.equal(big.status, 202, JSON.stringify(big.body))
  await killed
  // then another Python device (B) connects and the batch completes on it
  const b = pythonDevice(t, url, path.join(dir, 'b'))
  const bigDone = await finished(big.body.job_id, 90_000)
  t.equal(bigDone.status, 'completed', JSON.stringify(bigDone.progress))
  const bigResults = byIndex(bigDone.results)
  t.equal(bigResults.size, heavyInputs.length, 'every input has a result')
  t.ok([...bigResults.values()].every((rs) => rs.length === 1 && rs[0]!.status === 'completed'), 'each exactly once, completed')
  t.ok(bigDone.results.every((r: any) => close(r.result.data, heavyExpected[r.index]!, 1e-5)), 'every result equals torch within 1e-5')
  const outcomes = await jobOutcomes(context.store, big.body.job_id)
  const deviceB = [...outcomes.completed.keys()].find((id) => id !== deviceA!.id)!
  t.ok(outcomes.returned.has(deviceA!.id), `A was killed holding leases of the batch, which were returned (completed: ${JSON.stringify([...outcomes.completed])})`)
  t.equal([...outcomes.completed.values()].reduce((x, y) => x + y, 0), heavyInputs.length, 'completed tasks cover the batch once')
  t.ok(deviceB && outcomes.completed.get(deviceB)! > 0, 'the rest ran on B')
  const usage = await eventually(async () => {
    const u = (await api('GET', `/usage/projects/${big.body.project_id}`)).body
    return u.inputs >= heavyInputs.length ? u : undefined
  }, 30_000, 'the batch usage', 100)
  t.equal(usage.inputs, heavyInputs.length, 'usage counts each input once')

  // b. A comes back from its state dir as the same device; a TorchScript training job for Python devices on A and B
  const again = pythonDevice(t, url, path.join(dir, 'a'))
  const both = await idlePython(2, `A back and B idle (${again.output()} ${b.output()})`)
  t.same(both.map((d) => d.id).sort(), [deviceA!.id, deviceB].sort(), 'A came back with its identity')
  const trainModel = await upload('classifier.pt', trainFile)
  const started = await api('POST', '/training', trainingBody(trainModel.id, {
    data: { total_samples: 1_000_000, seed: 4242 },
    training: { sync_mode: 'full_sync', loss: 'cross_entropy', target_accuracy: 0.9, local_steps: 10, epochs: 10, learning_rate: 0.01 },
    resources: { min_devices: 2, sdk_types: ['python'] },
  }))
  t.equal(started.status, 202, JSON.stringify(started.body))
  const trained = await eventually(async () => {
    const job = (await api('GET', `/training/${started.body.job_id}`)).body
    return job.status !== 'queued' && job.status !== 'running' ? job : undefined
  }, 90_000, 'the training job', 200)
  t.equal(trained.status, 'completed', JSON.stringify(trained))
  t.equal(trained.end_reason, 'target_accuracy')
  const rounds = (await context.store.readStream(trainingStream(started.body.job_id))).filter((e) => e.type === 'TrainingRoundCompleted').map((e) => e.data as any)
  t.ok(rounds.at(-1).accuracy >= 0.9, `validation accuracy ${rounds.at(-1).accuracy}`)
  const contributors = new Set(rounds.flatMap((r) => r.contributions.map((c: any) => c.device_id)))
  t.same([...contributors].sort(), [deviceA!.id, deviceB].sort(), `both Python devices trained (${JSON.stringify(rounds.map((r) => r.contributions.map((c: any) => c.device_id)))})`)
  t.ok(rounds.every((r) => r.contributions.every((c: any) => c.sdk_uuid.startsWith('sdk-python-'))), 'every contribution from a Python SDK')
  // and the trained model serves: sync inference answers what torch answers with the trained file
  const x = inputsOf(1, MLP.inputs, 9)
  const served = await api('POST', '/inference', { model_id: trained.trained_model_id, input: { data: x[0], shape: [1, MLP.inputs] } })
  t.equal(served.status, 200, JSON.stringify(served.body))
  const model = await api('GET', `/models/${trained.trained_model_id}`)
  t.equal(model.body.format, 'torchscript')
  const [want] = await torchOutputs(Buffer.from(await context.blobs.read(model.body.checksum.replace('sha256:', ''))), x)
  t.ok(close(served.body.result.data, want!, 1e-5), `trained model: ${served.body.result.data} vs torch ${want}`)
})

t.test('dcp start --workers 1 --python-workers 1: a mixed fleet shares an ONNX batch, the dashboard counts the Python device, Ctrl-C drains both', async (t) => {
  const database = await freshDatabase(t)
  const dataDir = await mkdtemp(path.join(tmpdir(), 'dcp-python-start-'))
  t.teardown(() => rm(dataDir, { recursive: true, force: true }))
  const env: NodeJS.ProcessEnv = { ...process.env, DATABASE_URL: database.url, DATA_DIR: dataDir, LOG_LEVEL: 'warn' }
  for (const name of ['EVENTSTORE_URL', 'NODE_ENV', 'WORKERS', 'PYTHON_WORKERS', 'DCP_PYTHON']) delete env[name]

  // without a Python it says what to do, before starting anything
  const refused = spawn(process.execPath, [DCP_BIN, 'start', '--python-workers', '1', '--port', '0'], { env: { ...env, DCP_PYTHON: path.join(dataDir, 'no-such-python') }, stdio: ['ignore', 'pipe', 'pipe'] })
  let refusal = ''
  refused.stderr!.on('data', (d) => (refusal += d))
  const refusedCode = await new Promise((resolve) => refused.on('exit', resolve))
  t.equal(refusedCode, 1)
  t.match(refusal, /--python-workers needs a Python.*npm run setup:python/)
  t.notMatch(refusal, /\n\s+at /, 'no stack trace')

  // the process group of its own (detached), as a terminal would run it
  const server = spawn(process.execPath, [DCP_BIN, 'start', '--workers', '1', '--python-workers', '1', '--port', '0', '--host', '127.0.0.1'], { env, stdio: ['ignore', 'pipe', 'pipe'], detached: true })
  t.teardown(() => void (server.exitCode === null && server.signalCode === null && process.kill(-server.pid!, 'SIGKILL')))
  let output = ''
  server.stdout!.on('data', (d) => (output += d))
  server.stderr!.on('data', (d) => (output += d))
  const port = await eventually(async () => /dcp listening on http:\/\/[^:]+:(\d+)\//.exec(output)?.[1], 60_000, 'dcp start to listen')
  const base = `http://127.0.0.1:${port}/api/v1`
  const api = async (method: string, route: string, payload?: unknown) => {
    const response = await fetch(`${base}${route}`, { method, headers: { 'x-api-key': 'test-api-key', ...(payload ? { 'content-type': 'application/json' } : {}) }, ...(payload ? { body: JSON.stringify(payload) } : {}) })
    return { status: response.status, body: (await response.json()) as any }
  }
  const devices = await eventually(async () => {
    const list = (await api('GET', '/devices')).body.devices as { id: string; platform: string; status: string; instance_type: string }[]
    return list.length === 2 && list.every((d) => d.status === 'idle') ? list : undefined
  }, 60_000, `a Node worker and a Python device idle (${output})`, 200)
  t.same(devices.map((d) => [d.platform, d.instance_type]).sort(), [['nodejs', 'aws'], ['python', 'aws']], 'both enrolled with the aws token dcp start made')
  t.match(output, /started 1 local Python device/)

  // e. the dashboard and the device stats count the Python device as python
  const dashboard = (await api('GET', '/dashboard/devices')).body
  t.match(dashboard.by_platform, { python: { total: 1, idle: 1 }, nodejs: { total: 1, idle: 1 } })
  t.match((await api('GET', '/devices/stats')).body.by_platform, { python: 1, nodejs: 1 })

  // c. an ONNX batch shared by both: every input's result exactly once, usage counts the batch's inputs
  const form = new FormData()
  form.append('name', 'dense')
  form.append('model', new Blob([denseOnnxModel({ inputs: 10, outputs: 2 })]), 'dense.onnx')
  const uploaded = await fetch(`${base}/models`, { method: 'POST', headers: { 'x-api-key': 'test-api-key' }, body: form })
  t.equal(uploaded.status, 201)
  const modelId = ((await uploaded.json()) as { id: string }).id
  const n = 2000
  const inputs = inputsOf(n, 10, 5)
  const batch = await api('POST', '/inference/batch', { model_id: modelId, inputs: inputs.map((x) => ({ data: x, shape: [1, 10] })) })
  t.equal(batch.status, 202, JSON.stringify(batch.body))
  const done = await eventually(async () => {
    const job = (await api('GET', `/inference/${batch.body.job_id}?limit=10000`)).body
    return job.status !== 'queued' && job.status !== 'running' ? job : undefined
  }, 90_000, 'the mixed batch', 100)
  t.equal(done.status, 'completed', JSON.stringify(done.progress))
  const results = byIndex(done.results)
  t.equal(results.size, n, 'every input has a result')
  t.ok([...results.values()].every((rs) => rs.length === 1 && rs[0]!.status === 'completed'), 'each exactly once')
  const { completed } = await jobOutcomes(new PostgresEventStore(database.pool), batch.body.job_id)
  t.same([...completed.keys()].sort(), devices.map((d) => d.id).sort(), `both devices took part (${JSON.stringify([...completed])})`)
  t.equal([...completed.values()].reduce((x, y) => x + y, 0), n, 'their completed tasks cover the batch once')
  const usage = await eventually(async () => {
    const u = (await api('GET', `/usage/projects/${batch.body.project_id}`)).body
    return u.inputs >= n ? u : undefined
  }, 30_000, 'the batch usage', 100)
  t.equal(usage.inputs, n, 'usage inputs equal the batch size')

  // Ctrl-C in the terminal (SIGINT to dcp start): it drains its devices and exits 0
  const exited = new Promise((resolve) => server.on('exit', resolve))
  server.kill('SIGINT')
  t.equal(await exited, 0, output)
  t.match(output, /dcp-device: SIGTERM, draining/, 'the Python device was asked once to drain')
})

/** Whether a process is gone (or a zombie no one has reaped yet). */
function gone(pid: number): boolean {
  try {
    return /^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, 'utf8'))
  } catch {
    return true
  }
}

t.test('dcp start killed without a chance to clean up (SIGKILL) leaves no Python device behind', async (t) => {
  const database = await freshDatabase(t)
  const dataDir = await mkdtemp(path.join(tmpdir(), 'dcp-python-orphan-'))
  t.teardown(() => rm(dataDir, { recursive: true, force: true }))
  const env: NodeJS.ProcessEnv = { ...process.env, DATABASE_URL: database.url, DATA_DIR: dataDir, LOG_LEVEL: 'warn' }
  for (const name of ['EVENTSTORE_URL', 'NODE_ENV', 'WORKERS', 'PYTHON_WORKERS', 'DCP_PYTHON']) delete env[name]
  const server = spawn(process.execPath, [DCP_BIN, 'start', '--workers', '0', '--python-workers', '1', '--port', '0', '--host', '127.0.0.1'], { env, stdio: ['ignore', 'pipe', 'pipe'], detached: true })
  let output = ''
  server.stdout!.on('data', (d) => (output += d))
  server.stderr!.on('data', (d) => (output += d))
  const devicePids: number[] = []
  t.teardown(() => {
    for (const pid of devicePids) if (!gone(pid)) process.kill(pid, 'SIGKILL')
    if (server.exitCode === null && server.signalCode === null) server.kill('SIGKILL')
  })
  await eventually(async () => /dcp-device: registered as/.test(output), 60_000, `the Python device to register (${output})`, 100)
  devicePids.push(...readFileSync(`/proc/${server.pid}/task/${server.pid}/children`, 'utf8').trim().split(/\s+/).map(Number))
  t.equal(devicePids.length, 1, 'one child: the Python device')
  t.match(readFileSync(`/proc/${devicePids[0]}/cmdline`, 'utf8'), /dcp_device/)

  // when dcp start dies by SIGKILL (its process group is its own: the device gets no signal)
  server.kill('SIGKILL')
  // then the device sees its stdin pipe close and stops
  await eventually(async () => gone(devicePids[0]!), 30_000, `the orphaned Python device to stop (${output})`, 50).catch(() => {})
  t.ok(gone(devicePids[0]!), 'the orphaned Python device stopped within 30 s of dcp start dying')
})
