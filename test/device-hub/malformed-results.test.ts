import t from 'tap'
import { taskStream } from '../../src/domain/task.js'
import { testApp } from '../helpers/app.js'
import { eventually, SimDevice } from '../helpers/device.js'

const metrics = { cpu_ms: 3.5, gpu_ms: 0, bytes_in: 40, bytes_out: 8 }
const task = (id: string) => ({
  task_id: `task_${id}_${Math.random().toString(36).slice(2, 8)}`,
  customer_id: 'cust_test',
  job_id: 'job_test',
  model: { id: 'model_test', format: 'onnx' as const, checksum: 'sha256:00' },
  inputs: [{ data: [1, 2, 3], shape: [1, 3] }],
  prefer_gpu: false,
})

t.test('a malformed result under the current lease fails that attempt at once with the real reason, not at lease expiry', async (t) => {
  // leases live 30 s: an outcome within seconds cannot be their expiry
  const context = await testApp(t, {}, { heartbeatIntervalMs: 60_000, leaseTimeoutMs: 30_000, limits: { heartbeatsPerInterval: 100_000 } })
  const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
  const device = await SimDevice.connect(url)
  t.teardown(() => device.kill())
  await device.register()
  const spec = task('nan')
  const outcome = context.scheduler.outcome(spec.task_id, 20_000)
  const started = performance.now()
  await context.scheduler.submit(spec, { customerId: spec.customer_id })
  // NaN and Infinity arrive as JSON null; a lying device may send a value no float32 holds
  const bad = [
    { output: { data: [0.5, null], shape: [1, 2] } },
    { output: { data: [1e39, 0.5], shape: [1, 2] } },
    { outputs: [{ data: [0.5, 0.5], shape: [1, 2] }, { data: [0.5, -1e39], shape: [1, 2] }] },
  ]
  for (const body of bad) {
    const frame = await device.next((f) => f.type === 'task')
    device.send({ type: 'task_result', task_id: spec.task_id, lease_id: frame.lease_id, status: 'completed', ...body, metrics })
    const error = await device.next((f) => f.type === 'error')
    t.equal(error.code, 'INVALID_FRAME', 'the device is told its frame was invalid')
  }
  const result = await outcome
  t.match(result, { status: 'failed', reason: /failed after 3 attempts; last: the device sent a malformed result: output 1: value 1: -1e\+39 is out of float32 range/ })
  t.ok(performance.now() - started < 10_000, `failed in ${Math.round(performance.now() - started)} ms, not after three lease expiries`)
  const failures = (await context.store.readStream(taskStream(spec.task_id))).filter((e) => e.type === 'TaskAttemptFailed').map((e) => (e.data as { reason: string }).reason)
  t.match(failures, [/output 0: value 1: null \(NaN or Infinity on the device\)/, /output 0: value 0: 1e\+39 is out of float32 range/, /output 1: value 1: -1e\+39/])
})

t.test("a malformed result naming a lease that is not the device's changes nothing", async (t) => {
  const context = await testApp(t, {}, { heartbeatIntervalMs: 60_000, leaseTimeoutMs: 30_000, limits: { heartbeatsPerInterval: 100_000 } })
  const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
  const device = await SimDevice.connect(url)
  t.teardown(() => device.kill())
  await device.register()
  const spec = task('stale')
  const outcome = context.scheduler.outcome(spec.task_id, 20_000)
  await context.scheduler.submit(spec, { customerId: spec.customer_id })
  const frame = await device.next((f) => f.type === 'task')
  device.send({ type: 'task_result', task_id: spec.task_id, lease_id: 'lease_not_this_one', status: 'completed', output: { data: [null], shape: [1, 1] }, metrics })
  await device.next((f) => f.type === 'error' && f.code === 'INVALID_FRAME')
  device.send({ type: 'task_result', task_id: spec.task_id, lease_id: frame.lease_id, status: 'completed', output: { data: [0.25, 0.75], shape: [1, 2] }, metrics })
  t.match(await outcome, { status: 'completed', outputs: [{ data: [0.25, 0.75] }] })
  const types = await eventually(async () => (await context.store.readStream(taskStream(spec.task_id))).map((e) => e.type))
  t.notOk(types.includes('TaskAttemptFailed'), 'no attempt failed')
})
