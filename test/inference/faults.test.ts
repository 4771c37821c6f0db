import { spawn } from 'node:child_process'
import { readFile } from 'node:fs/promises'
import path from 'node:path'
import t, { type Test } from 'tap'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import { multipart } from '../helpers/app.js'
import { eventually, SimDevice } from '../helpers/device.js'
import { serverFixture, startServerProcess } from '../helpers/server.js'
import { allEvents } from '../helpers/events.js'
import { close, DCP_BIN, inferenceSetup, input } from '../helpers/inference.js'
import { denseOnnxModel } from '../helpers/onnx.js'
import * as ort from 'onnxruntime-node'

/** Each task of the job completed exactly once, and every index has its result, equal to onnxruntime's. */
async function checkExactlyOnce(t: Test, store: PostgresEventStore, body: { results: { index: number; status: string; result: { data: number[] } }[] }, total: number, direct: (data: number[]) => Promise<number[]>) {
  t.same(body.results.map((r) => r.index), [...Array(total).keys()], 'one result per input, in order')
  let same = 0
  for (const r of body.results) if (r.status === 'completed' && close(r.result.data, await direct(input(r.index)))) same++
  t.equal(same, total, 'every result equals onnxruntime on its input')
  const completions = new Map<string, number>()
  for (const e of await allEvents(store)) if (e.type === 'TaskCompleted') completions.set(e.streamId, (completions.get(e.streamId) ?? 0) + 1)
  t.ok([...completions.values()].every((n) => n === 1), 'no task completed twice')
  return completions
}

/**
 * A server process on its own database and data directory that a test may kill and start again, the
 * development key's `api`, and a model (Gemm 10->2) uploaded to it once it is up with `direct` to compare.
 */
async function restartableServer(t: Test, name: string, leaseTimeoutMs: string) {
  const { database, dataDir, port, url, children } = await serverFixture(t, name)
  const env = { ...process.env, DATABASE_URL: database.url, DATA_DIR: dataDir, LOG_LEVEL: 'warn', HEARTBEAT_INTERVAL_MS: '1000', LEASE_TIMEOUT_MS: leaseTimeoutMs }
  const startServer = () => startServerProcess({ port, env, children })
  const api = async (method: string, route: string, payload?: unknown) => {
    const response = await fetch(`${url}/api/v1${route}`, { method, headers: { 'x-api-key': 'test-api-key', ...(payload ? { 'content-type': 'application/json' } : {}) }, ...(payload ? { body: JSON.stringify(payload) } : {}) })
    return { status: response.status, body: (await response.json()) as any }
  }
  const bytes = denseOnnxModel({ inputs: 10, outputs: 2 })
  const session = await ort.InferenceSession.create(bytes)
  const direct = async (data: number[]) => Array.from((await session.run({ input: new ort.Tensor('float32', Float32Array.from(data), [1, 10]) })).output!.data as Float32Array)
  /** Uploads the model (the server must be up). */
  const uploadModel = async () => {
    const form = multipart({ name }, { name: 'm.onnx', content: bytes })
    return (await (await fetch(`${url}/api/v1/models`, { method: 'POST', headers: { ...form.headers, 'x-api-key': 'test-api-key' }, body: form.payload })).json()) as { id: string }
  }
  return { database, dataDir, url, children, startServer, api, direct, uploadModel }
}

t.test('a batch of 1,000 with a worker killed in the middle completes with every result exactly once', async (t) => {
  const { api, model, direct, store, workers, dir } = await inferenceSetup(t, { workers: 2 })
  const victim = JSON.parse(await readFile(path.join(dir, 'w0', 'device.json'), 'utf8')).device_id as string
  const inputs = Array.from({ length: 1000 }, (_, i) => ({ data: input(i), shape: [1, 10] }))
  const queued = await api('POST', '/inference/batch', { model_id: model.id, inputs })
  t.equal(queued.status, 202)
  // Kill the first worker as soon as it holds a lease: it is downloading the model or running the task.
  await eventually(async () => (await allEvents(store)).some((e) => e.type === 'TaskLeased' && (e.data as { device_id: string }).device_id === victim), 20_000, 'a lease on the victim', 5)
  workers[0]!.kill('SIGKILL')
  const done = await eventually(async () => {
    const r = await api('GET', `/inference/${queued.body.job_id}?limit=1000`)
    return r.body.status === 'completed' ? r.body : undefined
  }, 90_000, 'batch completion')
  t.match(done.progress, { completed: 1000, failed: 0, pending: 0 })
  const completions = await checkExactlyOnce(t, store, done, 1000, direct)
  t.ok(completions.size > 1, `the batch ran as ${completions.size} tasks of several inputs`)
  const events = await allEvents(store)
  const lost = events.filter((e) => e.type === 'TaskAttemptFailed').map((e) => e.data as { device_id: string; requeued: boolean }).filter((d) => d.device_id === victim)
  t.ok(lost.length >= 1, 'the killed worker lost its task, which ran again elsewhere')
  t.ok(lost.every((d) => d.requeued === true))
})

t.test('cancelling a batch midway: finished inputs keep their results, the rest stop', async (t) => {
  const { api, model, direct, url } = await inferenceSetup(t, { workers: 1 })
  const stuck = await SimDevice.connect(url) // takes a task and never answers
  t.teardown(() => stuck.kill())
  await stuck.register({ batchInputs: 1024 })
  const inputs = Array.from({ length: 200 }, (_, i) => ({ data: input(i), shape: [1, 10] }))
  const queued = await api('POST', '/inference/batch', { model_id: model.id, inputs })
  // the stuck device holds what the scheduler gives it: the tasks it runs at once and those it prefetches
  const heldTasks = () => stuck.frames.filter((f) => f.type === 'task')
  // alive but stuck: it keeps listing its leases, so they do not expire and move elsewhere
  const beat = setInterval(() => stuck.heartbeat(heldTasks().map((f) => f.lease_id)), 500)
  t.teardown(() => clearInterval(beat))
  const heldInputs = () => heldTasks().reduce((n, f) => n + (f.inputs ?? [f.input]).length, 0)
  await stuck.next((f) => f.type === 'task')
  const running = await eventually(async () => {
    const r = await api('GET', `/inference/${queued.body.job_id}?limit=1000`)
    return r.body.progress.completed === 200 - heldInputs() ? r.body : undefined
  }, 30_000, 'all but the stuck tasks done')
  const held = heldTasks()
  const held_inputs = heldInputs()
  t.ok(held_inputs > 0 && held_inputs < 200, `the stuck device holds ${held.length} tasks, ${held_inputs} inputs`)
  t.equal(running.status, 'running')
  const cancelled = await api('DELETE', `/inference/${queued.body.job_id}`)
  t.equal(cancelled.status, 200)
  const cancels = await eventually(async () => {
    const frames = stuck.frames.filter((f) => f.type === 'cancel_task')
    return frames.length >= held.length ? frames : undefined
  }, 10_000, 'a cancel for every held task')
  t.same(cancels.map((f) => `${f.task_id}/${f.lease_id}`).sort(), held.map((f) => `${f.task_id}/${f.lease_id}`).sort(), 'each held task is cancelled under its lease')
  const after = (await api('GET', `/inference/${queued.body.job_id}?limit=1000`)).body
  t.equal(after.status, 'cancelled')
  t.match(after.progress, { completed: 200 - held_inputs, failed: 0, pending: 0 })
  const statuses = new Set(after.results.filter((r: { status: string }) => r.status !== 'completed').map((r: { status: string }) => r.status))
  t.same([...statuses], ['cancelled'])
  let same = 0
  for (const r of after.results) if (r.status === 'completed' && close(r.result.data, await direct(input(r.index)))) same++
  t.equal(same, 200 - held_inputs, 'the finished inputs keep their results')
  // A result the stuck device sends anyway is refused: the lease is gone.
  const late = held[0]
  stuck.send({ type: 'task_result', task_id: late.task_id, lease_id: late.lease_id, status: 'completed', outputs: (late.inputs ?? [late.input]).map(() => ({ data: [0.5, 0.5], shape: [1, 2] })), metrics: { cpu_ms: 1, gpu_ms: 0, bytes_in: 0, bytes_out: 0 } })
  t.match(await stuck.next((f) => f.type === 'error'), { code: 'STALE_LEASE' }, 'the late result is refused (and now handled: too late to count)')
  t.equal((await api('GET', `/inference/${queued.body.job_id}`)).body.progress.completed, 200 - held_inputs)
})

t.test('the server killed mid-batch, two tasks completed and leases outstanding: after a restart the batch completes, nothing lost, nothing run twice', async (t) => {
  const { database, dataDir, url, children, startServer, api, direct, uploadModel } = await restartableServer(t, 'restart', '5000')
  let server = await startServer()
  const model = await uploadModel()

  // before the kill, the only device: it runs tasks of 100 inputs, answers the first two it is given (with
  // onnxruntime's outputs) and holds the rest, alive (its heartbeats keep the leases)
  const device = await SimDevice.connect(url)
  t.teardown(() => device.kill())
  await device.register({ maxTasks: 2, batchInputs: 100 })
  const given = () => device.frames.filter((f) => f.type === 'task')
  const beat = setInterval(() => device.heartbeat(given().map((f) => f.lease_id)), 500)
  t.teardown(() => clearInterval(beat))
  const total = 1000
  const inputs = Array.from({ length: total }, (_, i) => ({ data: input(i), shape: [1, 10] }))
  const queued = await api('POST', '/inference/batch', { model_id: model.id, inputs })
  t.equal(queued.status, 202)
  await eventually(async () => given().length >= 2, 20_000, 'two tasks on the device')
  const answered = given().slice(0, 2)
  for (const frame of answered) {
    const outputs = await Promise.all((frame.inputs as { data: number[] }[]).map(async (x) => ({ data: await direct(x.data), shape: [1, 2] })))
    device.send({ type: 'task_result', task_id: frame.task_id, lease_id: frame.lease_id, status: 'completed', outputs, metrics: { cpu_ms: 1, gpu_ms: 0, bytes_in: 0, bytes_out: 0 } })
  }
  // the log as the kill finds it: the two completions recorded, other tasks under leases not yet ended
  const store = new PostgresEventStore(database.pool)
  const atKill = async () => {
    const last = new Map<string, string>()
    let completed = 0
    for (const e of await allEvents(store)) {
      if (!e.streamId.startsWith('task-')) continue
      last.set(e.streamId, e.type)
      if (e.type === 'TaskCompleted') completed++
    }
    return { completed, leased: [...last].filter(([, type]) => type === 'TaskLeased').map(([stream]) => stream) }
  }
  const before = await eventually(async () => {
    const log = await atKill()
    return log.completed === 2 ? log : undefined
  }, 20_000, 'the two completions in the log')
  t.equal(before.completed, 2, 'two tasks completed before the kill')
  t.ok(before.leased.length >= 1, `${before.leased.length} tasks leased and not ended before the kill`)
  server.kill('SIGKILL')
  await new Promise((resolve) => server.once('exit', resolve))
  const killed = await atKill()
  t.equal(killed.completed, 2, 'the log after the kill: exactly two completions')
  t.ok(killed.leased.length >= 1, 'and leases outstanding')
  clearInterval(beat)
  device.kill()

  // after the restart two real workers finish the batch; the held leases expire and their tasks run again
  server = await startServer()
  for (const name of ['a', 'b']) {
    children.push(spawn(process.execPath, [DCP_BIN, 'worker', '--server', url, '--state-dir', path.join(dataDir, `worker-${name}`)], { stdio: 'ignore' }))
  }
  const done = await eventually(async () => {
    const r = await api('GET', `/inference/${queued.body.job_id}?limit=1000`)
    return r.body.status === 'completed' ? r.body : undefined
  }, 90_000, 'the batch to complete after the restart')
  const reasons = [...new Set(done.results.filter((r: { status: string }) => r.status !== 'completed').map((r: { error: string | null }) => r.error))]
  t.match(done.progress, { completed: total, failed: 0, pending: 0 }, `every input completed${reasons.length ? `; failures: ${reasons.join(' | ')}` : ''}`)
  await checkExactlyOnce(t, store, done, total, direct)
  for (const frame of answered) {
    t.same((await store.readStream(`task-${frame.task_id}`)).map((e) => e.type), ['TaskQueued', 'TaskLeased', 'TaskCompleted'], `${frame.task_id}, completed before the kill, was not run again`)
  }
  for (const stream of killed.leased) {
    const events = await store.readStream(stream)
    const completion = events.find((e) => e.type === 'TaskCompleted')
    const by = (completion?.data as { device_id?: string } | undefined)?.device_id
    t.ok(by !== undefined && by !== device.deviceId, `${stream}, held at the kill, completed by a worker after it (${by})`)
  }
  server.kill('SIGINT')
})

t.test('the server killed with merged device tasks in flight (one answered, one held): after a restart every job completes once, the answered ones not again', async (t) => {
  const { database, dataDir, url, children, startServer, api, direct, uploadModel } = await restartableServer(t, 'merged', '3000')
  let server = await startServer()
  const model = await uploadModel()

  // the only device before the kill: one task at a time and one more held (mergeable work waits in the queue
  // beyond that); it answers what it is told to
  const device = await SimDevice.connect(url)
  t.teardown(() => device.kill())
  await device.register({ maxTasks: 1, batchInputs: 64 })
  const given = () => device.frames.filter((f) => f.type === 'task')
  const beat = setInterval(() => device.heartbeat(given().map((f) => f.lease_id)), 300)
  t.teardown(() => clearInterval(beat))
  const answer = async (frame: any) => {
    const inputs: { data: number[] }[] = frame.inputs ?? [frame.input]
    const outputs = await Promise.all(inputs.map(async (x) => ({ data: await direct(x.data), shape: [1, 2] })))
    device.send({ type: 'task_result', task_id: frame.task_id, lease_id: frame.lease_id, status: 'completed', ...(frame.inputs ? { outputs } : { output: outputs[0] }), metrics: { cpu_ms: 3, gpu_ms: 0, bytes_in: 0, bytes_out: 0 } })
  }
  const jobs: { id: string; seed: number }[] = []
  const submit = async (seeds: number[]) => {
    const answers = await Promise.all(seeds.map((seed) => api('POST', '/inference?async=true', { model_id: model.id, input: { data: input(seed), shape: [1, 10] } })))
    answers.forEach((a, i) => jobs.push({ id: a.body.job_id, seed: seeds[i]! }))
  }
  // two alone while the device has room, then twenty queued behind them, merged when a slot frees
  for (let i = 0; i < 2; i++) await submit([i])
  await eventually(async () => given().length === 2, 10_000, 'two single tasks on the device')
  await submit(Array.from({ length: 20 }, (_, i) => 2 + i))
  await answer(given()[0])
  const merged = (n: number) => eventually(async () => given().filter((f) => f.inputs).length >= n && given().filter((f) => f.inputs)[n - 1], 10_000, `merged device task ${n}`)
  const first = await merged(1)
  await submit(Array.from({ length: 20 }, (_, i) => 22 + i))
  await answer(given()[1])
  const second = await merged(2)
  t.ok(first.inputs.length > 1 && second.inputs.length > 1, `two merged device tasks (${first.inputs.length} and ${second.inputs.length} inputs)`)
  await answer(first)

  const store = new PostgresEventStore(database.pool)
  const leasedUnder = async (leaseId: string) => (await allEvents(store)).filter((e) => e.type === 'TaskLeased' && (e.data as { lease_id: string }).lease_id === leaseId).map((e) => e.streamId)
  const firstTasks = await leasedUnder(first.lease_id)
  const secondTasks = await leasedUnder(second.lease_id)
  t.equal(firstTasks.length, first.inputs.length, 'each input of the first merged task is a task leased under its lease')
  await eventually(async () => {
    const events = await allEvents(store)
    return firstTasks.every((stream) => events.some((e) => e.streamId === stream && e.type === 'TaskCompleted'))
  }, 20_000, 'the answered merged task recorded')
  server.kill('SIGKILL')
  await new Promise((resolve) => server.once('exit', resolve))
  clearInterval(beat)
  device.kill()

  server = await startServer()
  for (const name of ['a', 'b']) {
    children.push(spawn(process.execPath, [DCP_BIN, 'worker', '--server', url, '--state-dir', path.join(dataDir, `worker-${name}`)], { stdio: 'ignore' }))
  }
  for (const job of jobs) {
    const done = await eventually(async () => {
      const r = await api('GET', `/inference/${job.id}`)
      return r.body.status === 'completed' ? r.body : undefined
    }, 60_000, `job ${job.id} to complete after the restart`)
    t.ok(close(done.result.data, await direct(input(job.seed))), `job ${job.seed}: its own input's result`)
  }
  const events = await allEvents(store)
  const completions = new Map<string, number>()
  for (const e of events) if (e.type === 'TaskCompleted') completions.set(e.streamId, (completions.get(e.streamId) ?? 0) + 1)
  t.equal(completions.size, jobs.length, 'every job\'s task completed')
  t.ok([...completions.values()].every((n) => n === 1), 'none twice')
  for (const stream of firstTasks) t.same(events.filter((e) => e.streamId === stream).map((e) => e.type), ['TaskQueued', 'TaskLeased', 'TaskCompleted'], `${stream}: answered before the kill, not run again`)
  for (const stream of secondTasks) {
    const completion = events.find((e) => e.streamId === stream && e.type === 'TaskCompleted')
    t.ok(completion && (completion.data as { device_id: string }).device_id !== device.deviceId, `${stream}: held at the kill, completed by a worker after it`)
  }
  server.kill('SIGINT')
})

t.test('a server shut down while a sync request waits and a live stream is open: both end at once, the server exits, the job runs after the restart', async (t) => {
  const { database, dataDir, port, url, children } = await serverFixture(t, 'shutdown')
  const env = { ...process.env, DATABASE_URL: database.url, DATA_DIR: dataDir, LOG_LEVEL: 'warn' }
  const headers = { 'x-api-key': 'test-api-key', 'content-type': 'application/json' }
  let server = await startServerProcess({ port, env, children })
  const form = multipart({ name: 'shutdown' }, { name: 'm.onnx', content: denseOnnxModel({ inputs: 10, outputs: 2 }) })
  const model = (await (await fetch(`${url}/api/v1/models`, { method: 'POST', headers: { ...form.headers, 'x-api-key': 'test-api-key' }, body: form.payload })).json()) as { id: string }
  // a device that takes the task and never answers, alive (its heartbeats keep the lease)
  const stuck = await SimDevice.connect(url)
  t.teardown(() => stuck.kill())
  await stuck.register()
  const beat = setInterval(() => stuck.heartbeat(stuck.frames.filter((f) => f.type === 'task').map((f) => f.lease_id)), 500)
  t.teardown(() => clearInterval(beat))
  // a sync request that would wait ten minutes, and a live project stream that would run for as long
  const project = (await (await fetch(`${url}/api/v1/projects`, { method: 'POST', headers, body: JSON.stringify({ name: 'live', type: 'realtime' }) })).json()) as { project_id: string }
  const stream = await fetch(`${url}/api/v1/dashboard/projects/${project.project_id}/stream?interval=60000`, { headers })
  t.equal(stream.status, 200)
  const streamText = stream.text()
  const sync = fetch(`${url}/api/v1/inference`, { method: 'POST', headers, body: JSON.stringify({ model_id: model.id, input: { data: input(0), shape: [1, 10] }, options: { timeout: 600_000 } }) })
  await stuck.next((f) => f.type === 'task')

  // each within seconds (a regression would otherwise wait out the ten minutes)
  const within = <T>(promise: Promise<T>, what: string) =>
    Promise.race([promise, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`${what}: not within 20 s of the SIGINT`)), 20_000))])
  const stopped = Date.now()
  server.kill('SIGINT')
  const answer = await within(sync, 'the sync answer')
  const body = (await answer.json()) as { error: { code: string; message: string } }
  t.equal(answer.status, 503)
  t.equal(body.error.code, 'SERVICE_UNAVAILABLE')
  const jobId = /poll \/api\/v1\/inference\/(\S+)$/.exec(body.error.message)?.[1]
  t.ok(jobId, `the answer says where to poll (${body.error.message})`)
  t.match(await within(streamText, 'the end of the stream'), /event: stats/, 'the stream ended')
  const code = await within(new Promise<number | null>((resolve) => server.once('exit', resolve)), 'the exit')
  t.equal(code, 0)
  t.ok(Date.now() - stopped < 15_000, `the server stopped in ${Date.now() - stopped} ms`)

  // the job was kept: after a restart a worker runs it
  server = await startServerProcess({ port, env, children })
  children.push(spawn(process.execPath, [DCP_BIN, 'worker', '--server', url, '--state-dir', path.join(dataDir, 'worker')], { stdio: 'ignore' }))
  const done = await eventually(async () => {
    const r = (await (await fetch(`${url}/api/v1/inference/${jobId}`, { headers })).json()) as { status: string; result?: { data: number[] } }
    return r.status === 'completed' ? r : undefined
  }, 60_000, 'the job to complete after the restart')
  t.equal(done.result?.data.length, 2, 'with its result')
  server.kill('SIGINT')
})
