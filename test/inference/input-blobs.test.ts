import { unlink } from 'node:fs/promises'
import { sql } from 'kysely'
import t, { type Test } from 'tap'
import { BlobCollector } from '../../src/blobs/blob-gc.js'
import { TaskScheduler } from '../../src/commands/scheduler.js'
import { TASK_INPUTS_DEFAULTS } from '../../src/commands/task-inputs.js'
import { taskStream } from '../../src/domain/task.js'
import type { TaskAssignment } from '../../src/protocol/frames.js'
import { liveSchema } from '../../src/projections/projection.js'
import { testApp } from '../helpers/app.js'
import { eventually } from '../helpers/device.js'
import { close, inferenceSetup } from '../helpers/inference.js'

/** `n` values with full float64 digits (about 19 characters of JSON each). */
const values = (seed: number, n: number) => Array.from({ length: n }, (_, i) => Math.sin(seed * 1000 + i + 0.5) / 3)

t.test('a batch whose tasks exceed the inline limit: small TaskQueued events naming blobs, and correct results', async (t) => {
  const inlineInputsMaxBytes = 4096
  const { api, model, direct, database, blobs } = await inferenceSetup(t, { workers: 1, inlineInputsMaxBytes })
  const inputs = Array.from({ length: 600 }, (_, i) => ({ data: values(i, 10), shape: [1, 10] }))
  const queued = await api('POST', '/inference/batch', { model_id: model.id, inputs })
  t.equal(queued.status, 202)
  const done = await eventually(async () => {
    const r = await api('GET', `/inference/${queued.body.job_id}?limit=1000`)
    return r.body.status === 'completed' || r.body.status === 'failed' ? r.body : undefined
  }, 60_000, 'batch completion')
  t.match(done.progress, { completed: 600, failed: 0 })
  let same = 0
  for (const r of done.results) if (close(r.result.data, await direct(inputs[r.index]!.data))) same++
  t.equal(same, 600, 'every result equals onnxruntime on its input')
  // what the log holds: a reference per task, no tensors
  const events = await sql<{ bytes: number; data: any }>`select octet_length(data::text) as bytes, data from events where type = 'TaskQueued'`.execute(database.db)
  t.ok(events.rows.length >= 2, `${events.rows.length} tasks`)
  for (const { bytes, data } of events.rows) {
    t.equal(data.inputs, undefined, 'no inputs inline')
    t.match(data.inputs_blob, { sha256: /^[0-9a-f]{64}$/, count: Number, bytes: Number })
    t.ok(data.inputs_blob.bytes > inlineInputsMaxBytes, 'only inputs above the limit leave the event')
    t.ok(bytes < 1024, `the stored event is ${bytes} bytes`)
    const stored = JSON.parse((await blobs.read(data.inputs_blob.sha256)).toString())
    t.equal(stored.length, data.inputs_blob.count, 'the blob holds its count of inputs')
  }
  t.equal(events.rows.reduce((n, r) => n + r.data.inputs_blob.count, 0), 600)
})

/** A test app whose own scheduler stays out of the way, and a scheduler "after a restart" on the same log, database and blobs. */
async function restartSetup(t: Test) {
  const context = await testApp(t, {}, { leaseTimeoutMs: 60_000 })
  const restart = async () => {
    context.scheduler.stop()
    await context.projections.waitFor(await context.store.headPosition())
    const restarted = new TaskScheduler({ store: context.store, db: context.database.db, blobs: context.blobs, leaseTimeoutMs: 300 })
    t.teardown(() => restarted.stop())
    await restarted.recover()
    return restarted
  }
  return { ...context, restart }
}

let n = 0
/** A task of one input large enough (4,000 values, ~76 KB of JSON) to go to a blob at the default limit. */
const bigTask = (format: 'onnx' | 'torchscript' = 'torchscript') => ({
  task_id: `task_big${++n}_${Math.random().toString(36).slice(2, 8)}`,
  customer_id: 'cust_test',
  job_id: 'job_test',
  model: { id: `model_${format}`, format, checksum: 'sha256:00' },
  inputs: [{ data: values(n, 4000), shape: [1, 4000] }],
  prefer_gpu: false,
})

/** The scheduler's view of a device: every frame it is sent. */
function slot(scheduler: TaskScheduler, formats: string[]) {
  const frames: TaskAssignment[] = []
  scheduler.deviceConnected({
    deviceId: `dev_slot${++n}`, formats, gpu: false, maxConcurrent: 4, maxBatchInputs: 8, sdkUuid: 'sdk-nodejs-test01', instanceType: 'aws', leases: new Set(), draining: false, load: 0,
    send: (frame) => {
      if (frame.type === 'task') frames.push(frame)
      return true
    },
  })
  return frames
}

const queuedData = async (store: { readStream(id: string): Promise<{ type: string; data: unknown }[]> }, taskId: string) =>
  (await store.readStream(taskStream(taskId))).find((e) => e.type === 'TaskQueued')!.data as { inputs?: unknown; inputs_blob?: { sha256: string } }

t.test('after a restart, queued and leased tasks whose inputs are in blobs go to devices with their inputs', async (t) => {
  const { scheduler, store, restart } = await restartSetup(t)
  const waiting = bigTask('torchscript')
  const leased = bigTask('onnx')
  const device = slot(scheduler, ['onnx'])
  await scheduler.submitAll([waiting, leased], { customerId: 'cust_test' })
  await eventually(async () => device.length === 1 || undefined, 5000, 'the onnx task on its device')
  t.equal(device[0]!.task_id, leased.task_id)
  t.same(device[0]!.input, leased.inputs[0], 'sent with its inputs at submit')
  const recorded = await queuedData(store, waiting.task_id)
  t.equal(recorded.inputs, undefined)
  t.ok(recorded.inputs_blob, `inputs over ${TASK_INPUTS_DEFAULTS.inlineMaxBytes} bytes of JSON go to a blob at the default limit`)

  const restarted = await restart()
  t.equal(restarted.queued, 1, 'the queued task is queued again')
  t.equal(restarted.leased, 1, 'the leased task keeps its lease')
  const after = slot(restarted, ['onnx', 'torchscript'])
  // the queued one at once; the leased one once its lease (300 ms, its device never heartbeats) has expired
  // (this device never heartbeats either: its leases expire too, and the tasks are sent again)
  const sent = new Map<string, unknown>()
  await eventually(async () => {
    for (const frame of after) if (!sent.has(frame.task_id)) sent.set(frame.task_id, frame.input)
    return sent.size === 2 || undefined
  }, 10_000, 'both tasks sent by the restarted scheduler')
  t.same(sent.get(waiting.task_id), waiting.inputs[0], 'the queued task with its inputs, read back from its blob')
  t.same(sent.get(leased.task_id), leased.inputs[0], 'the leased task, after its lease expired, with its inputs')
})

t.test('a task whose inputs blob is gone at a restart fails for good with the reason', async (t) => {
  const { scheduler, store, blobs, database, projections, restart } = await restartSetup(t)
  const lost = bigTask()
  const kept = bigTask()
  await scheduler.submitAll([lost, kept], { customerId: 'cust_test' })
  await unlink(blobs.pathOf((await queuedData(store, lost.task_id)).inputs_blob!.sha256))
  const restarted = await restart()
  const events = await store.readStream(taskStream(lost.task_id))
  t.same(events.map((e) => e.type), ['TaskQueued', 'TaskFailed'])
  t.match(events.at(-1)!.data, { task_id: lost.task_id, reason: /cannot run after a restart: its inputs blob [0-9a-f]{64} is missing from the blob store/ })
  t.equal(restarted.queued, 1, 'the other task is queued')
  await projections.waitFor(await store.headPosition())
  const row = await sql<{ status: string; error: string }>`select status, error from ${sql.table(`${liveSchema('tasks')}.tasks`)} where task_id = ${lost.task_id}`.execute(database.db)
  t.match(row.rows[0], { status: 'failed', error: /missing/ }, 'the read model shows it failed')
})

t.test('blob GC keeps an open task\'s inputs, and collects them once it ended longer ago than the grace period', async (t) => {
  const { scheduler, store, blobs, database, projections } = await testApp(t)
  const task = bigTask()
  await scheduler.submit(task, { customerId: 'cust_test' })
  const sha256 = (await queuedData(store, task.task_id)).inputs_blob!.sha256
  // ten minutes on: the blob is older than the grace period (a minute)
  const collector = new BlobCollector({ blobs, store, db: database.db, waitFor: (p, ms) => projections.waitFor(p, ms), graceMs: 60_000, now: () => new Date(Date.now() + 600_000) })
  await collector.collect()
  t.ok(await blobs.has(sha256), 'kept while the task is open')
  await scheduler.cancel(task.task_id, 'cust_test')
  const collected = await collector.collect()
  t.notOk(await blobs.has(sha256), 'collected once the task ended more than the grace period ago')
  t.ok(collected.deleted >= 1)
})

t.test('the same inputs submitted twice are one blob', async (t) => {
  const { scheduler, store, blobs } = await testApp(t)
  const first = bigTask()
  const again = { ...bigTask(), inputs: first.inputs }
  await scheduler.submit(first, { customerId: 'cust_test' })
  await scheduler.submit(again, { customerId: 'cust_test' })
  const [a, b] = [await queuedData(store, first.task_id), await queuedData(store, again.task_id)]
  t.equal(a.inputs_blob!.sha256, b.inputs_blob!.sha256)
  const stored = []
  for await (const blob of blobs.list()) stored.push(blob.sha256)
  t.same(stored, [a.inputs_blob!.sha256], 'one file')
  t.same(await blobs.pending(), [], 'no temporary file left')
})
