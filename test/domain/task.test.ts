import t from 'tap'
import { type TaskCommand, taskDecider, type TaskSpec, type TaskState } from '../../src/domain/task.js'

const spec: TaskSpec = {
  task_id: 'task_1', customer_id: 'cust_1', job_id: 'job_1', project_id: null,
  model: { id: 'model_1', format: 'onnx', checksum: 'abc' }, inputs: [{ data: [1, 2], shape: [1, 2] }],
  output_shape: null, prefer_gpu: false, instance_type: null, max_attempts: 2,
}
const grant = { leaseId: 'lease_1', deviceId: 'dev_1', sdkUuid: 'sdk_1', instanceType: 'aws' as const }
const at = '2026-11-30T04:00:00.000Z'

/** Decides and folds, as the command handler does; the events pass through their own schema (what is stored). */
function run(state: TaskState, command: TaskCommand) {
  const events = taskDecider.decide(command, state).map((e) => taskDecider.parse({ type: e.type, data: JSON.parse(JSON.stringify(e.data)), schemaVersion: 1 }))
  return { events, state: events.reduce(taskDecider.evolve, state) }
}

t.test('a task queued with a lease is queued and leased in one decision', async (t) => {
  const { events, state } = run(taskDecider.initialState(), { type: 'QueueTask', task: spec, at, lease: grant })
  t.same(events.map((e) => e.type), ['TaskQueued', 'TaskLeased'])
  t.match(events[1]!.data, { task_id: 'task_1', lease_id: 'lease_1', device_id: 'dev_1', sdk_uuid: 'sdk_1', instance_type: 'aws', attempt: 1, leased_at: at })
  t.equal(state.status, 'leased')
  t.equal(state.attempts, 1)
  t.throws(() => run(state, { type: 'LeaseTask', ...grant, leaseId: 'lease_2', at }), /not queued/, 'it cannot be leased again')
  const failed = run(state, { type: 'FailAttempt', leaseId: 'lease_1', reason: 'boom', metrics: null, at })
  t.same(failed.events.map((e) => e.type), ['TaskAttemptFailed'], 'its first attempt counts: one more is left')
  const again = run(failed.state, { type: 'LeaseTask', ...grant, leaseId: 'lease_2', at })
  t.equal(again.state.attempts, 2)
  const done = run(again.state, { type: 'CompleteTask', leaseId: 'lease_2', outputs: [{ data: [3], shape: [1, 1] }], metrics: { cpu_ms: 1, gpu_ms: 0, bytes_in: 8, bytes_out: 4 }, at })
  t.equal(done.state.status, 'completed')
})

t.test('a task queued without a lease waits in the queue', async (t) => {
  const { events, state } = run(taskDecider.initialState(), { type: 'QueueTask', task: spec, at })
  t.same(events.map((e) => e.type), ['TaskQueued'])
  t.equal(state.status, 'queued')
  t.throws(() => run(state, { type: 'QueueTask', task: spec, at, lease: grant }), /already exists/)
})
