import t from 'tap'
import { type TaskCommand, taskDecider, type TaskSpec, type TaskState } from '../../src/domain/task.js'
import { NO_VALIDATION } from '../../src/domain/validation.js'

const spec: TaskSpec = {
  task_id: 'task_1', customer_id: 'cust_1', job_id: 'job_1', project_id: null,
  model: { id: 'model_1', format: 'onnx', checksum: 'abc' }, inputs: [{ data: [1, 2], shape: [1, 2] }],
  output_shape: null, prefer_gpu: false, instance_type: null, max_attempts: 2, validation: NO_VALIDATION, batching: null,
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

const metrics = { cpu_ms: 4, gpu_ms: 0, bytes_in: 8, bytes_out: 4 }
const user = (n: number) => ({ leaseId: `lease_${n}`, deviceId: `dev_${n}`, sdkUuid: `sdk_${n}`, instanceType: 'user' as const })
const output = (v: number) => [{ data: [v], shape: [1, 1] }]

/** Queues a quorum task and runs it on devices 1.. in turn, each answering the value given. */
function quorum(values: number[]) {
  let { state } = run(taskDecider.initialState(), { type: 'QueueTask', task: { ...spec, max_attempts: 3, validation: { ...NO_VALIDATION, mode: 'quorum' } }, at })
  const all = []
  for (const [i, v] of values.entries()) {
    state = run(state, { type: 'LeaseTask', ...user(i + 1), at }).state
    const step = run(state, { type: 'CompleteTask', leaseId: `lease_${i + 1}`, outputs: output(v), metrics, at })
    all.push(...step.events)
    state = step.state
  }
  return { events: all, state }
}

t.test('quorum: a contributed device\'s result is held until another run agrees within the tolerance', async (t) => {
  const first = quorum([0.5])
  t.same(first.events.map((e) => e.type), ['TaskResultHeld'])
  t.equal(first.state.status, 'queued', 'back in the queue for a second run')
  const agreed = quorum([0.5, 0.50001])
  t.same(agreed.events.map((e) => e.type), ['TaskResultHeld', 'TaskValidated', 'TaskCompleted'])
  const validated = agreed.events[1]!.data as { runs: { device_id: string; verdict: string }[] }
  t.same(validated.runs.map((r) => [r.device_id, r.verdict]), [['dev_1', 'accepted'], ['dev_2', 'agreed']])
  t.match(agreed.events[2]!.data, { device_id: 'dev_1', outputs: output(0.5), validated: true }, 'the accepted run is delivered and billed')
})

t.test('quorum: on disagreement a third run decides, and the outvoted device is named', async (t) => {
  const { events, state } = quorum([9, 0.5, 0.5])
  t.same(events.map((e) => e.type), ['TaskResultHeld', 'TaskResultHeld', 'TaskValidated', 'TaskCompleted'])
  t.same((events[1]!.data as { disagrees_with: string[] }).disagrees_with, ['dev_1'])
  const validated = events[2]!.data as { agreed: boolean; runs: { device_id: string; verdict: string }[] }
  t.same(validated.runs.map((r) => [r.device_id, r.verdict]), [['dev_1', 'outvoted'], ['dev_2', 'accepted'], ['dev_3', 'agreed']])
  t.match(events[3]!.data, { device_id: 'dev_2', outputs: output(0.5) })
  t.equal(state.status, 'completed')
})

t.test('quorum: runs that never agree fail the task after the most runs, every run outvoted', async (t) => {
  const { events, state } = quorum([1, 2, 3, 4, 5])
  t.same(events.map((e) => e.type).slice(-3), ['TaskResultHeld', 'TaskValidated', 'TaskFailed'])
  t.equal(state.status, 'failed')
})

t.test('held runs do not use up attempts; a cloud result is not held', async (t) => {
  const held = quorum([1])
  const leased = run(held.state, { type: 'LeaseTask', ...user(2), at }).state
  const failed = run(leased, { type: 'FailAttempt', leaseId: 'lease_2', reason: 'boom', metrics: null, at })
  t.match(failed.events[0]!.data, { requeued: true }, 'two leases, one failure: attempts left')
  t.same(failed.state.failedOn, ['dev_2'])
  let { state } = run(taskDecider.initialState(), { type: 'QueueTask', task: { ...spec, validation: { ...NO_VALIDATION, mode: 'quorum' } }, at, lease: grant })
  const done = run(state, { type: 'CompleteTask', leaseId: 'lease_1', outputs: output(1), metrics, at })
  t.same(done.events.map((e) => e.type), ['TaskCompleted'], 'aws is run by the platform: taken as it is')
  state = done.state
})

t.test('metering: a claim above wall time x cores is clamped and flagged, the claim kept', async (t) => {
  const { state } = run(taskDecider.initialState(), { type: 'QueueTask', task: spec, at, lease: grant })
  const claimed = { cpu_ms: 1e10, gpu_ms: 50, bytes_in: 8, bytes_out: 4 }
  const { events } = run(state, { type: 'CompleteTask', leaseId: 'lease_1', outputs: output(1), metrics: claimed, observed: { wall_ms: 5, cpu_cores: 4, gpus: 0 }, at })
  t.match(events[0]!.data, { metrics: { cpu_ms: 20, gpu_ms: 0 }, claimed_metrics: claimed, metering_clamped: true })
  const honest = run(state, { type: 'CompleteTask', leaseId: 'lease_1', outputs: output(1), metrics, observed: { wall_ms: 5, cpu_cores: 4, gpus: 0 }, at })
  t.match(honest.events[0]!.data, { metrics, claimed_metrics: null, metering_clamped: false })
})

t.test('inputs in a blob: the event names the blob, and the task counts its inputs from it as from inline ones', async (t) => {
  const { inputs: _inline, ...rest } = spec
  const inputs_blob = { sha256: 'ab'.repeat(32), bytes: 4000, count: 3 }
  const { events, state } = run(taskDecider.initialState(), { type: 'QueueTask', task: { ...rest, inputs_blob }, at, lease: grant })
  t.same(events[0]!.data, { ...rest, inputs_blob, queued_at: at }, 'the blob reference and no inputs')
  t.throws(() => run(state, { type: 'CompleteTask', leaseId: 'lease_1', outputs: output(1), metrics, at }), /has 3 inputs but the result has 1 outputs/)
  const done = run(state, { type: 'CompleteTask', leaseId: 'lease_1', outputs: [...output(1), ...output(2), ...output(3)], metrics, at })
  t.match(done.events[0]!.data, { inputs: 3, outputs: [{ data: [1] }, { data: [2] }, { data: [3] }] }, 'billed by the blob\'s count')
  // an event before #25, inputs inline (the form a TaskQueued had until now), folds as it did
  const old = taskDecider.parse({ type: 'TaskQueued', data: { ...spec, queued_at: at }, schemaVersion: 1 })
  t.same(taskDecider.evolve(taskDecider.initialState(), old).spec?.inputs, spec.inputs)
  t.throws(() => taskDecider.parse({ type: 'TaskQueued', data: { ...spec, inputs_blob, queued_at: at }, schemaVersion: 1 }), /either inputs or inputs_blob/, 'never both')
  t.throws(() => taskDecider.parse({ type: 'TaskQueued', data: { ...rest, queued_at: at }, schemaVersion: 1 }), /either inputs or inputs_blob/, 'nor neither')
  t.throws(() => run(taskDecider.initialState(), { type: 'QueueTask', task: rest, at }), /either inputs or inputs_blob/)
})

t.test('FailTask ends an open task for good with its reason, and only an open one', async (t) => {
  const queued = run(taskDecider.initialState(), { type: 'QueueTask', task: spec, at }).state
  const failed = run(queued, { type: 'FailTask', reason: 'its inputs blob is missing', at })
  t.match(failed.events, [{ type: 'TaskFailed', data: { task_id: 'task_1', job_id: 'job_1', reason: 'its inputs blob is missing', failed_at: at } }])
  t.equal(failed.state.status, 'failed')
  const leased = run(queued, { type: 'LeaseTask', ...grant, at }).state
  t.equal(run(leased, { type: 'FailTask', reason: 'gone', at }).state.status, 'failed', 'a leased one too')
  t.throws(() => run(failed.state, { type: 'FailTask', reason: 'again', at }), /already failed/)
})

t.test('outputs in a blob: TaskCompleted names the blob; held and validated results keep theirs inline; old inline events fold', async (t) => {
  const outputs_blob = { sha256: 'cd'.repeat(32), bytes: 90_000, count: 1, values: 1 }
  const leased = run(taskDecider.initialState(), { type: 'QueueTask', task: spec, at, lease: grant }).state
  const done = run(leased, { type: 'CompleteTask', leaseId: 'lease_1', outputs: output(7), outputs_blob, metrics, at })
  t.equal(done.events[0]!.type, 'TaskCompleted')
  t.match(done.events[0]!.data, { task_id: 'task_1', outputs_blob, validated: false }, 'the blob reference')
  t.equal((done.events[0]!.data as { outputs?: unknown }).outputs, undefined, 'and no outputs')
  t.equal(done.state.status, 'completed')
  t.throws(() => run(leased, { type: 'CompleteTask', leaseId: 'lease_1', outputs: output(7), outputs_blob: { ...outputs_blob, count: 2 }, metrics, at }), /outputs blob holds 2 outputs/)
  // an event before #25, outputs inline, parses and folds as it did
  const old = taskDecider.parse({ type: 'TaskCompleted', data: { task_id: 'task_1', job_id: 'job_1', lease_id: 'lease_1', device_id: 'dev_1', sdk_uuid: null, instance_type: 'aws', attempt: 1, customer_id: 'cust_1', model_id: 'model_1', inputs: 1, outputs: output(7), metrics, completed_at: at }, schemaVersion: 1 })
  t.same(old.type === 'TaskCompleted' && old.data.outputs, output(7))
  t.equal(taskDecider.evolve(leased, old).status, 'completed')
  const { outputs: _inline, ...withoutOutputs } = old.data as Record<string, unknown>
  t.throws(() => taskDecider.parse({ type: 'TaskCompleted', data: { ...old.data, outputs_blob }, schemaVersion: 1 }), /either outputs or outputs_blob/, 'never both')
  t.throws(() => taskDecider.parse({ type: 'TaskCompleted', data: withoutOutputs, schemaVersion: 1 }), /either outputs or outputs_blob/, 'nor neither')
  // validation compares held outputs: a held result and a validated completion carry them inline, blob or not
  let { state } = run(taskDecider.initialState(), { type: 'QueueTask', task: { ...spec, max_attempts: 3, validation: { ...NO_VALIDATION, mode: 'quorum' } }, at })
  const events = []
  for (const i of [1, 2]) {
    state = run(state, { type: 'LeaseTask', ...user(i), at }).state
    const step = run(state, { type: 'CompleteTask', leaseId: `lease_${i}`, outputs: output(0.5), outputs_blob: { ...outputs_blob, sha256: String(i).repeat(64) }, metrics, at })
    events.push(...step.events)
    state = step.state
  }
  t.same(events.map((e) => e.type), ['TaskResultHeld', 'TaskValidated', 'TaskCompleted'])
  t.match(events[0]!.data, { outputs: output(0.5) })
  t.match(events[2]!.data, { outputs: output(0.5), validated: true })
  t.equal((events[2]!.data as { outputs_blob?: unknown }).outputs_blob, undefined)
})
