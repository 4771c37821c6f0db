import t, { type Test } from 'tap'
import { sampleOf } from '../../src/domain/validation.js'
import { ADMIN_KEY } from '../helpers/app.js'
import { eventually } from '../helpers/device.js'
import { inferenceSetup, input, poll } from '../helpers/inference.js'
import { type Behaviour, playDevice } from '../helpers/liar.js'
import { denseOnnxModel } from '../helpers/onnx.js'

const MODEL = denseOnnxModel({ inputs: 10, outputs: 2 })

async function fleet(t: Test, behaviours: Behaviour[], options: Parameters<typeof inferenceSetup>[1] = {}, device: Parameters<typeof playDevice>[3] = {}) {
  const setup = await inferenceSetup(t, { model: MODEL, ...options })
  const devices: Awaited<ReturnType<typeof playDevice>>[] = []
  for (const b of behaviours) devices.push(await playDevice(setup.url, MODEL, b, device))
  t.teardown(() => devices.forEach((d) => (d.stop(), d.device.kill())))
  return { ...setup, devices }
}

const near = (a: number[], b: number[], tolerance = 1e-4) => a.length === b.length && a.every((v, i) => Math.abs(v - b[i]!) <= tolerance * Math.max(Math.abs(v), Math.abs(b[i]!)) + 1e-6)

t.test('quorum: 1 liar of 4 contributed devices gives 0 wrong results, is quarantined, and the bill equals an honest run', async (t) => {
  const { api, devices, direct, scheduler, store } = await fleet(t, ['honest', 'honest', 'honest', 'perturb'], {}, { batchInputs: 20, maxTasks: 2 })
  const liar = devices[3]!
  const inputs = Array.from({ length: 2000 }, (_, i) => ({ data: input(i % 97), shape: [1, 10] }))
  const submitted = await api('POST', '/inference/batch', { model_id: (await api('GET', '/models')).body.models[0].id, inputs, options: { validation: 'quorum' } })
  t.equal(submitted.status, 202)
  const job = await poll(api, submitted.body.job_id, (b) => b.status === 'completed' || b.status === 'failed', 120_000, '?limit=10000')
  t.equal(job.status, 'completed')
  let wrong = 0
  for (const r of job.results) if (!near(r.result.data, await direct(inputs[r.index]!.data))) wrong++
  t.equal(wrong, 0, 'no wrong result delivered')
  t.equal(job.results.length, 2000)
  const reputation = await eventually(async () => {
    const r = (await api('GET', `/devices/${liar.deviceId}`)).body.reputation
    return r.disputed >= 3 && r
  }, 10_000, 'disputes in the read model')
  t.ok(reputation.disputed >= 3, `the liar was outvoted (${reputation.disputed} times)`)
  t.equal(scheduler.reputationOf(liar.deviceId).disputed >= 3, true)
  for (const honest of devices.slice(0, 3)) t.equal((await api('GET', `/devices/${honest.deviceId}`)).body.reputation.disputed, 0, 'no honest device outvoted')
  // quarantined: no work reaches it any more
  const before = liar.tasks
  const more = await api('POST', '/inference/batch', { model_id: job.model_id, inputs: inputs.slice(0, 200), options: { validation: 'quorum' } })
  await poll(api, more.body.job_id, (b) => b.status === 'completed', 60_000)
  t.equal(liar.tasks, before, 'the quarantined liar got no task')
  t.match((await api('GET', `/devices/${liar.deviceId}`)).body.quarantined, { reason: /outvoted in \d+ of \d+ validated results/ }, 'the quarantine is recorded, with why')
  for (const honest of devices.slice(0, 3)) t.equal((await api('GET', `/devices/${honest.deviceId}`)).body.quarantined, null)
  // the customer pays for each task once: as many tasks and inputs as the job has, replicas not billed
  const usage = (await api('GET', '/usage')).body
  const queued = (await store.readAll(undefined, 100_000)).filter((e) => e.type === 'TaskQueued').length
  const replicas = (await store.readAll(undefined, 100_000)).filter((e) => e.type === 'TaskLeased').length - queued
  t.ok(replicas >= queued, `every task ran again at least once (${replicas} extra runs for ${queued} tasks)`)
  t.equal(usage.inputs, 2200, 'each input billed once')
  t.equal(usage.tasks.total, queued, 'each task billed once, as in an honest run without replicas')
})

t.test('a device reporting 1e10 ms of CPU on a short task is billed at most wall time x cores, and the audit agrees', async (t) => {
  const { api, app, model, store } = await fleet(t, ["overbill"])
  const started = Date.now()
  const r = await api('POST', '/inference', { model_id: model.id, input: { data: input(1), shape: [1, 10] } })
  const wall = Date.now() - started
  t.equal(r.status, 200, JSON.stringify(r.body))
  const usage = (await api('GET', '/usage')).body
  t.ok(usage.cpu_ms <= wall * 2, `billed cpu_ms ${usage.cpu_ms} <= ${wall} ms x 2 cores`)
  t.ok(usage.cpu_ms >= 0)
  const audit = await app.inject({ method: 'GET', url: '/api/v1/admin/audit/usage', headers: { 'x-admin-key': ADMIN_KEY } })
  t.equal(audit.statusCode, 200)
  t.equal(audit.json().ok, true, 'the audit replays the bound')
  const events = await store.readAll(undefined, 100_000)
  const completed = events.find((e) => e.type === 'TaskCompleted')!.data as { metering_clamped: boolean; claimed_metrics: { cpu_ms: number } }
  t.equal(completed.metering_clamped, true, 'flagged')
  t.equal(completed.claimed_metrics.cpu_ms, 1e10, 'the claim is kept')
})

t.test('a device failing every task makes no task fail while honest devices are connected, and is quarantined', async (t) => {
  const { api, app, model, devices, scheduler } = await fleet(t, ['fail', 'honest', 'honest'])
  const results = await Promise.all(Array.from({ length: 30 }, (_, i) => api('POST', '/inference', { model_id: model.id, input: { data: input(i), shape: [1, 10] } })))
  t.same(results.map((r) => r.status), Array(30).fill(200), 'every request answered with its result')
  const failing = devices[0]!
  const reputation = await eventually(async () => {
    const r = (await api('GET', `/devices/${failing.deviceId}`)).body.reputation
    return r.failed_elsewhere_ok >= 5 && r
  }, 10_000, 'failures counted in the read model')
  t.ok(reputation.failed_elsewhere_ok >= 5, `failures of work that succeeded elsewhere counted (${reputation.failed_elsewhere_ok})`)
  const before = failing.tasks
  await Promise.all(Array.from({ length: 10 }, (_, i) => api('POST', '/inference', { model_id: model.id, input: { data: input(i), shape: [1, 10] } })))
  t.equal(failing.tasks, before, 'quarantined: it gets no more work')
  t.match((await api('GET', `/devices/${failing.deviceId}`)).body.quarantined, { reason: /failed \d+ tasks that then succeeded on other devices/ })
  // an operator releases it: its reputation starts afresh and it takes work again
  const released = await app.inject({ method: 'POST', url: `/api/v1/admin/devices/${failing.deviceId}/release`, headers: { 'x-admin-key': ADMIN_KEY } })
  t.equal(released.statusCode, 200, released.body)
  t.same((await api('GET', `/devices/${failing.deviceId}`)).body.reputation, { validated: 0, disputed: 0, completed: 0, failed_elsewhere_ok: 0 })
  t.same(scheduler.reputationOf(failing.deviceId), { validated: 0, disputed: 0, completed: 0, failedElsewhereOk: 0 })
  await Promise.all(Array.from({ length: 10 }, (_, i) => api('POST', '/inference', { model_id: model.id, input: { data: input(i), shape: [1, 10] } })))
  t.ok(failing.tasks > before, 'released: it takes work again')
})

t.test('wrong shapes: a retry goes to another device, never straight back to the one that failed it', async (t) => {
  const { api, model, devices, store } = await fleet(t, ['wrong-shape', 'honest', 'honest'])
  const results = await Promise.all(Array.from({ length: 20 }, (_, i) => api('POST', '/inference', { model_id: model.id, input: { data: input(i), shape: [1, 10] } })))
  t.same(results.map((r) => r.status), Array(20).fill(200))
  const events = await store.readAll(undefined, 100_000)
  const failedOnLiar = new Set(events.filter((e) => e.type === 'TaskAttemptFailed').map((e) => (e.data as { task_id: string }).task_id))
  const leasedTwiceToLiar = [...failedOnLiar].filter((id) => events.filter((e) => e.type === 'TaskLeased' && (e.data as { task_id: string; device_id: string }).task_id === id && (e.data as { device_id: string }).device_id === devices[0]!.deviceId).length > 1)
  t.same(leasedTwiceToLiar, [], 'no task went back to the device that failed it')
})

t.test('a sync request that fails answers with its job_id', async (t) => {
  const { api, model } = await fleet(t, ['wrong-shape'])
  const failed = await api('POST', '/inference', { model_id: model.id, input: { data: input(1), shape: [1, 10] } })
  t.equal(failed.status, 422)
  t.match(failed.body.error, { code: 'INFERENCE_FAILED', job_id: /^infer_/ })
  const job = await api('GET', `/inference/${failed.body.error.job_id}`)
  t.equal(job.body.status, 'failed', 'the job can be looked at')
})

t.test('a lease has a maximum lifetime whatever the heartbeats', async (t) => {
  const { api, model, devices, url } = await fleet(t, ['hold'], { maxLeaseMs: 1500 }, { maxTasks: 1 })
  const async = await api('POST', '/inference', { model_id: model.id, input: { data: input(1), shape: [1, 10] }, async: true })
  await eventually(async () => devices[0]!.tasks === 1, 10_000, 'the holder took the task')
  const honest = await playDevice(url, MODEL, 'honest')
  t.teardown(() => (honest.stop(), honest.device.kill()))
  const job = await poll(api, async.body.job_id, (b) => b.status === 'completed', 30_000)
  t.equal(job.device_id, honest.deviceId, 'the task went elsewhere once its lease ran out, though the holder kept heartbeating it')
})

t.test('spot: exactly the sampled share of a contributed device\'s tasks is run again', async (t) => {
  const { api, model, store } = await fleet(t, ['honest', 'honest'], { overrides: { validationSpotRate: 0.5 } })
  const results = await Promise.all(Array.from({ length: 30 }, (_, i) => api('POST', '/inference', { model_id: model.id, input: { data: input(i), shape: [1, 10] }, options: { validation: 'spot' } })))
  t.same(results.map((r) => r.status), Array(30).fill(200))
  const events = await store.readAll(undefined, 100_000)
  const held = events.filter((e) => e.type === 'TaskResultHeld').map((e) => (e.data as { task_id: string }).task_id)
  const completed = events.filter((e) => e.type === 'TaskCompleted').map((e) => (e.data as { task_id: string }).task_id)
  t.same(held.sort(), completed.filter((id) => sampleOf(id) < 0.5).sort(), 'the tasks whose sample falls under the rate, and only those')
  t.ok(held.length > 0 && held.length < 30)
})


t.test('quorum: a replica goes to another contributor, not to another device enrolled with the same token', async (t) => {
  const setup = await inferenceSetup(t, { model: MODEL })
  const { api, model, url, store, enrollmentToken } = setup
  const shared = (await enrollmentToken({ label: 'one contributor, two machines', instance_type: 'user' })).token
  const other = (await enrollmentToken({ label: 'another contributor', instance_type: 'user' })).token
  const devices = [
    await playDevice(url, MODEL, 'honest', { register: { enrollmentToken: shared } }),
    await playDevice(url, MODEL, 'honest', { register: { enrollmentToken: shared } }),
    await playDevice(url, MODEL, 'honest', { register: { enrollmentToken: other } }),
  ]
  t.teardown(() => devices.forEach((d) => (d.stop(), d.device.kill())))
  const sameOwner = new Set([devices[0]!.deviceId, devices[1]!.deviceId])
  const results = await Promise.all(Array.from({ length: 12 }, (_, i) => api('POST', '/inference', { model_id: model.id, input: { data: input(i), shape: [1, 10] }, options: { validation: 'quorum' } })))
  t.same(results.map((r) => r.status), Array(12).fill(200))
  const validated = (await store.readAll(undefined, 100_000)).filter((e) => e.type === 'TaskValidated').map((e) => (e.data as { runs: { device_id: string }[] }).runs.map((r) => r.device_id))
  t.equal(validated.length, 12)
  t.same(validated.filter((runs) => runs.every((d) => sameOwner.has(d))), [], 'no task validated by two machines of one contributor')
})
