import t, { type Test } from 'tap'
import { weightsToBase64 } from '../../src/domain/fedavg.js'
import { trainingStream } from '../../src/domain/training-job.js'
import { loadTrainable } from '../../src/sdk/trainer/index.js'
import { SimDevice } from '../helpers/device.js'
import { trainingBody, trainingSetup } from '../helpers/training.js'

/** A simulated device that can train, heartbeating until the test ends. */
async function trainingDevice(t: Test, url: string, instanceType: 'aws' | 'user' = 'user', enrollmentToken?: string): Promise<SimDevice> {
  const device = await SimDevice.connect(url)
  // a cloud device is one the platform enrolled with an aws token
  await device.register({ canTrain: true, instanceType, ...(enrollmentToken ? { enrollmentToken } : {}) })
  const beat = setInterval(() => device.heartbeat(), 300)
  t.teardown(() => {
    clearInterval(beat)
    device.socket.close()
  })
  return device
}

/** An update of the model file's own weights from `baseRound`, claiming these samples and steps. */
const update = (jobId: string, bytes: Uint8Array, baseRound: number, claims: { samples: number; steps: number } = { samples: 640, steps: 20 }) => ({
  type: 'train_update',
  job_id: jobId,
  base_round: baseRound,
  weights: weightsToBase64(loadTrainable(bytes).getWeights()),
  ...claims,
  loss: 1.2,
  metrics: { cpu_ms: 5, gpu_ms: 0 },
  power_watts: 10,
})

const eventsOf = async (store: { readStream(id: string): Promise<{ type: string; data: unknown }[]> }, jobId: string, type: string) =>
  (await store.readStream(trainingStream(jobId))).filter((e) => e.type === type).map((e) => e.data as any)

t.test('a claim of 10⁹ samples and steps is credited as the 640 samples the device was given, and cannot end the job', async (t) => {
  const { api, model, url, bytes, waitFor, store } = await trainingSetup(t)
  const device = await trainingDevice(t, url)
  // one epoch of 625 batches: before the cap, a claim of 10⁹ steps completed it in one round
  const body = trainingBody(model.id, { training: { sync_mode: 'full_sync', epochs: 1, target_accuracy: undefined }, resources: { max_devices: 1 } })
  const jobId = (await api('POST', '/training', body)).body.job_id
  await device.next((f) => f.type === 'train_start')
  device.send(update(jobId, bytes, 0, { samples: 1e9, steps: 1e9 }))
  t.equal((await device.next((f) => f.type === 'train_weights')).round, 1)
  const job = await waitFor(jobId, (j) => j.progress.rounds === 1)
  t.equal(job.status, 'running', 'the job goes on')
  t.equal(job.progress.batches_completed, 20, '640 samples of 32: 20 batches')
  t.equal(job.progress.samples_seen, 640)
  const [round] = await eventsOf(store, jobId, 'TrainingRoundCompleted')
  t.match(round, { samples: 640, steps: 20, batches_completed: 20, contributions: [{ samples: 640, steps: 20, claimed_samples: 1e9, claimed_steps: 1e9 }] })
  const rounds = await api('GET', `/training/${jobId}/rounds`)
  t.equal(rounds.body.rounds[0].samples, 640, 'the rounds read model records the capped samples')
  t.equal((await api('GET', '/usage')).body.training.samples, 640, 'and so does the bill')
  await api('DELETE', `/training/${jobId}`)
})

t.test('full sync: a second update from one device in a round is refused, recorded and counted', async (t) => {
  const { api, model, url, bytes, waitFor, store } = await trainingSetup(t)
  const a = await trainingDevice(t, url)
  const b = await trainingDevice(t, url)
  const body = trainingBody(model.id, { training: { sync_mode: 'full_sync', target_accuracy: undefined }, resources: { min_devices: 2, max_devices: 2 } })
  const jobId = (await api('POST', '/training', body)).body.job_id
  await Promise.all([a, b].map((d) => d.next((f) => f.type === 'train_start')))
  a.send(update(jobId, bytes, 0))
  a.send(update(jobId, bytes, 0))
  t.match(await a.next((f) => f.type === 'error'), { code: 'UPDATE_REFUSED', message: /already sent an update from round 0/ })
  b.send(update(jobId, bytes, 0))
  t.equal((await a.next((f) => f.type === 'train_weights')).round, 1, 'the round closes when the other device sends its update')
  const [round] = await eventsOf(store, jobId, 'TrainingRoundCompleted')
  t.same(round.contributions.map((c: any) => c.device_id).sort(), [a.deviceId, b.deviceId].sort(), 'one update of each device')
  t.match(await eventsOf(store, jobId, 'TrainingUpdateRefused'), [{ device_id: a.deviceId, base_round: 0, round: 0, reason: 'duplicate_round' }])
  const job = await waitFor(jobId, (j) => j.refused_updates === 1)
  t.equal(job.progress.rounds, 1)
  await api('DELETE', `/training/${jobId}`)
})

t.test('async: updates from one device closer together than sync_interval_ms / 10 are refused', async (t) => {
  const { api, model, url, bytes, waitFor, store } = await trainingSetup(t)
  const device = await trainingDevice(t, url)
  const body = trainingBody(model.id, { training: { sync_mode: 'async', sync_interval_ms: 10_000, target_accuracy: undefined }, resources: { max_devices: 1 } })
  const jobId = (await api('POST', '/training', body)).body.job_id
  await device.next((f) => f.type === 'train_start')
  device.send(update(jobId, bytes, 0))
  t.equal((await device.next((f) => f.type === 'train_weights')).round, 1)
  device.send(update(jobId, bytes, 1))
  t.match(await device.next((f) => f.type === 'error'), { code: 'UPDATE_REFUSED', message: /at most one per 1000 ms/ })
  t.match(await eventsOf(store, jobId, 'TrainingUpdateRefused'), [{ reason: 'too_frequent', base_round: 1 }])
  const job = await waitFor(jobId, (j) => j.refused_updates === 1)
  t.equal(job.progress.rounds, 1, 'the refused update made no round')
  await api('DELETE', `/training/${jobId}`)
})

t.test('instance_types ["aws"]: only cloud devices count and are assigned; such a job defaults to fedavg, others to trimmed_mean', async (t) => {
  const { api, model, url, enrollmentToken } = await trainingSetup(t)
  const user = await trainingDevice(t, url, 'user')
  const cloudOnly = trainingBody(model.id, { training: { target_accuracy: undefined, epochs: 100 }, resources: { instance_types: ['aws'] } })
  const none = await api('POST', '/training', cloudOnly)
  t.equal(none.status, 503, 'a user device does not count')
  t.equal(none.body.error.code, 'NO_TRAINING_DEVICES')
  const aws = await trainingDevice(t, url, 'aws', (await enrollmentToken({ instance_type: 'aws' })).token)
  const started = await api('POST', '/training', cloudOnly)
  t.equal(started.status, 202, JSON.stringify(started.body))
  t.equal(started.body.estimated_devices, 1, 'only the aws device is eligible')
  const jobId = started.body.job_id
  t.match(await aws.next((f) => f.type === 'train_start'), { job_id: jobId })
  const job = (await api('GET', `/training/${jobId}`)).body
  t.same(job.resource_config.instance_types, ['aws'])
  t.match(job.config, { aggregation: 'fedavg', clip_norm: null, clip_factor: null })
  t.same(job.assigned_devices, [aws.deviceId])

  // a job open to contributed devices: a robust rule by default, and it may take the user device
  const open = await api('POST', '/training', trainingBody(model.id, { training: { target_accuracy: undefined, epochs: 100 } }))
  t.equal(open.status, 202)
  const openJob = (await api('GET', `/training/${open.body.job_id}`)).body
  t.same(openJob.resource_config.instance_types, ['aws', 'user'])
  t.match(openJob.config, { aggregation: 'trimmed_mean', trim_fraction: 0.2, clip_norm: null, clip_factor: 2 })
  // its first job is the open one: the aws-only job, placed before it, never went to the user device
  t.match(await user.next((f) => f.type === 'train_start'), { job_id: open.body.job_id })
  t.notOk(user.frames.some((f) => f.type === 'train_start' && f.job_id === jobId), 'the user device was never given the aws-only job')
  for (const id of [jobId, open.body.job_id]) await api('DELETE', `/training/${id}`)
})

t.test('bad values for aggregation, clipping and instance_types: 400 naming the field', async (t) => {
  const { api, model } = await trainingSetup(t)
  for (const [field, bad] of [
    ['aggregation', trainingBody(model.id, { training: { aggregation: 'mean' } })],
    ['trim_fraction', trainingBody(model.id, { training: { aggregation: 'trimmed_mean', trim_fraction: 0.5 } })],
    ['trim_fraction', trainingBody(model.id, { training: { trim_fraction: -0.1 } })],
    ['clip_norm', trainingBody(model.id, { training: { clip_norm: 0 } })],
    ['clip_factor', trainingBody(model.id, { training: { clip_factor: 0.5 } })],
    ['instance_types', trainingBody(model.id, { resources: { instance_types: ['gcp'] } })],
    ['instance_types', trainingBody(model.id, { resources: { instance_types: [] } })],
  ] as const) {
    const r = await api('POST', '/training', bad)
    t.equal(r.status, 400, JSON.stringify(bad))
    t.equal(r.body.error.code, 'VALIDATION_ERROR')
    t.match(r.body.error.message, field, `the message names ${field}: ${r.body.error.message}`)
  }
})
