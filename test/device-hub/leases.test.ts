import t, { type Test } from 'tap'
import { TaskScheduler } from '../../src/commands/scheduler.js'
import { taskStream } from '../../src/domain/task.js'
import { MAX_HEARTBEAT_LEASES } from '../../src/protocol/frames.js'
import { testApp } from '../helpers/app.js'
import { eventually, SimDevice } from '../helpers/device.js'

const metrics = { cpu_ms: 3.5, gpu_ms: 0, bytes_in: 40, bytes_out: 8 }
let n = 0
const task = (overrides: Record<string, unknown> = {}) => ({
  task_id: `task_t${++n}_${Math.random().toString(36).slice(2, 8)}`,
  customer_id: 'cust_test',
  job_id: 'job_test',
  model: { id: 'model_test', format: 'onnx' as const, checksum: 'sha256:00' },
  inputs: [{ data: [1, 2, 3], shape: [1, 3] }],
  prefer_gpu: false,
  ...overrides,
})

async function setup(t: Test, leaseTimeoutMs = 1500, prefetch?: number) {
  // A long heartbeat interval keeps silent devices connected; the devices here that keep leases heartbeat far
  // more often than it, which the hub's heartbeat limit (docs/device-protocol.md §4.4) would drop: not what these tests are about.
  const context = await testApp(t, {}, { heartbeatIntervalMs: 60_000, leaseTimeoutMs, prefetch, limits: { heartbeatsPerInterval: 100_000 } })
  const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
  const devices: SimDevice[] = []
  t.teardown(() => devices.forEach((d) => d.kill()))
  const device = async (options: Parameters<SimDevice['register']>[0] = {}) => {
    const d = await SimDevice.connect(url)
    devices.push(d)
    await d.register(options)
    return d
  }
  const types = async (taskId: string) => (await context.store.readStream(taskStream(taskId))).map((e) => e.type)
  return { ...context, url, device, types }
}

t.test('a task goes to a device under a lease and completes with its result', async (t) => {
  const { scheduler, device, types } = await setup(t)
  const a = await device()
  const spec = task()
  const outcome = scheduler.outcome(spec.task_id, 10_000)
  await scheduler.submit(spec, { customerId: spec.customer_id })
  const frame = await a.next((f) => f.type === 'task')
  t.match(frame, { task_id: spec.task_id, lease_id: /^lease_/, model: { id: 'model_test', download_path: '/api/v1/sdk/models/model_test' }, input: spec.inputs[0] })
  a.send({ type: 'task_result', task_id: spec.task_id, lease_id: frame.lease_id, status: 'completed', output: { data: [0.25, 0.75], shape: [1, 2] }, metrics })
  t.match(await outcome, { status: 'completed', deviceId: a.deviceId, outputs: [{ data: [0.25, 0.75] }], metrics })
  t.same(await types(spec.task_id), ['TaskQueued', 'TaskLeased', 'TaskCompleted'])
})

t.test('a device lost mid-task: the task is re-queued, completes once elsewhere, and the zombie result is refused', async (t) => {
  const { scheduler, device, types, url } = await setup(t)
  const a = await device()
  const spec = task()
  const outcome = scheduler.outcome(spec.task_id, 10_000)
  await scheduler.submit(spec, { customerId: spec.customer_id })
  const first = await a.next((f) => f.type === 'task')
  a.kill() // as a SIGKILL'd process: the socket just drops
  const b = await device()
  const second = await b.next((f) => f.type === 'task')
  t.equal(second.task_id, spec.task_id, 'the task moved to the other device')
  t.not(second.lease_id, first.lease_id, 'under a new lease')
  b.send({ type: 'task_result', task_id: spec.task_id, lease_id: second.lease_id, status: 'completed', output: { data: [1], shape: [1] }, metrics })
  t.match(await outcome, { status: 'completed', deviceId: b.deviceId })

  // the first device comes back and delivers its late result under the dead lease
  const zombie = await SimDevice.connect(url)
  t.teardown(() => zombie.kill())
  await zombie.register({ as: { deviceId: a.deviceId, sdkToken: a.sdkToken } })
  zombie.send({ type: 'task_result', task_id: spec.task_id, lease_id: first.lease_id, status: 'completed', output: { data: [666], shape: [1] }, metrics })
  t.match(await zombie.next((f) => f.type === 'error'), { code: 'STALE_LEASE' })
  const events = await types(spec.task_id)
  t.same(events, ['TaskQueued', 'TaskLeased', 'TaskAttemptFailed', 'TaskLeased', 'TaskCompleted'], 'completed exactly once')
})

t.test('a lease end the store cannot record at first is tried again: the task is not stranded', async (t) => {
  const { scheduler, device, types, store } = await setup(t)
  const a = await device()
  const spec = task()
  const outcome = scheduler.outcome(spec.task_id, 15_000)
  await scheduler.submit(spec, { customerId: spec.customer_id })
  await a.next((f) => f.type === 'task')
  // the database is unreachable for the next two appends to the task's stream (a restart, a network blip)
  const append = store.append.bind(store)
  let refused = 0
  store.append = (streamId, events, options) => {
    if (streamId === taskStream(spec.task_id) && refused < 2) {
      refused++
      return Promise.reject(new Error('connection terminated unexpectedly'))
    }
    return append(streamId, events, options)
  }
  t.teardown(() => {
    store.append = append
  })
  a.kill() // its lease ends: recording that fails twice
  const b = await device()
  const frame = await b.next((f) => f.type === 'task', 10_000)
  t.equal(frame.task_id, spec.task_id, 'the task went back to the queue once the end was recorded')
  t.equal(refused, 2)
  b.send({ type: 'task_result', task_id: spec.task_id, lease_id: frame.lease_id, status: 'completed', output: { data: [1], shape: [1] }, metrics })
  t.match(await outcome, { status: 'completed', deviceId: b.deviceId })
  t.same(await types(spec.task_id), ['TaskQueued', 'TaskLeased', 'TaskAttemptFailed', 'TaskLeased', 'TaskCompleted'])
})

t.test('an expired lease re-queues the task; heartbeats that list a lease keep it', async (t) => {
  // a lease of 1.5 s kept by heartbeats every 200 ms: a loaded machine that delays one heartbeat a little does not end it
  const { scheduler, device, types, store } = await setup(t, 1500)
  const keeper = await device()
  const kept = task()
  await scheduler.submit(kept, { customerId: 'cust_test' })
  const frame = await keeper.next((f) => f.type === 'task')
  for (let i = 0; i < 16; i++) {
    keeper.heartbeat([frame.lease_id])
    await new Promise((r) => setTimeout(r, 200))
  }
  t.same(await types(kept.task_id), ['TaskQueued', 'TaskLeased'], 'still leased after twice the timeout')
  // now it stops listing the lease
  await eventually(async () => (await types(kept.task_id)).includes('TaskAttemptFailed'), 10_000, 'the lease expires')
  const failed = (await store.readStream(taskStream(kept.task_id))).find((e) => e.type === 'TaskAttemptFailed')
  t.match(failed?.data, { reason: /lease expired/, requeued: true })
})

t.test('a task that fails on every attempt fails for good with the reason', async (t) => {
  const { scheduler, device, types } = await setup(t)
  const a = await device()
  const spec = task()
  const outcome = scheduler.outcome(spec.task_id, 10_000)
  await scheduler.submit(spec, { customerId: 'cust_test' })
  for (let attempt = 1; attempt <= 3; attempt++) {
    const frame = await a.next((f) => f.type === 'task')
    a.send({ type: 'task_result', task_id: spec.task_id, lease_id: frame.lease_id, status: 'failed', error: `input shape mismatch (${attempt})`, metrics })
  }
  t.match(await outcome, { status: 'failed', reason: /failed after 3 attempts; last: input shape mismatch \(3\)/ })
  const events = await types(spec.task_id)
  t.equal(events.filter((e) => e === 'TaskAttemptFailed').length, 3)
  t.equal(events.at(-1), 'TaskFailed')
})

t.test('only capable devices get a task; with none it waits in the queue', async (t) => {
  const { scheduler, device } = await setup(t)
  const torch = await device({ formats: ['torchscript'] })
  const spec = task()
  await scheduler.submit(spec, { customerId: 'cust_test' })
  await dispatchedSince(scheduler, torch)
  t.equal(torch.frames.filter((f) => f.type === 'task').length, 0, 'a TorchScript-only device gets no ONNX task')
  t.equal(scheduler.queued, 1)
  const onnx = await device()
  t.equal((await onnx.next((f) => f.type === 'task')).task_id, spec.task_id)
})

t.test('after a restart the scheduler rebuilds its queue and leases from the log', async (t) => {
  const { scheduler, device, store, database, projections } = await setup(t)
  const waiting = task({ model: { id: 'model_test', format: 'torchscript', checksum: 'sha256:00' } })
  const leased = task()
  const a = await device()
  await scheduler.submit(waiting, { customerId: 'cust_test' })
  await scheduler.submit(leased, { customerId: 'cust_test' })
  const frame = await a.next((f) => f.type === 'task')
  t.equal(frame.task_id, leased.task_id)
  await projections.waitFor(await store.headPosition())
  const restarted = new TaskScheduler({ store, db: database.db, leaseTimeoutMs: 60_000 })
  t.teardown(() => restarted.stop())
  await restarted.recover()
  t.equal(restarted.queued, 1, 'the queued task is queued again')
  t.equal(restarted.leased, 1, 'the leased task keeps its lease')
  t.ok(restarted.holdsModel(a.deviceId, 'model_test'))
})

t.test('prefetch: a device holds up to prefetch x max_concurrent_tasks, runs the first, and the rest wait in the queue', async (t) => {
  const { scheduler, device, hub } = await setup(t, 10_000, 3)
  const a = await device({ maxTasks: 2 }) // runs 2 at once, so holds up to 6
  const torch = await device({ formats: ['torchscript'] })
  const specs = Array.from({ length: 8 }, () => task())
  const outcomes = specs.map((s) => scheduler.outcome(s.task_id, 20_000))
  for (const spec of specs) await scheduler.submit(spec, { customerId: 'cust_test' })
  await eventually(async () => a.frames.filter((f) => f.type === 'task').length === 6 || undefined, 5000, 'six tasks on the device')
  await dispatchedSince(scheduler, torch)
  const given = a.frames.filter((f) => f.type === 'task')
  t.equal(given.length, 6, 'no more than 3 x 2 tasks held')
  t.equal(scheduler.queued, 2, 'the other two wait in the queue')
  // the TorchScript device runs the probe in its one slot
  t.same(hub.utilization(), { devices: 2, slots: 3, used: 3, draining: 0, training: 0 }, 'utilization counts the running slots, not the prefetched tasks')
  // each result frees room for one queued task
  for (const frame of given) a.send({ type: 'task_result', task_id: frame.task_id, lease_id: frame.lease_id, status: 'completed', output: { data: [1], shape: [1] }, metrics })
  await eventually(async () => a.frames.filter((f) => f.type === 'task').length === 8 || undefined, 5000, 'the queued two delivered')
  t.equal(scheduler.queued, 0)
  for (const frame of a.frames.filter((f) => f.type === 'task').slice(6)) a.send({ type: 'task_result', task_id: frame.task_id, lease_id: frame.lease_id, status: 'completed', output: { data: [1], shape: [1] }, metrics })
  t.same((await Promise.all(outcomes)).map((o) => o.status), Array(8).fill('completed'))
})

t.test('a device never holds more leases than a heartbeat can list', async (t) => {
  const { scheduler, device } = await setup(t, 10_000, 4)
  const a = await device({ maxTasks: 100 }) // 4 x 100 would be 400 leases; a heartbeat lists at most 256
  const torch = await device({ formats: ['torchscript'] })
  const specs = Array.from({ length: 300 }, () => task())
  await scheduler.submitAll(specs, { customerId: 'cust_test' })
  await eventually(async () => a.frames.filter((f) => f.type === 'task').length >= MAX_HEARTBEAT_LEASES || undefined, 10_000, 'the device filled up')
  await dispatchedSince(scheduler, torch)
  t.equal(a.frames.filter((f) => f.type === 'task').length, MAX_HEARTBEAT_LEASES)
  t.equal(scheduler.queued, 300 - MAX_HEARTBEAT_LEASES, 'the rest wait in the queue')
})

t.test('a task that cannot reach its device (its socket is closing) goes back to the queue without using an attempt', async (t) => {
  const { scheduler, device, types } = await setup(t)
  const torch = await device({ formats: ['torchscript'] })
  // a device whose socket is closing: the hub's send answers false until the close is reported
  let tries = 0
  scheduler.deviceConnected({ deviceId: 'dev_closing', formats: ['onnx'], gpu: false, maxConcurrent: 1, maxBatchInputs: 1, sdkUuid: 'sdk_closing', instanceType: 'aws', leases: new Set(), draining: false, load: 0, send: () => (tries++, false) })
  const spec = task()
  const outcome = scheduler.outcome(spec.task_id, 10_000)
  await scheduler.submit(spec, { customerId: spec.customer_id })
  await eventually(async () => (await types(spec.task_id)).includes('TaskLeaseReturned') || undefined, 5000, 'the lease is returned')
  await dispatchedSince(scheduler, torch)
  t.equal(tries, 1, 'the closing device is not offered the task again')
  t.same(await types(spec.task_id), ['TaskQueued', 'TaskLeased', 'TaskLeaseReturned'])
  t.equal(scheduler.queued, 1)
  const a = await device()
  const frame = await a.next((f) => f.type === 'task')
  a.send({ type: 'task_result', task_id: spec.task_id, lease_id: frame.lease_id, status: 'completed', output: { data: [1], shape: [1] }, metrics })
  t.match(await outcome, { status: 'completed', deviceId: a.deviceId })
})

t.test('cancelling many tasks at once: queued ones leave the queue, a held one is dropped on its device, an ended one is refused', async (t) => {
  const { scheduler, device, types } = await setup(t)
  const a = await device()
  const done = task()
  await scheduler.submit(done, { customerId: 'cust_test' })
  const doneFrame = await a.next((f) => f.type === 'task')
  a.send({ type: 'task_result', task_id: done.task_id, lease_id: doneFrame.lease_id, status: 'completed', output: { data: [1], shape: [1] }, metrics })
  await scheduler.outcome(done.task_id, 5000)
  const held = task()
  await scheduler.submit(held, { customerId: 'cust_test' })
  const heldFrame = await a.next((f) => f.type === 'task' && f.task_id === held.task_id)
  const queued = Array.from({ length: 500 }, () => task({ inputs: [{ data: [1, 2, 3], shape: [1, 3] }, { data: [4, 5, 6], shape: [1, 3] }] }))
  await scheduler.submitAll(queued, { customerId: 'cust_test' }) // the device is full: they wait
  t.equal(scheduler.queuedInputs, 1000)
  const outcomes = [held, ...queued].map((s) => scheduler.outcome(s.task_id, 10_000))
  const settled = await scheduler.cancelAll([done.task_id, held.task_id, ...queued.map((s) => s.task_id)], 'cust_test')
  t.match(settled[0], { status: 'rejected', reason: { code: 'CANNOT_CANCEL' } }, 'a completed task stays completed')
  t.ok(settled.slice(1).every((r) => r.status === 'fulfilled'), 'the others are cancelled')
  t.equal(scheduler.queued, 0)
  t.equal(scheduler.queuedInputs, 0, 'the queued inputs are counted out')
  t.match(await a.next((f) => f.type === 'cancel_task'), { task_id: held.task_id, lease_id: heldFrame.lease_id })
  t.ok((await Promise.all(outcomes)).every((o) => o.status === 'cancelled'))
  t.same(await types(queued[0]!.task_id), ['TaskQueued', 'TaskCancelled'])
})

t.test('a wait for an outcome ends when its stop signal fires (its submit failed), not at its timeout', async (t) => {
  const { scheduler } = await setup(t)
  const stop = new AbortController()
  const waiting = scheduler.outcome('task_never_queued', 60_000, stop.signal)
  const started = Date.now()
  stop.abort(new Error('the submit failed'))
  await t.rejects(waiting, /the submit failed/)
  t.ok(Date.now() - started < 1000, 'at once')
  const stopped = new AbortController()
  stopped.abort(new Error('already stopped'))
  await t.rejects(scheduler.outcome('task_never_queued', 60_000, stopped.signal), /already stopped/, 'a signal stopped before the wait ends it at once')
})

t.test('a device lost while holding prefetched tasks: only the tasks it ran use an attempt', async (t) => {
  const { scheduler, device, types, store } = await setup(t, 10_000, 3)
  const a = await device({ maxTasks: 2 }) // runs the first 2 it is given, queues the next 4
  // one attempt each: a task charged for the loss fails for good, one returned is queued again
  const specs = Array.from({ length: 6 }, () => task({ max_attempts: 1 }))
  const outcomes = specs.map((s) => scheduler.outcome(s.task_id, 20_000))
  for (const spec of specs) await scheduler.submit(spec, { customerId: 'cust_test' })
  await eventually(async () => a.frames.filter((f) => f.type === 'task').length === 6 || undefined, 5000, 'six tasks on the device')
  const given = a.frames.filter((f) => f.type === 'task')
  a.kill()
  const running = given.slice(0, 2).map((f) => f.task_id)
  const waiting = given.slice(2).map((f) => f.task_id)
  for (const id of running) t.match(await outcomes[specs.findIndex((s) => s.task_id === id)], { status: 'failed', reason: /failed after 1 attempt/ }, 'a task it may have run used its one attempt')
  const b = await device({ maxTasks: 4 })
  await eventually(async () => b.frames.filter((f) => f.type === 'task').length === 4 || undefined, 5000, 'the four it never started go to the next device')
  const moved = b.frames.filter((f) => f.type === 'task')
  t.same(moved.map((f) => f.task_id).sort(), [...waiting].sort())
  for (const frame of moved) b.send({ type: 'task_result', task_id: frame.task_id, lease_id: frame.lease_id, status: 'completed', output: { data: [1], shape: [1] }, metrics })
  for (const id of waiting) t.match(await outcomes[specs.findIndex((s) => s.task_id === id)], { status: 'completed', deviceId: b.deviceId })
  t.same(await types(waiting[0]!), ['TaskQueued', 'TaskLeased', 'TaskLeaseReturned', 'TaskLeased', 'TaskCompleted'])
  const stream = await store.readStream(taskStream(waiting[0]!))
  t.match(stream.find((e) => e.type === 'TaskLeaseReturned')?.data, { reason: "device disconnected (socket closed); the task had not started" })
  t.same(stream.filter((e) => e.type === 'TaskLeased').map((e) => (e.data as { attempt: number }).attempt), [1, 1], 'the second lease is still attempt 1')
})

t.test('after a restart, a device that comes back holds its leases in the order they were granted', async (t) => {
  const { scheduler, device, store, database, projections, types } = await setup(t, 60_000, 6)
  const a = await device({ maxTasks: 3 })
  // one submit: the same queued_at for all, and ids whose text order (t-0, t-1, t-10, t-11, t-2...) is not the grant order
  const prefix = `t${Math.random().toString(36).slice(2, 8)}`
  const specs = Array.from({ length: 12 }, (_, i) => task({ task_id: `${prefix}-${i}` }))
  await scheduler.submitAll(specs, { customerId: 'cust_test' })
  await eventually(async () => a.frames.filter((f) => f.type === 'task').length === 12 || undefined, 5000, 'twelve tasks on the device')
  const granted = a.frames.filter((f) => f.type === 'task').map((f) => f.lease_id as string)
  await projections.waitFor(await store.headPosition())
  const restarted = new TaskScheduler({ store, db: database.db, leaseTimeoutMs: 60_000, prefetch: 6 })
  t.teardown(() => restarted.stop())
  await restarted.recover()
  const slot = { deviceId: a.deviceId, formats: ['onnx'], gpu: false, maxConcurrent: 3, maxBatchInputs: 1, sdkUuid: 'x', instanceType: 'user' as const, leases: new Set<string>(), draining: false, load: 0, send: () => true }
  restarted.deviceConnected(slot)
  t.same([...slot.leases], granted, 'the leases, in the order the device was given them')
  await restarted.deviceLost(a.deviceId, 'gone')
  const outcomes = await Promise.all(specs.map(async (s) => (await types(s.task_id)).at(-1)))
  t.same(outcomes, [...Array(3).fill('TaskAttemptFailed'), ...Array(9).fill('TaskLeaseReturned')], 'the first three it ran used an attempt; the nine queued behind them did not')
})

t.test('a device that comes back without some of its leases: they end at its first heartbeat, not when they expire', async (t) => {
  // leases of a minute: without the first heartbeat's check, the lost ones would hold the device's slots that long
  const { scheduler, device, types, store, url } = await setup(t, 60_000, 3)
  const a = await device({ maxTasks: 1 }) // runs the first, queues the next two
  const specs = Array.from({ length: 3 }, () => task())
  const outcomes = specs.map((s) => scheduler.outcome(s.task_id, 20_000))
  for (const spec of specs) await scheduler.submit(spec, { customerId: 'cust_test' })
  await eventually(async () => a.frames.filter((f) => f.type === 'task').length === 3 || undefined, 5000, 'three tasks on the device')
  const [first, second, third] = a.frames.filter((f) => f.type === 'task')
  // it connects again (the old socket is replaced, its leases stay the device's) and still has only the second
  const back = await SimDevice.connect(url)
  t.teardown(() => back.kill())
  await back.register({ as: { deviceId: a.deviceId, sdkToken: a.sdkToken }, maxTasks: 1 })
  back.heartbeat([second.lease_id])
  await eventually(async () => back.frames.filter((f) => f.type === 'task').length === 2 || undefined, 5000, 'the two it lost come back to it at once')
  const again = back.frames.filter((f) => f.type === 'task')
  t.same(again.map((f) => f.task_id), [first.task_id, third.task_id], 'the one it may have run first, back at the front of the queue')
  const reasonOf = async (taskId: string, type: string) => ((await store.readStream(taskStream(taskId))).find((e) => e.type === type)?.data as { reason?: string } | undefined)?.reason
  t.match(await reasonOf(first.task_id, 'TaskAttemptFailed'), /the device came back without the task/, 'the one it ran first used an attempt')
  t.match(await reasonOf(third.task_id, 'TaskLeaseReturned'), /the device came back without the task; the task had not started/, 'the one queued behind the kept one did not')
  t.same(await types(second.task_id), ['TaskQueued', 'TaskLeased'], 'the one it listed is kept')
  for (const frame of [second, ...again]) back.send({ type: 'task_result', task_id: frame.task_id, lease_id: frame.lease_id, status: 'completed', output: { data: [1], shape: [1] }, metrics })
  for (const outcome of outcomes) t.match(await outcome, { status: 'completed', deviceId: a.deviceId })
})

t.test('prefetch must be a whole number of 1 or more', async (t) => {
  const { store, database } = await setup(t)
  t.throws(() => new TaskScheduler({ store, db: database.db, prefetch: 0 }), /prefetch/)
  t.throws(() => new TaskScheduler({ store, db: database.db, prefetch: 1.5 }), /prefetch/)
  t.equal(new TaskScheduler({ store, db: database.db }).prefetch, 4, 'default 4')
})

/**
 * Proof that the scheduler has dispatched since the call: a TorchScript task submitted now reaches `torch`, a
 * TorchScript-only device. Dispatch goes through the queue in order, so every task queued before the probe
 * was offered to the devices with room in that run (or an earlier one); what it did not give is not given.
 */
async function dispatchedSince(scheduler: TaskScheduler, torch: SimDevice): Promise<void> {
  const probe = task({ model: { id: 'model_probe', format: 'torchscript', checksum: 'sha256:00' } })
  await scheduler.submit(probe, { customerId: 'cust_test' })
  await torch.next((f) => f.type === 'task' && f.task_id === probe.task_id)
}
