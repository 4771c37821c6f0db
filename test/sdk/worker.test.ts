import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import * as ort from 'onnxruntime-node'
import t, { type Test } from 'tap'
import { PROTOCOL_VERSION, Register, type LogLine, type TaskAssignment } from '../../src/protocol/frames.js'
import { backoffDelay, DeviceWorker, type DeviceWorkerOptions, estimatePowerWatts } from '../../src/sdk/index.js'
import { denseOnnxModel } from '../helpers/onnx.js'
import { eventually } from '../helpers/device.js'
import { checksumOf, FakeHub, HUB_DEVICE_ID, HUB_TOKEN } from './fixtures/fake-hub.js'

const pkg = JSON.parse(await readFile(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }
const MODEL = denseOnnxModel({ inputs: 10, outputs: 2 })
const INPUT = { data: Array.from({ length: 20 }, (_, i) => i / 10 - 1), shape: [2, 10] }

/** What onnxruntime itself computes for `INPUT` on `model`. */
async function expectedOutput(model: Buffer, input = INPUT) {
  const session = await ort.InferenceSession.create(model)
  const out = (await session.run({ input: new ort.Tensor('float32', Float32Array.from(input.data), input.shape) })).output!
  const result = { data: Array.from(out.data as Float32Array), shape: out.dims.map(Number) }
  await session.release()
  return result
}

interface Setup {
  hub: FakeHub
  worker: DeviceWorker
  stateDir: string
  lines: LogLine[]
  newWorker: (options?: Partial<DeviceWorkerOptions>) => DeviceWorker
}

async function setup(t: Test, options: Partial<DeviceWorkerOptions> = {}): Promise<Setup> {
  const hub = await FakeHub.start()
  const stateDir = await mkdtemp(path.join(tmpdir(), 'dcp-sdk-'))
  const lines: LogLine[] = []
  const workers: DeviceWorker[] = []
  const newWorker = (more: Partial<DeviceWorkerOptions> = {}) => {
    const worker = new DeviceWorker({ server: hub.url, stateDir, log: (line) => lines.push(line), ...options, ...more })
    workers.push(worker)
    return worker
  }
  t.teardown(async () => {
    await Promise.all(workers.map((worker) => worker.stop({ drain: false })))
    await hub.close()
    await rm(stateDir, { recursive: true, force: true })
  })
  return { hub, worker: newWorker(), stateDir, lines, newWorker }
}

let taskCount = 0
function task(model: TaskAssignment['model'], input: TaskAssignment['input'] = INPUT, extra: Partial<TaskAssignment> = {}): TaskAssignment {
  const n = ++taskCount
  return {
    type: 'task',
    task_id: `task-${n}`,
    lease_id: `lease-${n}`,
    lease_deadline: new Date(Date.now() + 60_000).toISOString(),
    model,
    input,
    ...extra,
  }
}

t.test('registers, heartbeats its lease, runs a real model and downloads it once', async (t) => {
  const { hub, worker, stateDir } = await setup(t, { maxConcurrentTasks: 2 })
  await worker.start()
  t.equal(worker.deviceId, HUB_DEVICE_ID)
  t.ok(worker.connected)

  const register = Register.parse(await hub.next('register'))
  t.match(register, { protocol: PROTOCOL_VERSION, platform: 'nodejs', sdk_version: pkg.version, instance_type: 'user' })
  t.match(register.sdk_uuid, /^sdk-nodejs-[0-9a-f]{6}$/)
  t.same(register.capabilities, { formats: ['onnx'], gpu: false, can_train: true, max_concurrent_tasks: 2, max_batch_inputs: 1024 })
  t.same(register.hardware.gpus, [])
  t.ok(register.hardware.cpu_cores >= 1 && register.hardware.memory_mb >= 1)
  t.equal(register.device_id, undefined, 'a first registration has no device id')
  const saved = JSON.parse(await readFile(path.join(stateDir, 'device.json'), 'utf8'))
  t.same(saved, { sdk_uuid: register.sdk_uuid, device_id: HUB_DEVICE_ID, sdk_token: HUB_TOKEN })

  // The download is slow, so the task is held while a heartbeat goes out.
  hub.downloadDelayMs = 300
  const model = hub.addModel('m1', MODEL)
  const first = task(model)
  hub.send(first)
  const beat = await hub.next('heartbeat', (frame) => frame.leases.includes(first.lease_id))
  t.ok(beat.load >= 0 && beat.load <= 1 && beat.memory_used_mb > 0 && beat.power_watts > 0)

  const expected = await expectedOutput(MODEL)
  const result = await hub.next('task_result', (frame) => frame.task_id === first.task_id)
  t.match(result, { status: 'completed', lease_id: first.lease_id, output: expected })
  t.ok(result.metrics.cpu_ms > 0, `cpu_ms ${result.metrics.cpu_ms} > 0`)
  t.same({ ...result.metrics, cpu_ms: 0 }, { cpu_ms: 0, gpu_ms: 0, bytes_in: 4 * 20 + MODEL.length, bytes_out: 4 * 4 })
  t.same(await readdir(path.join(stateDir, 'models')), [checksumOf(MODEL).slice('sha256:'.length)])

  // Same checksum again: served from the cache, and the bytes in are the input's only.
  const second = task(model)
  hub.send(second)
  const again = await hub.next('task_result', (frame) => frame.task_id === second.task_id)
  t.match(again, { status: 'completed', output: expected, metrics: { bytes_in: 80, bytes_out: 16 } })
  t.equal(hub.downloads, 1, 'downloaded once')
  await hub.next('heartbeat', (frame) => frame.leases.length === 0, { from: again.index })
  t.same(hub.invalidFrames, [], 'every frame matched the protocol')
})

t.test('a bad download or a bad input fails the task, with the metrics so far', async (t) => {
  const { hub, worker, stateDir } = await setup(t)
  await worker.start()
  const tampered = Buffer.concat([MODEL, Buffer.from([0])])
  const mismatch = task(hub.addModel('m-bad', tampered, checksumOf(MODEL)))
  hub.send(mismatch)
  const failed = await hub.next('task_result', (frame) => frame.task_id === mismatch.task_id)
  t.match(failed, { status: 'failed', error: /checksum mismatch/, metrics: { bytes_in: 80 + tampered.length, bytes_out: 0 } })
  t.same(await readdir(path.join(stateDir, 'models')), [], 'nothing is cached, not even a temp file')

  const missing = task({ id: 'm-none', format: 'onnx', checksum: checksumOf(MODEL), download_path: '/nowhere' })
  hub.send(missing)
  t.match(await hub.next('task_result', (frame) => frame.task_id === missing.task_id), { status: 'failed', error: /HTTP 404/ })

  const model = hub.addModel('m1', MODEL)
  const badShape = task(model, { data: [1, 2, 3], shape: [1, 10] })
  hub.send(badShape)
  t.match(await hub.next('task_result', (frame) => frame.task_id === badShape.task_id), { status: 'failed', error: /needs 10 values, got 3/ })
  const badName = task(model, INPUT, { input_name: 'nope' })
  hub.send(badName)
  t.match(await hub.next('task_result', (frame) => frame.task_id === badName.task_id), { status: 'failed', error: /no input "nope"/ })
  const wrongWidth = task(model, { data: [1, 2, 3], shape: [1, 3] })
  hub.send(wrongWidth)
  const runtime = await hub.next('task_result', (frame) => frame.task_id === wrongWidth.task_id)
  t.match(runtime, { status: 'failed', metrics: { bytes_in: 12 } }, 'an onnxruntime error fails the task too')
  t.ok(runtime.error && runtime.error.length > 0)
})

t.test('ignores garbage from the hub and answers logs_request by level', async (t) => {
  const { hub, worker } = await setup(t)
  await worker.start()
  hub.send('not json')
  hub.send(JSON.stringify({ type: 'bogus' }))
  hub.send(JSON.stringify({ type: 'task', task_id: 'x' }))
  hub.send(Buffer.from([1, 2, 3]))
  hub.send({ type: 'error', code: 'SLOW_DOWN', message: 'too many frames' })
  hub.send({ type: 'logs_request', request_id: 'r1', lines: 3, level: 'warn' })
  const warnings = await hub.next('logs', (frame) => frame.request_id === 'r1')
  t.equal(warnings.lines.length, 3)
  t.ok(warnings.lines.every((line) => line.level === 'warn' || line.level === 'error'))
  t.match(warnings.lines.map((line) => line.message), [/invalid frame of type "task"/, /binary frame/, /hub error SLOW_DOWN: too many frames/])

  hub.send({ type: 'logs_request', request_id: 'r2', lines: 10_000, level: 'all' })
  const all = await hub.next('logs', (frame) => frame.request_id === 'r2')
  t.ok(all.lines.some((line) => line.level === 'info' && /registered as dev-1/.test(line.message)))
  t.ok(all.lines.some((line) => /not JSON/.test(line.message)))

  // Still the same connection, still working.
  const model = hub.addModel('m1', MODEL)
  const after = task(model)
  hub.send(after)
  t.match(await hub.next('task_result', (frame) => frame.task_id === after.task_id), { status: 'completed' })
  t.equal(hub.sockets.length, 1)
})

t.test('reconnects after the socket drops, and a restart comes back as the same device', async (t) => {
  const { hub, worker, newWorker } = await setup(t)
  await worker.start()
  const first = await hub.next('register')
  const disconnected = new Promise((resolve) => worker.once('disconnected', resolve))
  hub.drop()
  t.match(await disconnected, { code: 1006, reconnectInMs: Number })
  const back = await hub.next('register', () => true, { from: first.index + 1 })
  t.match(back, { connection: 2, device_id: HUB_DEVICE_ID, sdk_token: HUB_TOKEN, sdk_uuid: first.sdk_uuid })
  await new Promise((resolve) => (worker.connected ? resolve(null) : worker.once('registered', resolve)))
  await worker.stop({ drain: false })

  const restarted = newWorker()
  await restarted.start()
  const third = await hub.next('register', () => true, { from: back.index + 1 })
  t.match(third, { device_id: HUB_DEVICE_ID, sdk_token: HUB_TOKEN, sdk_uuid: first.sdk_uuid })
})

t.test('close 4401 stops the retries: start() rejects, or `fatal` fires once registered', async (t) => {
  const { hub, worker, newWorker } = await setup(t)
  hub.refuse = true
  await t.rejects(worker.start(), /refused the enrollment token or secret, or the SDK token \(code 4401/)
  await sleep(600)
  t.equal(hub.sockets.length, 1, 'no retry after 4401')

  hub.refuse = false
  const other = newWorker()
  await other.start()
  const fatal = new Promise((resolve) => other.once('fatal', resolve))
  hub.refuse = true
  hub.drop()
  t.match(await fatal, /code 4401/)
  await t.rejects(other.finished, /4401/)
})

t.test('runs at most max_concurrent_tasks at once; cancel_task drops queued and running tasks', async (t) => {
  const { hub, worker } = await setup(t, { maxConcurrentTasks: 2 })
  await worker.start()
  hub.downloadDelayMs = 200
  const tasks = [1, 2, 3].map((seed) => task(hub.addModel(`m${seed}`, denseOnnxModel({ seed }))))
  for (const each of tasks) hub.send(each)
  for (const each of tasks) t.match(await hub.next('task_result', (frame) => frame.task_id === each.task_id), { status: 'completed' })
  t.equal(hub.maxDownloadsInFlight, 2)

  // One at a time now: A runs (slow download), B and C wait; cancel B (queued) and A (running).
  const slow = await setup(t, { maxConcurrentTasks: 1 })
  await slow.worker.start()
  slow.hub.downloadDelayMs = 300
  const model = slow.hub.addModel('m1', MODEL)
  const [a, b, c] = [task(model), task(model), task(model)]
  for (const each of [a, b, c]) slow.hub.send(each)
  await slow.hub.next('heartbeat', (frame) => frame.leases.length === 3)
  for (const each of [b, a]) slow.hub.send({ type: 'cancel_task', task_id: each.task_id, lease_id: each.lease_id })
  const beat = await slow.hub.next('heartbeat', (frame) => frame.leases.length === 1)
  t.same(beat.leases, [c.lease_id])
  await slow.hub.next('task_result', (frame) => frame.task_id === c.task_id)
  await sleep(100)
  t.same(
    slow.hub.frames.filter((frame) => frame.type === 'task_result').map((frame) => frame.type === 'task_result' && frame.task_id),
    [c.task_id],
    'only the task left uncancelled reports',
  )
})

t.test('a result finished while disconnected: the first heartbeat after reconnecting lists its lease, then it is sent', async (t) => {
  const { hub, worker } = await setup(t)
  await worker.start()
  hub.downloadDelayMs = 300
  const held = task(hub.addModel('m1', MODEL))
  const received = new Promise((resolve) => worker.once('task', resolve))
  hub.send(held)
  await received
  hub.registrationDelayMs = 1500 // the next registration is answered late: the task ends before it
  const from = hub.frames.length
  const finished = new Promise((resolve) => worker.once('result', resolve))
  hub.drop()
  await finished
  const beat = await hub.next('heartbeat', (frame) => (frame as { connection?: number }).connection === 2, { from })
  t.same(beat.leases, [held.lease_id], 'the lease of the result it still has to send: the hub must not end it')
  const result = await hub.next('task_result', () => true, { from })
  t.match(result, { connection: 2, task_id: held.task_id, lease_id: held.lease_id, status: 'completed' })
  const registered = await hub.next('register', () => true, { from })
  t.ok(registered.index < beat.index && beat.index < result.index, 'register, heartbeat, then the result: nothing but register goes out before the hub answers (it would refuse it)')
})

t.test('a task leased again after a reconnect: the worker goes on with it under the new lease', async (t) => {
  const { hub, worker } = await setup(t)
  await worker.start()
  hub.downloadDelayMs = 1200 // the task is held (waiting for its model) across the reconnect
  const first = task(hub.addModel('m1', MODEL))
  const received = new Promise((resolve) => worker.once('task', resolve))
  hub.send(first)
  await received
  const from = hub.frames.length
  hub.drop() // the hub ends the socket's leases, and leases the task again when the device is back
  const beat = await hub.next('heartbeat', (frame) => (frame as { connection?: number }).connection === 2, { from })
  t.same(beat.leases, [first.lease_id], 'it still holds the task under the old lease')
  const again = { ...first, lease_id: `${first.lease_id}_2` }
  const sent = hub.frames.length
  hub.send(again)
  const listed = await hub.next('heartbeat', (frame) => frame.leases.includes(again.lease_id), { from: sent })
  t.same(listed.leases, [again.lease_id], 'heartbeats list the new lease, not the old one')
  const result = await hub.next('task_result', () => true, { from })
  t.match(result, { connection: 2, task_id: first.task_id, lease_id: again.lease_id, status: 'completed' }, 'the result carries the new lease')
  // too late for a second run now: a heartbeat after the result lists nothing held (a second run would be
  // listed until it ended, and its result would come before that heartbeat on the same socket)
  await hub.next('heartbeat', (frame) => frame.leases.length === 0, { from: result.index + 1 })
  t.equal(hub.frames.slice(from).filter((f) => f.type === 'task_result').length, 1, 'run once, not twice')
})

t.test('stop({ drain: true }) finishes the running task, sends its result, then closes', async (t) => {
  const { hub, worker } = await setup(t)
  await worker.start()
  hub.downloadDelayMs = 400
  const running = task(hub.addModel('m1', MODEL))
  const received = new Promise((resolve) => worker.once('task', resolve))
  hub.send(running)
  await received
  const stopped = worker.stop({ drain: true })
  const draining = await hub.next('draining')
  hub.send(task(hub.addModel('m2', MODEL))) // too late: not taken
  await stopped
  const result = await hub.next('task_result', () => true, { timeoutMs: 0 })
  t.match(result, { task_id: running.task_id, status: 'completed' })
  t.ok(draining.index < result.index, 'draining, then the result')
  t.equal(hub.frames.filter((frame) => frame.type === 'task_result').length, 1, 'the task sent while draining is not run')
  await eventually(async () => hub.closes.length > 0 || undefined, 5000, 'the close')
  t.match(hub.closes, [{ connection: 1, code: 1000 }], 'then it closes')
  t.notOk(worker.connected)
  await t.resolves(worker.finished)
})

t.test('cuda: asks for the CUDA provider and falls back to CPU with a warning', async (t) => {
  const { hub, worker, lines } = await setup(t, { cuda: true })
  await worker.start()
  t.match(Register.parse(await hub.next('register')).capabilities, { gpu: true })
  const job = task(hub.addModel('m1', MODEL))
  hub.send(job)
  const result = await hub.next('task_result', (frame) => frame.task_id === job.task_id)
  t.match(result, { status: 'completed', output: await expectedOutput(MODEL) })
  const fellBack = lines.some((line) => line.level === 'warn' && /CUDA execution provider unavailable/.test(line.message))
  if (fellBack) t.equal(result.metrics.gpu_ms, 0, 'on CPU: no GPU time')
  else t.ok(result.metrics.gpu_ms > 0, 'on CUDA: GPU time is the run time')
})

t.test('threadsPerTask: each model session gets that many onnxruntime threads', async (t) => {
  // Linux only: the process's threads, from /proc. New thread ids are counted, not the total: threads that end
  // meanwhile (an earlier test's sessions, released late on a loaded machine) do not hide new ones
  const threads = async () => new Set(await readdir('/proc/self/task'))
  const warm = await ort.InferenceSession.create(MODEL, { intraOpNumThreads: 1 }) // onnxruntime's own start-up threads
  t.teardown(() => warm.release())
  t.throws(() => new DeviceWorker({ server: 'http://localhost:1', threadsPerTask: 0 }), /threadsPerTask must be 1\.\.256/)
  const run = async (threadsPerTask: number, outputs: number) => {
    const { hub, worker } = await setup(t, { threadsPerTask })
    await worker.start()
    const before = await threads()
    const job = task(hub.addModel(`m${outputs}`, denseOnnxModel({ inputs: 10, outputs })))
    hub.send(job)
    t.match(await hub.next('task_result', (frame) => frame.task_id === job.task_id), { status: 'completed' })
    return [...(await threads())].filter((id) => !before.has(id)).length
  }
  const one = await run(1, 3)
  const four = await run(4, 4)
  t.equal(four - one, 3, `a session of 4 threads starts 3 more than one of 1 (${one} and ${four} new threads)`)
})

t.test('power estimate and backoff', async (t) => {
  // idle = 5 + 4 = 9 W; peak = 9 + 32 W (+150 W per busy GPU)
  t.equal(estimatePowerWatts({ cores: 4, load: 0 }), 9)
  t.equal(estimatePowerWatts({ cores: 4, load: 0.5 }), 25)
  t.equal(estimatePowerWatts({ cores: 4, load: 1, gpus: 1, gpuBusy: true }), 191)
  t.equal(estimatePowerWatts({ cores: 4, load: 1, gpus: 1, gpuBusy: false }), 41)
  t.equal(backoffDelay(0, () => 0), 125)
  t.equal(backoffDelay(0, () => 1), 250)
  t.equal(backoffDelay(2, () => 1), 1000)
  t.equal(backoffDelay(30, () => 1), 10_000)
  t.equal(backoffDelay(30, () => 0), 5000)
})

t.test('a task with several inputs runs them stacked and answers one output per input, in order', async (t) => {
  const { hub, worker } = await setup(t)
  await worker.start()
  t.equal((await hub.next('register')).capabilities.max_batch_inputs, 1024)
  const model = hub.addModel('m-batch', MODEL)
  const inputs = [
    { data: INPUT.data.slice(0, 10), shape: [1, 10] },
    INPUT,
    { data: INPUT.data.slice(10).map((v) => v * 3), shape: [1, 10] },
  ]
  const many = task(model, undefined, { inputs })
  delete (many as Partial<TaskAssignment>).input
  hub.send(many)
  const result = await hub.next('task_result', (frame) => frame.task_id === many.task_id)
  t.equal(result.status, 'completed')
  t.equal(result.output, undefined, 'a task given as inputs answers outputs')
  t.equal(result.outputs?.length, 3)
  for (const [i, input] of inputs.entries()) {
    const want = await expectedOutput(MODEL, input)
    const got = result.outputs![i]!
    t.same(got.shape, want.shape, `output ${i} shape`)
    t.ok(got.data.every((v, j) => Math.abs(v - want.data[j]!) < 1e-6), `output ${i} equals onnxruntime on that input alone`)
  }
  t.same(result.metrics.bytes_in, 4 * 40 + MODEL.length)
  t.same(hub.invalidFrames, [], 'every frame matched the protocol')
})
