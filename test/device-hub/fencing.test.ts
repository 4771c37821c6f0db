import t, { type Test } from 'tap'
import { taskStream } from '../../src/domain/task.js'
import { testApp } from '../helpers/app.js'
import { SimDevice } from '../helpers/device.js'

/**
 * Fencing and duplicates, billed: a result counts only under the task's live lease, and only once.
 * Each test ends by reading the customer's usage: one task, billed at the live device's figures.
 */

const live = { cpu_ms: 40, gpu_ms: 0, bytes_in: 40, bytes_out: 8 }
const zombieMetrics = { cpu_ms: 9000, gpu_ms: 0, bytes_in: 40, bytes_out: 8 }

async function setup(t: Test) {
  const context = await testApp(t, {}, { heartbeatIntervalMs: 60_000, leaseTimeoutMs: 60_000 })
  const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
  const customer = await context.customer()
  const devices: SimDevice[] = []
  t.teardown(() => devices.forEach((d) => d.kill()))
  const device = async (options: Parameters<SimDevice['register']>[0] = {}) => {
    const d = await SimDevice.connect(url)
    devices.push(d)
    await d.register(options)
    return d
  }
  const task = {
    task_id: `task_fence_${Math.random().toString(36).slice(2, 8)}`,
    customer_id: customer.id,
    job_id: 'job_fence',
    model: { id: 'model_test', format: 'onnx' as const, checksum: 'sha256:00' },
    inputs: [{ data: [1, 2, 3], shape: [1, 3] }],
    prefer_gpu: false,
  }
  const types = async () => (await context.store.readStream(taskStream(task.task_id))).map((e) => e.type)
  /** What the task's one completion billed: the claim, bounded by the wall time the server saw (metering). */
  const billed = async () => {
    const completions = (await context.store.readStream(taskStream(task.task_id))).filter((e) => e.type === 'TaskCompleted')
    return completions.map((e) => (e.data as { device_id: string; metrics: { cpu_ms: number } }))
  }
  /** The customer's usage once every projection has read the whole log. */
  const usage = async () => {
    await context.projections.waitFor(await context.store.headPosition())
    const response = await context.app.inject({ method: 'GET', url: '/api/v1/usage', headers: { 'x-api-key': customer.key } })
    return response.json()
  }
  return { ...context, url, device, task, types, billed, usage }
}

t.test('a zombie result while another device holds the live lease is refused; the live result is kept and billed', async (t) => {
  const { scheduler, device, task, types, billed, usage, url } = await setup(t)
  const a = await device()
  const outcome = scheduler.outcome(task.task_id, 20_000)
  await scheduler.submit(task, { customerId: task.customer_id })
  const first = await a.next((f) => f.type === 'task')
  a.kill() // its lease ends with the socket
  const b = await device()
  const second = await b.next((f) => f.type === 'task')
  t.equal(second.task_id, task.task_id, 'the task moved to the other device')
  t.same(await types(), ['TaskQueued', 'TaskLeased', 'TaskAttemptFailed', 'TaskLeased'], 'b holds the live lease')

  // a comes back and delivers its result under the dead lease while b is still working under the live one
  const zombie = await SimDevice.connect(url)
  t.teardown(() => zombie.kill())
  await zombie.register({ as: { deviceId: a.deviceId, sdkToken: a.sdkToken } })
  zombie.send({ type: 'task_result', task_id: task.task_id, lease_id: first.lease_id, status: 'completed', output: { data: [666], shape: [1] }, metrics: zombieMetrics })
  t.match(await zombie.next((f) => f.type === 'error'), { code: 'STALE_LEASE' }, 'refused')
  t.same(await types(), ['TaskQueued', 'TaskLeased', 'TaskAttemptFailed', 'TaskLeased'], 'the refused result changed nothing: the task is still b\'s')

  b.send({ type: 'task_result', task_id: task.task_id, lease_id: second.lease_id, status: 'completed', output: { data: [7], shape: [1] }, metrics: live })
  t.match(await outcome, { status: 'completed', deviceId: b.deviceId, outputs: [{ data: [7] }] }, 'the live device\'s result is the one kept')
  t.same(await types(), ['TaskQueued', 'TaskLeased', 'TaskAttemptFailed', 'TaskLeased', 'TaskCompleted'])
  const [completion] = await billed()
  t.equal(completion?.device_id, b.deviceId)
  t.ok(completion!.metrics.cpu_ms > 0 && completion!.metrics.cpu_ms <= live.cpu_ms, 'the live device\'s claim, not the zombie\'s')
  t.match(await usage(), { cpu_ms: completion!.metrics.cpu_ms, tasks: { total: 1 } }, 'billed once, at the live device\'s figures')
})

t.test('the same task_result twice, and again after a reconnect: recorded and billed once', async (t) => {
  const { scheduler, device, task, types, billed, usage, url } = await setup(t)
  const a = await device()
  const outcome = scheduler.outcome(task.task_id, 20_000)
  await scheduler.submit(task, { customerId: task.customer_id })
  const lease = await a.next((f) => f.type === 'task')
  const result = { type: 'task_result', task_id: task.task_id, lease_id: lease.lease_id, status: 'completed', output: { data: [7], shape: [1] }, metrics: live }
  a.send(result)
  a.send(result) // as a device that retries a send it thinks was lost
  t.match(await a.next((f) => f.type === 'error'), { code: 'STALE_LEASE' }, 'the second copy is refused')
  t.match(await outcome, { status: 'completed', deviceId: a.deviceId })

  // the device drops and comes back with the same frame (its outbox replayed)
  a.kill()
  const back = await SimDevice.connect(url)
  t.teardown(() => back.kill())
  await back.register({ as: { deviceId: a.deviceId, sdkToken: a.sdkToken } })
  back.send(result)
  t.match(await back.next((f) => f.type === 'error'), { code: 'STALE_LEASE' }, 'the replayed copy is refused')
  t.same(await types(), ['TaskQueued', 'TaskLeased', 'TaskCompleted'], 'completed once')
  const [completion] = await billed()
  t.ok(completion!.metrics.cpu_ms > 0)
  t.match(await usage(), { cpu_ms: completion!.metrics.cpu_ms, tasks: { total: 1 } }, 'billed once')
})
