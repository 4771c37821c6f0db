import t, { type Test } from 'tap'
import { MAX_MERGED_VALUES, TaskScheduler } from '../../src/commands/scheduler.js'
import { boundMetrics, splitMetrics } from '../../src/domain/metering.js'
import { taskStream } from '../../src/domain/task.js'
import { testApp } from '../helpers/app.js'
import { eventually, SimDevice } from '../helpers/device.js'

/**
 * The dynamic batcher (src/commands/scheduler.ts `dispatch`): single-input tasks that wait together for the
 * same model, customer and placement go to a device as one device task; each task keeps its own stream,
 * outcome and share of the compute.
 */
const metrics = { cpu_ms: 10.007, gpu_ms: 0, bytes_in: 1000, bytes_out: 301 }
let n = 0
const task = (batching: { max_batch_size: number; max_queue_delay_ms: number } | null = { max_batch_size: 32, max_queue_delay_ms: 0 }, overrides: Record<string, unknown> = {}) => {
  const i = ++n
  return {
    task_id: `task_b${i}_${Math.random().toString(36).slice(2, 8)}`,
    customer_id: 'cust_test',
    job_id: `job_b${i}`,
    model: { id: 'model_test', format: 'onnx' as const, checksum: 'sha256:00' },
    inputs: [{ data: [i, i + 1, i + 2], shape: [1, 3] }],
    prefer_gpu: false,
    batching,
    ...overrides,
  }
}
type Spec = ReturnType<typeof task>

async function setup(t: Test, leaseTimeoutMs = 10_000, prefetch = 1) {
  const context = await testApp(t, {}, { heartbeatIntervalMs: 60_000, leaseTimeoutMs, prefetch, limits: { heartbeatsPerInterval: 100_000 } })
  const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
  const devices: SimDevice[] = []
  t.teardown(() => devices.forEach((d) => d.kill()))
  const device = async (options: Parameters<SimDevice['register']>[0] = {}) => {
    const d = await SimDevice.connect(url)
    devices.push(d)
    await d.register({ batchInputs: 64, ...options })
    return d
  }
  const stream = async (taskId: string) => (await context.store.readStream(taskStream(taskId))).map((e) => ({ type: e.type, data: e.data as any }))
  const types = async (taskId: string) => (await stream(taskId)).map((e) => e.type)
  return { ...context, url, device, stream, types }
}

/** Each input's output: its values summed, so a result that reached the wrong task shows. */
const answer = (frame: any) => {
  const inputs: { data: number[] }[] = frame.inputs ?? [frame.input]
  const outputs = inputs.map((input) => ({ data: [input.data.reduce((a, b) => a + b, 0)], shape: [1] }))
  return { type: 'task_result', task_id: frame.task_id, lease_id: frame.lease_id, status: 'completed', ...(frame.inputs ? { outputs } : { output: outputs[0] }), metrics }
}
const sumOf = (spec: Spec) => spec.inputs[0]!.data.reduce((a, b) => a + b, 0)
/** The share a part's completion must bill: the whole claim bounded by what the server observed, split by inputs. */
const shareOf = (completed: any, sizes: number[], index: number) => splitMetrics(completed.observed ? boundMetrics(metrics, completed.observed).metrics : metrics, sizes, index)

/**
 * A device busy with one task (prefetch 1: it holds nothing else), and `count` tasks queued behind it.
 * `waiting`: someone waits for each outcome, as for synchronous requests (their leases are recorded with
 * their outcomes); false: nobody does, as for async ones (leases recorded when granted).
 */
async function busyWithQueue(t: Test, count: number, batching?: Parameters<typeof task>[0], overrides: Record<string, unknown> = {}, waiting = true) {
  const context = await setup(t)
  const a = await context.device()
  const first = task(batching, overrides)
  const firstOutcome = context.scheduler.outcome(first.task_id, 20_000)
  await context.scheduler.submit(first, { customerId: 'cust_test' })
  const firstFrame = await a.next((f) => f.type === 'task')
  const queued = Array.from({ length: count }, () => task(batching, overrides))
  const outcomes = waiting ? queued.map((s) => context.scheduler.outcome(s.task_id, 20_000)) : []
  await Promise.all(queued.map((s) => context.scheduler.submit(s, { customerId: 'cust_test' })))
  t.equal(context.scheduler.queued, count, 'the others wait in the queue while the device is busy')
  // a test that does not wait for them all: their end at teardown (the server stops) is not a failure
  for (const outcome of [firstOutcome, ...outcomes]) outcome.catch(() => {})
  return { ...context, a, first, firstOutcome, firstFrame, queued, outcomes }
}

t.test('idle: a task goes alone at once; under concurrency the queued ones go together, each result to its own task', async (t) => {
  const { a, first, firstOutcome, firstFrame, queued, outcomes, stream, types, scheduler } = await busyWithQueue(t, 5)
  t.match(firstFrame, { task_id: first.task_id, input: first.inputs[0] }, 'with a free device nothing waits for company: the first went alone')
  t.notOk('inputs' in firstFrame)
  a.send(answer(firstFrame))
  t.match(await firstOutcome, { status: 'completed', outputs: [{ data: [sumOf(first)] }] })

  const merged = await a.next((f) => f.type === 'task')
  t.match(merged.task_id, /^unit_/, 'one device task for the five')
  t.same(merged.inputs, queued.map((s) => s.inputs[0]), 'their inputs in queue order')
  a.send(answer(merged))
  const done = await Promise.all(outcomes)
  done.forEach((outcome, i) => t.match(outcome, { status: 'completed', taskId: queued[i]!.task_id, outputs: [{ data: [sumOf(queued[i]!)] }] }, `task ${i} got its own output`))

  // each task's own stream: its lease names the unit and its place, its completion its share
  const sizes = queued.map(() => 1)
  let cpu = 0
  let bytesIn = 0
  let whole: typeof metrics | undefined
  for (const [i, spec] of queued.entries()) {
    t.same(await types(spec.task_id), ['TaskQueued', 'TaskLeased', 'TaskCompleted'])
    const events = await stream(spec.task_id)
    t.match(events[1]!.data, { lease_id: merged.lease_id, unit: { id: merged.task_id, index: i, sizes } })
    const completed = events[2]!.data
    t.same(completed.outputs, [{ data: [sumOf(spec)], shape: [1] }])
    t.same(completed.merged, { unit: merged.task_id, index: i, sizes, claimed: metrics })
    t.same(completed.metrics, shareOf(completed, sizes, i), 'its share by the split rule')
    cpu += Math.round(completed.metrics.cpu_ms * 1000)
    bytesIn += completed.metrics.bytes_in
    whole = boundMetrics(metrics, completed.observed).metrics
  }
  t.equal(cpu, Math.round(whole!.cpu_ms * 1000), 'the shares add up to the whole, to the microsecond')
  t.equal(bytesIn, metrics.bytes_in)
  t.same(scheduler.dispatched, { deviceTasks: 2, tasks: 6 }, 'counted for /health/detailed: two device tasks carried six tasks')
})

t.test('the split rule: by inputs, in whole microseconds, what the floors leave to the first parts', async (t) => {
  const whole = { cpu_ms: 0.01, gpu_ms: 7, bytes_in: 10, bytes_out: 0 }
  const shares = [0, 1, 2].map((i) => splitMetrics(whole, [1, 1, 1], i))
  t.same(shares.map((s) => s.cpu_ms), [0.004, 0.003, 0.003], '10 µs over three: 4, 3, 3')
  t.same(shares.map((s) => s.gpu_ms), [2.334, 2.333, 2.333])
  t.same(shares.map((s) => s.bytes_in), [4, 3, 3])
  t.same([0, 1].map((i) => splitMetrics(whole, [3, 1], i).bytes_in), [8, 2], 'by inputs: 7.5 and 2.5, the half to the first')
})

t.test('max_batch_size and the device\'s max_batch_inputs cap a merged task', async (t) => {
  const { a, firstFrame, queued, outcomes } = await busyWithQueue(t, 5, { max_batch_size: 2, max_queue_delay_ms: 0 })
  a.send(answer(firstFrame))
  const sizes: number[] = []
  for (let done = 0; done < queued.length; ) {
    const frame = await a.next((f) => f.type === 'task')
    const inputs = frame.inputs?.length ?? 1
    sizes.push(inputs)
    done += inputs
    a.send(answer(frame))
  }
  t.same(sizes, [2, 2, 1], 'at most the model\'s max_batch_size of 2')
  for (const outcome of outcomes) t.match(await outcome, { status: 'completed' })

  const small = await busyWithQueue(t, 3)
  const b = await small.device({ batchInputs: 2 })
  const frame = await b.next((f) => f.type === 'task')
  t.equal(frame.inputs.length, 2, 'at most the device\'s max_batch_inputs')
})

t.test('tasks that may not share a device task go alone: another model or customer, a batch chunk, max_batch_size 1', async (t) => {
  const { a, firstFrame, scheduler } = await busyWithQueue(t, 0)
  const specs = [
    task(),
    task(undefined, { model: { id: 'model_other', format: 'onnx' as const, checksum: 'sha256:01' } }),
    task(undefined, { customer_id: 'cust_other' }),
    task(null),
    task({ max_batch_size: 1, max_queue_delay_ms: 0 }),
    task(undefined, { inputs: [{ data: [1, 2, 3], shape: [3, 1] }] }),
    task(undefined, { validation: { mode: 'quorum', tolerance: 1e-4 } }),
  ]
  await Promise.all(specs.map((s) => scheduler.submit(s, { customerId: s.customer_id })))
  a.send(answer(firstFrame))
  for (let i = 0; i < specs.length; i++) {
    const frame = await a.next((f) => f.type === 'task')
    t.notOk(frame.inputs, `device task ${i} carries one input (${frame.task_id})`)
    a.send(answer(frame))
  }
})

t.test('max_queue_delay_ms: with a free device a short group waits for company that long; a full one goes at once', async (t) => {
  const { device, scheduler } = await setup(t)
  const a = await device()
  const batching = { max_batch_size: 3, max_queue_delay_ms: 400 }
  const started = Date.now()
  const three = [task(batching), task(batching), task(batching)]
  await Promise.all(three.map((s) => scheduler.submit(s, { customerId: 'cust_test' })))
  const full = await a.next((f) => f.type === 'task')
  t.equal(full.inputs.length, 3, 'three of three: one device task')
  t.ok(Date.now() - started < 300, `a full batch does not wait (${Date.now() - started} ms)`)
  a.send(answer(full))

  const before = Date.now()
  const two = [task(batching), task(batching)]
  const outcomes = two.map((s) => scheduler.outcome(s.task_id, 20_000))
  await Promise.all(two.map((s) => scheduler.submit(s, { customerId: 'cust_test' })))
  const held = await a.next((f) => f.type === 'task')
  const waited = Date.now() - before
  t.equal(held.inputs.length, 2, 'both waiting ones together')
  t.ok(waited >= 350, `held back for company about max_queue_delay_ms (${waited} ms)`)
  a.send(answer(held))
  for (const outcome of outcomes) t.match(await outcome, { status: 'completed' })
})

t.test('cancelling one task of a merged device task drops its part; the others complete; it is billed nothing', async (t) => {
  const { a, firstFrame, queued, outcomes, scheduler, stream, types } = await busyWithQueue(t, 3)
  a.send(answer(firstFrame))
  const merged = await a.next((f) => f.type === 'task')
  t.equal(merged.inputs.length, 3)
  await scheduler.cancel(queued[1]!.task_id, 'cust_test')
  t.match(await outcomes[1], { status: 'cancelled' })
  a.send(answer(merged))
  t.match(await outcomes[0], { status: 'completed', outputs: [{ data: [sumOf(queued[0]!)] }] })
  t.match(await outcomes[2], { status: 'completed', outputs: [{ data: [sumOf(queued[2]!)] }] })
  t.notOk(a.frames.some((f) => f.type === 'cancel_task'), 'the device is not told to stop: the others need its result')
  t.same(await types(queued[1]!.task_id), ['TaskQueued', 'TaskCancelled'], 'the cancelled one: no completion, no usage (its lease, a waited-for one, was to be recorded with its outcome)')
  for (const i of [0, 2]) {
    const completed = (await stream(queued[i]!.task_id)).at(-1)!.data
    t.same(completed.metrics, shareOf(completed, [1, 1, 1], i), `task ${i} billed its own share only`)
  }
})

t.test('cancelling every task of a merged device task tells the device to stop', async (t) => {
  const { a, firstFrame, queued, scheduler } = await busyWithQueue(t, 2)
  a.send(answer(firstFrame))
  const merged = await a.next((f) => f.type === 'task')
  await scheduler.cancelAll(queued.map((s) => s.task_id), 'cust_test')
  t.match(await a.next((f) => f.type === 'cancel_task'), { task_id: merged.task_id, lease_id: merged.lease_id })
  a.send(answer(merged))
  t.match(await a.next((f) => f.type === 'error'), { code: 'STALE_LEASE' }, 'its late result is refused')
})

t.test('a device lost with a merged task: every part is re-queued once and completes once elsewhere', async (t) => {
  const { a, firstFrame, queued, outcomes, device, types } = await busyWithQueue(t, 4)
  a.send(answer(firstFrame))
  const merged = await a.next((f) => f.type === 'task')
  t.equal(merged.inputs.length, 4)
  a.kill()
  const b = await device()
  const again = await b.next((f) => f.type === 'task')
  t.same(again.inputs, merged.inputs, 'the same inputs, in the same order')
  b.send(answer(again))
  for (const [i, outcome] of outcomes.entries()) t.match(await outcome, { status: 'completed', deviceId: b.deviceId, outputs: [{ data: [sumOf(queued[i]!)] }] })
  for (const spec of queued) t.same(await types(spec.task_id), ['TaskQueued', 'TaskLeased', 'TaskAttemptFailed', 'TaskLeased', 'TaskCompleted'], `${spec.task_id}: failed once, completed once`)
})

t.test('a malformed result for a merged task (too few outputs) fails every part\'s attempt; they run again', async (t) => {
  const { a, firstFrame, queued, outcomes, stream } = await busyWithQueue(t, 3)
  a.send(answer(firstFrame))
  const merged = await a.next((f) => f.type === 'task')
  a.send({ ...answer(merged), outputs: [{ data: [1], shape: [1] }] })
  const again = await a.next((f) => f.type === 'task')
  for (const spec of queued) t.match((await stream(spec.task_id)).find((e) => e.type === 'TaskAttemptFailed')?.data, { reason: 'the device returned 1 outputs for 3 inputs' })
  a.send(answer(again))
  for (const outcome of outcomes) t.match(await outcome, { status: 'completed' })
})

t.test('after a restart a merged lease is one lease again: the device that comes back completes every part', async (t) => {
  const { a, firstFrame, queued, store, database, projections, stream, types } = await busyWithQueue(t, 3, undefined, {}, false)
  a.send(answer(firstFrame))
  const merged = await a.next((f) => f.type === 'task')
  await eventually(async () => (await Promise.all(queued.map((s) => types(s.task_id)))).every((list) => list.at(-1) === 'TaskLeased'), 5000, 'the three leases recorded')
  await projections.waitFor(await store.headPosition())
  const restarted = new TaskScheduler({ store, db: database.db, leaseTimeoutMs: 60_000 })
  t.teardown(() => restarted.stop())
  await restarted.recover()
  t.equal(restarted.leased, 1, 'one lease for the three')
  const sent: unknown[] = []
  const slot = { deviceId: a.deviceId, formats: ['onnx'], gpu: false, maxConcurrent: 1, maxBatchInputs: 64, sdkUuid: 'x', instanceType: 'user' as const, leases: new Set<string>(), draining: false, load: 0, send: (f: unknown) => sent.push(f) > 0 }
  restarted.deviceConnected(slot)
  t.same([...slot.leases], [merged.lease_id])
  const outcomes = queued.map((s) => restarted.outcome(s.task_id, 10_000))
  await restarted.result(a.deviceId, answer(merged) as any)
  for (const [i, outcome] of outcomes.entries()) t.match(await outcome, { status: 'completed', outputs: [{ data: [sumOf(queued[i]!)] }] })
  for (const [i, spec] of queued.entries()) {
    const completed = (await stream(spec.task_id)).at(-1)!.data
    t.same(completed.metrics, shareOf(completed, [1, 1, 1], i))
  }
})

t.test('two copies of a merged result: recorded once', async (t) => {
  const { a, firstFrame, queued, outcomes, types } = await busyWithQueue(t, 2)
  a.send(answer(firstFrame))
  const merged = await a.next((f) => f.type === 'task')
  a.send(answer(merged))
  a.send(answer(merged))
  t.match(await a.next((f) => f.type === 'error'), { code: 'STALE_LEASE' })
  for (const outcome of outcomes) await outcome
  await eventually(async () => true)
  for (const spec of queued) t.same(await types(spec.task_id), ['TaskQueued', 'TaskLeased', 'TaskCompleted'])
})

t.test('a merged task carries at most as many values as one request may send (MAX_MERGED_VALUES)', async (t) => {
  const big = { inputs: [{ data: new Array(300_000).fill(0.5), shape: [1, 300_000] }] }
  const { a, firstFrame, outcomes } = await busyWithQueue(t, 4, undefined, big)
  t.equal(Math.floor(MAX_MERGED_VALUES / 300_000), 3)
  a.send({ type: 'task_result', task_id: firstFrame.task_id, lease_id: firstFrame.lease_id, status: 'completed', output: { data: [1], shape: [1] }, metrics })
  const sizes: number[] = []
  for (let done = 0; done < 4; ) {
    const frame = await a.next((f) => f.type === 'task')
    const count = frame.inputs?.length ?? 1
    sizes.push(count)
    done += count
    const outputs = Array.from({ length: count }, () => ({ data: [1], shape: [1] }))
    a.send({ type: 'task_result', task_id: frame.task_id, lease_id: frame.lease_id, status: 'completed', ...(frame.inputs ? { outputs } : { output: outputs[0] }), metrics })
  }
  t.same(sizes, [3, 1])
  for (const outcome of outcomes) t.match(await outcome, { status: 'completed' })
})

t.test('mergeable work waits in the queue rather than on a busy device: one device task beyond what it runs (MERGED_PREFETCH)', async (t) => {
  const { device, scheduler } = await setup(t, 10_000, 4)
  const a = await device({ maxTasks: 1 })
  const specs = Array.from({ length: 5 }, () => task())
  const outcomes = specs.map((s) => scheduler.outcome(s.task_id, 20_000))
  for (const spec of specs) await scheduler.submit(spec, { customerId: 'cust_test' })
  const [first, second] = [await a.next((f) => f.type === 'task'), await a.next((f) => f.type === 'task')]
  t.same([first.task_id, second.task_id], [specs[0]!.task_id, specs[1]!.task_id], 'the one it runs and one more')
  t.equal(scheduler.queued, 3, 'not four each as prefetch allows other work: the rest wait to be merged')
  a.send(answer(first))
  const merged = await a.next((f) => f.type === 'task')
  t.same(merged.inputs, specs.slice(2).map((s) => s.inputs[0]), 'when a slot freed, the three went together')
  a.send(answer(second))
  a.send(answer(merged))
  for (const outcome of outcomes) t.match(await outcome, { status: 'completed' })
})

t.test('a waited-for (synchronous) task\'s lease is recorded with its outcome, in one append; a restart meanwhile runs it again, once', async (t) => {
  const { a, firstFrame, queued, outcomes, store, database, projections, types, device } = await busyWithQueue(t, 2)
  a.send(answer(firstFrame))
  const merged = await a.next((f) => f.type === 'task')
  t.equal(merged.inputs.length, 2)
  for (const spec of queued) t.same(await types(spec.task_id), ['TaskQueued'], 'running, and no lease in the log yet')

  // a restart now: the log says queued, so they run again; the old device's result is refused
  await projections.waitFor(await store.headPosition())
  const restarted = new TaskScheduler({ store, db: database.db, leaseTimeoutMs: 60_000 })
  t.teardown(() => restarted.stop())
  await restarted.recover()
  t.equal(restarted.queued, 2, 'both queued again')
  t.equal(restarted.leased, 0)
  const slot = { deviceId: 'dev_after', formats: ['onnx'], gpu: false, maxConcurrent: 1, maxBatchInputs: 64, sdkUuid: 'x', instanceType: 'user' as const, leases: new Set<string>(), draining: false, load: 0, sent: [] as any[], send(f: any) { return this.sent.push(f) > 0 } }
  const again = restarted.outcome(queued[0]!.task_id, 10_000)
  restarted.deviceConnected(slot)
  await eventually(async () => slot.sent.length > 0, 5000, 'the work sent again')
  await t.rejects(restarted.result(a.deviceId, answer(merged) as any), { code: 'STALE_LEASE' }, 'the first run\'s result is refused after the restart')
  await restarted.result('dev_after', answer(slot.sent[0]) as any)
  t.match(await again, { status: 'completed' })
  for (const spec of queued) {
    const events = (await store.readStream(taskStream(spec.task_id))).map((e) => ({ type: e.type, position: e.position, data: e.data as any }))
    t.same(events.map((e) => e.type), ['TaskQueued', 'TaskLeased', 'TaskCompleted'], 'leased and completed once')
    t.equal(events[1]!.data.device_id, 'dev_after')
  }
  for (const outcome of outcomes) outcome.catch(() => {})
  void device
})

t.test('a device lost running a waited-for task: its lease and the failed attempt are recorded together; one it had not started leaves no trace', async (t) => {
  const { device, scheduler, types } = await setup(t, 10_000, 4)
  const a = await device({ maxTasks: 1 })
  const [done, running, prefetched] = [task(), task(), task()]
  const outcomes = [running, prefetched].map((s) => scheduler.outcome(s.task_id, 20_000))
  // the first two find the queue empty and room on the device: leased in their submits' appends
  for (const spec of [done, running, prefetched]) await scheduler.submit(spec, { customerId: 'cust_test' })
  t.equal(scheduler.queued, 1, 'the third waits (one device task beyond the one it runs)')
  a.send(answer(await a.next((f) => f.type === 'task' && f.task_id === done.task_id)))
  await a.next((f) => f.type === 'task' && f.task_id === prefetched.task_id)
  t.same(await types(prefetched.task_id), ['TaskQueued'], 'dispatched from the queue: leased in memory only')
  a.kill() // running the second, holding the third
  const b = await device({ maxTasks: 2 })
  for (let i = 0; i < 2; i++) b.send(answer(await b.next((f) => f.type === 'task')))
  for (const outcome of outcomes) t.match(await outcome, { status: 'completed', deviceId: b.deviceId })
  t.same(await types(running.task_id), ['TaskQueued', 'TaskLeased', 'TaskAttemptFailed', 'TaskLeased', 'TaskCompleted'], 'the one it ran: an attempt used')
  t.same(await types(prefetched.task_id), ['TaskQueued', 'TaskLeased', 'TaskCompleted'], 'the one it had not started: returned, nothing recorded, no attempt used')
})

t.test('a long queue of mergeable work is not scanned again for every result while the devices are full', async (t) => {
  const { scheduler } = await setup(t, 60_000, 4)
  // counts the queued tasks dispatch looks at (it looks each up in its map of mergeable work)
  let reads = 0
  const mergeable: Map<string, unknown> = (scheduler as any).mergeable
  const lookup = mergeable.get.bind(mergeable)
  mergeable.get = (taskId: string) => {
    reads++
    return lookup(taskId)
  }
  const specs = Array.from({ length: 3000 }, () => task({ max_batch_size: 32, max_queue_delay_ms: 0 }))
  await scheduler.submitAll(specs, { customerId: 'cust_test' })
  t.equal(scheduler.queued, 3000)
  let picks = 0
  const pick = (scheduler as any).pickDevice.bind(scheduler)
  ;(scheduler as any).pickDevice = (task: unknown) => {
    picks++
    return pick(task)
  }
  let units = 0
  reads = 0
  scheduler.deviceConnected({
    deviceId: 'dev_fast', formats: ['onnx'], gpu: false, maxConcurrent: 1, maxBatchInputs: 64, sdkUuid: 'x', instanceType: 'user', leases: new Set(), draining: false, load: 0,
    send: (frame) => {
      if (frame.type !== 'task') return true
      units++
      setImmediate(() => void scheduler.result('dev_fast', answer(frame) as any))
      return true
    },
  })
  await eventually(async () => scheduler.queued === 0 && scheduler.leased === 0, 120_000, 'the queue drained', 100)
  t.ok(units >= 3000 / 32 && units < 3000 / 16, `merged 32 at a time (${units} device tasks)`)
  t.ok(picks < units * 8, `${picks} device picks for ${units} device tasks`)
  t.ok(reads < units * 200, `${reads} queued tasks looked at for ${units} device tasks: the queue behind a full device is not walked for every result`)
})
