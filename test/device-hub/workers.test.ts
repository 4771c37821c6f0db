import { type ChildProcess, spawn } from 'node:child_process'
import { readFile, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import * as ort from 'onnxruntime-node'
import t from 'tap'
import { taskStream } from '../../src/domain/task.js'
import { multipart, testApp } from '../helpers/app.js'
import { eventually, SimDevice } from '../helpers/device.js'
import { denseOnnxModel } from '../helpers/onnx.js'

const dcp = fileURLToPath(new URL('../../bin/dcp.js', import.meta.url))

t.test('a real worker killed with SIGKILL mid-task: the task completes once on another worker; the zombie result is refused', async (t) => {
  const context = await testApp(t, {}, { heartbeatIntervalMs: 1000, leaseTimeoutMs: 5000 })
  const { app, scheduler, store, database } = context
  const dir = await mkdtemp(path.join(tmpdir(), 'dcp-workers-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  // hold the first worker inside its model download, so the kill lands mid-task
  let slowDevice: string | undefined
  app.addHook('preHandler', async (request) => {
    if (request.url.startsWith('/api/v1/sdk/models/') && request.caller.keyId === slowDevice) await new Promise((r) => setTimeout(r, 3000))
  })
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  const alice = await context.customer()
  const bytes = denseOnnxModel({ inputs: 4, outputs: 3 })
  const body = multipart({}, { name: 'm.onnx', content: bytes })
  const model = (await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': alice.key }, payload: body.payload })).json()

  const workers: ChildProcess[] = []
  t.teardown(() => workers.forEach((w) => w.exitCode === null && w.kill('SIGKILL')))
  const startWorker = async (name: string) => {
    const stateDir = path.join(dir, name)
    const child = spawn(process.execPath, [dcp, 'worker', '--server', url, '--state-dir', stateDir], { stdio: ['ignore', 'pipe', 'inherit'] })
    workers.push(child)
    let out = ''
    child.stdout!.on('data', (d) => (out += d))
    await eventually(async () => /registered as (dev_\w+)/.exec(out)?.[1], 30_000, `${name} to register`)
    return { child, stateDir, deviceId: /registered as (dev_\w+)/.exec(out)![1]! }
  }
  const first = await startWorker('first')
  slowDevice = first.deviceId

  const input = { data: [0.1, 0.2, 0.3, 0.4], shape: [1, 4] }
  const spec = { task_id: 'task_sigkill1', customer_id: alice.id, job_id: 'job_sigkill', model: { id: model.id, format: 'onnx' as const, checksum: model.checksum }, inputs: [input], prefer_gpu: false }
  const outcome = scheduler.outcome(spec.task_id, 30_000)
  await scheduler.submit(spec, { customerId: alice.id })
  await eventually(async () => (await store.readStream(taskStream(spec.task_id))).some((e) => e.type === 'TaskLeased'), 10_000, 'the lease')
  await new Promise((r) => setTimeout(r, 300)) // it is downloading now
  first.child.kill('SIGKILL')

  const second = await startWorker('second')
  const done = await outcome
  t.equal(done.status, 'completed')
  if (done.status !== 'completed') return
  t.equal(done.deviceId, second.deviceId, 'completed on the other worker')
  const session = await ort.InferenceSession.create(bytes)
  const expected = await session.run({ [session.inputNames[0]!]: new ort.Tensor('float32', Float32Array.from(input.data), input.shape) })
  const want = Array.from(expected[session.outputNames[0]!]!.data as Float32Array)
  t.same(done.outputs[0]!.shape, [1, 3])
  done.outputs[0]!.data.forEach((v, i) => t.ok(Math.abs(v - want[i]!) < 1e-6, `output ${i} matches onnxruntime`))
  t.ok(done.metrics.cpu_ms > 0, 'cpu_ms measured on the device')

  const events = await store.readStream(taskStream(spec.task_id))
  // on a loaded machine a slow heartbeat can cost the second worker an attempt too; the order is what matters
  t.same(events.slice(0, 3).map((e) => e.type), ['TaskQueued', 'TaskLeased', 'TaskAttemptFailed'])
  t.equal(events.at(-1)!.type, 'TaskCompleted')
  const dead = events[2]!.data as { lease_id: string; device_id: string; reason: string }
  t.equal(dead.device_id, first.deviceId)
  t.match(dead.reason, /device disconnected/)

  // the killed worker's identity comes back as a zombie with the dead lease's result
  const state = JSON.parse(await readFile(path.join(first.stateDir, 'device.json'), 'utf8')) as { device_id: string; sdk_token: string }
  const zombie = await SimDevice.connect(url)
  t.teardown(() => zombie.kill())
  await zombie.register({ as: { deviceId: state.device_id, sdkToken: state.sdk_token } })
  zombie.send({ type: 'task_result', task_id: spec.task_id, lease_id: dead.lease_id, status: 'completed', output: { data: [9, 9, 9], shape: [1, 3] }, metrics: { cpu_ms: 1, gpu_ms: 0, bytes_in: 0, bytes_out: 12 } })
  t.match(await zombie.next((f) => f.type === 'error'), { code: 'STALE_LEASE' })
  t.equal((await store.readStream(taskStream(spec.task_id))).filter((e) => e.type === 'TaskCompleted').length, 1, 'completed exactly once')
  await context.projections.waitFor(await store.headPosition())
  const { rows } = await database.pool.query(`select status, attempts, device_id from rm_tasks.tasks where task_id = $1`, [spec.task_id])
  t.match(rows[0], { status: 'completed', device_id: second.deviceId })
  t.ok(rows[0].attempts >= 2)
})
