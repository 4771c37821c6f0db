import * as ort from 'onnxruntime-node'
import t, { type Test } from 'tap'
import { decodeWeights, weightsToBase64 } from '../../src/domain/fedavg.js'
import { TrainingCoordinator } from '../../src/commands/training.js'
import { trainingStream } from '../../src/domain/training-job.js'
import { loadTrainable } from '../../src/sdk/trainer/index.js'
import { syntheticTask } from '../../src/sdk/trainer/synthetic.js'
import { eventually, SimDevice } from '../helpers/device.js'
import { MLP, trainingBody, trainingSetup } from '../helpers/training.js'

/** A simulated device that can train, heartbeating until the test ends. */
async function trainingDevice(t: Test, url: string): Promise<SimDevice> {
  const device = await SimDevice.connect(url)
  await device.register({ canTrain: true })
  const beat = setInterval(() => device.heartbeat(), 300)
  t.teardown(() => {
    clearInterval(beat)
    device.socket.close()
  })
  return device
}

/** A device's update from round 0: these weights, 640 samples in 20 steps. */
const trainUpdate = (jobId: string, weights: Record<string, Float32Array>) => ({ type: 'train_update', job_id: jobId, base_round: 0, weights: weightsToBase64(weights), samples: 640, steps: 20, loss: 1.2, metrics: { cpu_ms: 5, gpu_ms: 0 }, power_watts: 10 })

const argmax = (values: ArrayLike<number>, from: number, size: number) => {
  let best = 0
  for (let i = 1; i < size; i++) if (values[from + i]! > values[from + best]!) best = i
  return best
}

for (const syncMode of ['full_sync', 'semi_sync', 'async'] as const) {
  t.test(`${syncMode}: two devices train the MLP to 0.9 validation accuracy, and the trained model serves inference`, async (t) => {
    const { api, model, waitFor, store, blobs, workers } = await trainingSetup(t, { devices: 2 })
    const started = await api('POST', '/training', trainingBody(model.id, { training: { sync_mode: syncMode }, resources: { min_devices: 2, max_devices: 2 } }))
    t.equal(started.status, 202, JSON.stringify(started.body))
    t.match(started.body, { job_id: /^train_/, status: 'queued', estimated_devices: 2 })
    const jobId = started.body.job_id

    const done = await waitFor(jobId, (job) => job.status !== 'queued' && job.status !== 'running', 90_000)
    t.equal(done.status, 'completed', JSON.stringify(done))
    t.equal(done.end_reason, 'target_accuracy')
    t.ok(done.validation_accuracy >= 0.9, `validation accuracy ${done.validation_accuracy}`)
    t.ok(done.progress.batches_completed > 0 && done.progress.batches_completed < done.progress.total_batches)
    t.same(done.assigned_devices, [])

    // both devices contributed, and every round was checkpointed with its weights in the blob store
    const events = (await store.readStream(trainingStream(jobId))).filter((e) => e.type === 'TrainingRoundCompleted').map((e) => e.data as any)
    t.ok(events.length > 1, `${events.length} rounds`)
    // the job's losses are its rounds': the last one, and the lowest of them all
    t.equal(done.progress.current_loss, events.at(-1)!.loss, 'current loss: the last round\'s')
    t.equal(done.progress.best_loss, Math.min(...events.map((r) => r.loss as number)), 'best loss: the lowest round\'s')
    const contributors = new Set(events.flatMap((r) => r.contributions.map((c: any) => c.device_id)))
    const deviceIds = workers.map((w) => w.deviceId).sort()
    const assigned = (await store.readStream(trainingStream(jobId))).filter((e) => e.type === 'TrainingDevicesAssigned').flatMap((e) => (e.data as any).devices.map((d: any) => d.device_id))
    t.same([...new Set(assigned)].sort(), deviceIds, 'both devices were given the job')
    t.same([...contributors].sort(), deviceIds, 'both devices contributed')
    if (syncMode === 'full_sync') t.ok(events.every((r) => r.contributions.length === 2), 'full sync: every round has both devices')
    for (const round of events) t.ok(await blobs.has(round.weights_sha256), `round ${round.round} weights kept`)
    // every device's part of every round is metered: samples, and its compute time, billed as CPU time
    const usage = await api('GET', '/usage')
    const contributions = events.flatMap((r) => r.contributions as { samples: number; cpu_ms: number }[])
    t.equal(usage.body.training.samples, contributions.reduce((n, c) => n + c.samples, 0))
    t.ok(Math.abs(usage.body.training.cpu_ms - contributions.reduce((n, c) => n + Math.round(c.cpu_ms * 1000) / 1000, 0)) < 0.01)
    const rounds = await api("GET", `/training/${jobId}/rounds?limit=10000`)
    t.same(rounds.body.rounds.map((r: any) => r.round), events.map((r) => r.round))
    t.ok(rounds.body.rounds.every((r: any) => r.energy_joules > 0 && r.devices >= 1))

    // the trained model is the customer's and serves inference with the trainer's predictions
    const trained = await api('GET', `/models/${done.trained_model_id}`)
    t.equal(trained.status, 200)
    const trainer = loadTrainable(await blobs.read(model.checksum.replace('sha256:', '')))
    trainer.setWeights(decodeWeights(await blobs.read(events.at(-1)!.weights_sha256)))
    const samples = syntheticTask({ inputs: MLP.inputs, outputs: MLP.outputs, seed: 1234 }).validationSet(5)
    const expected = Array.from(trainer.forward(samples.x))
    const session = await ort.InferenceSession.create(await blobs.read(trained.body.checksum.replace('sha256:', '')))
    for (let i = 0; i < 5; i++) {
      const input = Array.from(samples.x.subarray(i * MLP.inputs, (i + 1) * MLP.inputs))
      const served = await api('POST', '/inference', { model_id: done.trained_model_id, input: { data: input, shape: [1, MLP.inputs] } })
      t.equal(served.status, 200, JSON.stringify(served.body))
      const output: number[] = served.body.result.data
      const row = expected.slice(i * MLP.outputs, (i + 1) * MLP.outputs)
      t.ok(output.every((v, j) => Math.abs(v - row[j]!) < 1e-4), `sample ${i}: served ${output} vs trainer ${row}`)
      t.equal(argmax(output, 0, MLP.outputs), argmax(row, 0, MLP.outputs))
      const direct = await session.run({ input: new ort.Tensor('float32', Float32Array.from(input), [1, MLP.inputs]) })
      t.ok(Array.from(direct.output!.data as Float32Array).every((v, j) => Math.abs(v - row[j]!) < 1e-4))
    }
  })
}

t.test('pause releases the devices, resume continues from the last round, cancel ends it', async (t) => {
  const left: string[] = []
  const { api, model, waitFor, store } = await trainingSetup(t, { devices: 1, worker: { log: (line) => left.push(line.message) } })
  const body = trainingBody(model.id, { data: { total_samples: 1_000_000 }, training: { target_accuracy: undefined, epochs: 100 } })
  const { body: started } = await api('POST', '/training', body)
  const jobId = started.job_id
  await waitFor(jobId, (job) => job.status === 'running' && job.progress.rounds >= 2)

  const paused = await api('POST', `/training/${jobId}/pause`)
  t.equal(paused.status, 200)
  t.equal(paused.body.status, 'paused')
  t.same(paused.body.assigned_devices, [])
  const again = await api('POST', `/training/${jobId}/pause`)
  t.equal(again.status, 409)
  t.equal(again.body.error.code, 'CANNOT_PAUSE')
  const roundsAtPause = (await api('GET', `/training/${jobId}`)).body.progress.rounds
  // too late for a round now: the device has left the job (its train_stop arrived; it trains no more)
  await eventually(async () => left.some((line) => line.includes(`training job ${jobId}: leaving`)), 10_000, 'the device to leave the job')
  t.equal((await api('GET', `/training/${jobId}`)).body.progress.rounds, roundsAtPause, 'no rounds while paused')

  const resumed = await api('POST', `/training/${jobId}/resume`)
  t.equal(resumed.status, 200)
  t.ok(['queued', 'running'].includes(resumed.body.status))
  const running = await waitFor(jobId, (job) => job.status === 'running' && job.progress.rounds > roundsAtPause + 1)
  t.ok(running.progress.batches_completed > 0)
  const resumeAgain = await api('POST', `/training/${jobId}/resume`)
  t.equal(resumeAgain.body.error.code, 'CANNOT_RESUME')

  const cancelled = await api('DELETE', `/training/${jobId}`)
  t.equal(cancelled.status, 200)
  t.equal(cancelled.body.status, 'cancelled')
  const twice = await api('DELETE', `/training/${jobId}`)
  t.equal(twice.status, 409)
  t.equal(twice.body.error.code, 'CANNOT_CANCEL')
  const history = await store.readStream(trainingStream(jobId))
  const rounds = history.filter((e) => e.type === 'TrainingRoundCompleted').map((e) => (e.data as any).round)
  t.same(rounds, rounds.map((_, i) => i + 1), 'rounds are numbered without a gap across the pause')
  const types = history.map((e) => e.type)
  t.notOk(types.slice(types.indexOf('TrainingPaused'), types.indexOf('TrainingResumed')).includes('TrainingRoundCompleted'), 'the log has no round between the pause and the resume')
})

t.test('a device that leaves while it is being assigned is released, and the job goes on with the next device', async (t) => {
  const { api, model, waitFor, store, training, startDevice } = await trainingSetup(t)
  const first = await startDevice()
  // recording the assignment is slow (a busy database): the device is gone before it lands
  const append = store.append.bind(store)
  let slowed = 0
  store.append = async (streamId, events, options) => {
    if (events.some((e) => e.type === 'TrainingDevicesAssigned') && slowed++ === 0) {
      await first.stop({ drain: false })
      await new Promise((r) => setTimeout(r, 300)) // its disconnect is handled meanwhile
    }
    return append(streamId, events, options)
  }
  t.teardown(() => {
    store.append = append
  })
  const body = trainingBody(model.id, { data: { total_samples: 1_000_000 }, training: { target_accuracy: undefined, epochs: 100 } })
  const { body: started } = await api('POST', '/training', body)
  const jobId = started.job_id
  await eventually(async () => (await store.readStream(trainingStream(jobId))).some((e) => e.type === 'TrainingDevicesReleased') || undefined, 10_000, 'the device released')
  const released = (await store.readStream(trainingStream(jobId))).find((e) => e.type === 'TrainingDevicesReleased')
  t.match(released?.data, { device_ids: [first.deviceId], reason: /left while it was being assigned/ })
  t.equal(training.jobOfDevice(first.deviceId!), undefined, 'not kept as a member that never trains')
  await startDevice()
  const running = await waitFor(jobId, (job) => job.status === 'running' && job.progress.rounds >= 1, 60_000)
  t.equal(running.assigned_devices.length, 1, 'the next device trains it')
  t.equal((await api('DELETE', `/training/${jobId}`)).body.status, 'cancelled')
})

t.test('two jobs of weights 3:1 on four devices get 3 and 1; a third job makes the scheduler drain devices to it', async (t) => {
  const { api, model, waitFor, store } = await trainingSetup(t, { devices: 4 })
  const long = (samples: number) => trainingBody(model.id, { data: { total_samples: samples }, training: { target_accuracy: undefined, epochs: 100 } })
  const a = (await api('POST', '/training', long(3_000_000))).body.job_id
  const b = (await api('POST', '/training', long(1_000_000))).body.job_id
  const [jobA, jobB] = await eventually(async () => {
    const [x, y] = await Promise.all([api('GET', `/training/${a}`), api('GET', `/training/${b}`)])
    return x.body.assigned_devices.length === 3 && y.body.assigned_devices.length === 1 ? [x.body, y.body] : undefined
  }, 30_000, 'a 3:1 split')
  t.equal(new Set([...jobA.assigned_devices, ...jobB.assigned_devices]).size, 4, 'no device in both jobs')

  const c = (await api('POST', '/training', long(4_000_000))).body.job_id
  const split = await eventually(async () => {
    const jobs = await Promise.all([a, b, c].map(async (id) => (await api('GET', `/training/${id}`)).body))
    const counts = jobs.map((j) => j.assigned_devices.length)
    return counts[2] >= 1 && counts.reduce((x, y) => x + y, 0) === 4 ? jobs : undefined
  }, 30_000, 'the third job to get devices')
  t.equal(new Set(split.flatMap((j: any) => j.assigned_devices)).size, 4)
  t.ok(split[1].assigned_devices.length >= 1, 'the small job keeps its minimum')
  const released = (await store.readStream(trainingStream(a))).filter((e) => e.type === 'TrainingDevicesReleased').map((e) => (e.data as any).reason)
  t.ok(released.includes('moved to another job'), `job A drained a device at a round boundary: ${released}`)
  for (const id of [a, b, c]) await api('DELETE', `/training/${id}`)
  await waitFor(c, (job) => job.status === 'cancelled')
})

t.test('bad submissions get clear errors', async (t) => {
  const { api, model } = await trainingSetup(t)
  // no device can train yet
  const none = await api('POST', '/training', trainingBody(model.id))
  t.equal(none.status, 503)
  t.equal(none.body.error.code, 'NO_TRAINING_DEVICES')
  const missing = await api('POST', '/training', trainingBody('model_nope'))
  t.equal(missing.body.error.code, 'NO_MODEL')
  for (const bad of [
    { ...trainingBody(model.id), data_config: { type: 'stream', batch_size: 32 } },
    trainingBody(model.id, { training: { sync_mode: 'sometimes' } }),
    trainingBody(model.id, { training: { learning_rate: -1 } }),
    trainingBody(model.id, { resources: { min_devices: 3, max_devices: 2 } }),
    trainingBody(model.id, { resources: { min_sdk_version: 'latest' } }),
    trainingBody(model.id, { data: { type: 'dataset' } }),
    { model_id: model.id },
  ]) {
    const r = await api('POST', '/training', bad)
    t.equal(r.status, 400, JSON.stringify(bad))
    t.equal(r.body.error.code, 'VALIDATION_ERROR')
  }
  t.equal((await api('GET', '/training/train_nope')).body.error.code, 'NOT_FOUND')
  t.equal((await api('POST', '/training/train_nope/pause')).body.error.code, 'NOT_FOUND')
  t.equal((await api('DELETE', '/training/train_nope')).body.error.code, 'NOT_FOUND')
  t.same((await api('GET', '/training')).body.jobs, [], 'no refused submission left a job behind')
})

t.test('a device sending weights that do not fit is refused without harming the job; a device that fails leaves it', async (t) => {
  const { api, model, url, bytes, waitFor, store } = await trainingSetup(t)
  const device = await trainingDevice(t, url)
  const jobId = (await api('POST', '/training', trainingBody(model.id, { training: { sync_mode: 'full_sync' }, resources: { max_devices: 1 } }))).body.job_id
  const start = await device.next((f) => f.type === 'train_start')
  t.match(start, { job_id: jobId, round: 0, config: { sync_mode: 'full_sync', local_steps: 20, loss: 'cross_entropy' }, data: { type: 'stream' } })
  t.notOk(start.weights, 'round 0 starts from the model file')
  const weights = loadTrainable(bytes).getWeights()
  const update = (w: Record<string, Float32Array>) => trainUpdate(jobId, w)

  const { W1: _dropped, ...missing } = weights
  device.send(update(missing))
  t.match(await device.next((f) => f.type === 'error'), { code: 'INVALID_FRAME', message: /tensors/ })
  device.send(update({ ...weights, W2: new Float32Array(weights.W2!.length).fill(Number.NaN) }))
  t.match(await device.next((f) => f.type === 'error'), { code: 'INVALID_FRAME', message: /non-finite/ })
  t.equal((await api('GET', `/training/${jobId}`)).body.status, 'running', 'the job goes on')

  // figures the read models could not hold are refused at the door (a loss of 1e308 over 640 samples made the
  // round's mean loss infinite, stored as null: an event no projection could read back)
  device.send({ ...update(weights), loss: 1e308 })
  t.match(await device.next((f) => f.type === 'error'), { code: 'INVALID_FRAME', message: /loss/ })
  device.send({ ...update(weights), metrics: { cpu_ms: 1e16, gpu_ms: 0 } })
  t.match(await device.next((f) => f.type === 'error'), { code: 'INVALID_FRAME', message: /cpu_ms/ })

  device.send(update(weights))
  const next = await device.next((f) => f.type === 'train_weights')
  t.equal(next.round, 1, 'a good update closes the round')
  device.send({ type: 'train_error', job_id: jobId, error: 'boom' })
  const left = await waitFor(jobId, (job) => job.assigned_devices.length === 0)
  t.equal(left.status, 'queued', 'the job waits for another device')
  const reasons = (await store.readStream(trainingStream(jobId))).filter((e) => e.type === 'TrainingDevicesReleased').map((e) => (e.data as any).reason)
  t.same(reasons, ['training failed on the device: boom'])
})

t.test('weights that diverged (finite but huge) fail the job, saying why, instead of storing a round no one can read', async (t) => {
  const { api, model, url, bytes, waitFor, store } = await trainingSetup(t)
  const device = await trainingDevice(t, url)
  const jobId = (await api('POST', '/training', trainingBody(model.id, { training: { sync_mode: 'full_sync' }, resources: { max_devices: 1 } }))).body.job_id
  await device.next((f) => f.type === 'train_start')
  const weights = loadTrainable(bytes).getWeights()
  const huge = Object.fromEntries(Object.entries(weights).map(([name, w]) => [name, new Float32Array(w.length).fill(1e20)]))
  device.send(trainUpdate(jobId, huge))
  const failed = await waitFor(jobId, (job) => job.status === 'failed', 10_000)
  t.match(failed.error, /training diverged: round 1's weights give a validation loss of (NaN|Infinity)/)
  const events = await store.readStream(trainingStream(jobId))
  t.notOk(events.some((e) => e.type === 'TrainingRoundCompleted'), 'no round stored')
  t.equal((await api('GET', '/usage')).status, 200, 'the read models go on')
})

t.test('a job whose last round reached its goal before a crash is completed on restart, not trained on', async (t) => {
  const { api, model, url, bytes, waitFor, store, database, blobs, projections } = await trainingSetup(t)
  const device = await trainingDevice(t, url)
  // one epoch of 20 batches: one update of 20 steps reaches it
  const body = trainingBody(model.id, { data: { total_samples: 640 }, training: { epochs: 1, target_accuracy: undefined, sync_mode: 'full_sync' }, resources: { max_devices: 1 } })
  const jobId = (await api('POST', '/training', body)).body.job_id
  await device.next((f) => f.type === 'train_start')
  // the process "dies" right after the round is recorded: nothing more reaches the job's stream
  const append = store.append.bind(store)
  let rounds = 0
  store.append = async (streamId, events, options) => {
    if (streamId === trainingStream(jobId) && rounds > 0) throw new Error('the process is gone')
    if (streamId === trainingStream(jobId) && events.some((e) => e.type === 'TrainingRoundCompleted')) rounds++
    return append(streamId, events, options)
  }
  const weights = loadTrainable(bytes).getWeights()
  device.send(trainUpdate(jobId, weights))
  await eventually(async () => rounds > 0 || undefined, 10_000, 'the round recorded')
  await new Promise((r) => setTimeout(r, 300))
  store.append = append
  t.equal((await api('GET', `/training/${jobId}`)).body.status, 'running', 'left running by the crash, at its goal')
  // a restart: a new coordinator recovers the unfinished jobs
  const restarted = new TrainingCoordinator({ store, db: database.db, blobs, roundDeadlineMs: 5000 })
  t.teardown(() => restarted.stop())
  await projections.waitFor(await store.headPosition())
  await restarted.recover()
  const done = await waitFor(jobId, (job) => job.status === 'completed', 10_000)
  t.equal(done.progress.rounds, 1, 'no round past its goal')
})

t.test('stopping the coordinator waits for the round being closed: its weights are written before stop returns', async (t) => {
  const { api, model, training, hub, blobs } = await trainingSetup(t, { devices: 1 })
  // the round's weights take a while to write: stop is called while they are being written
  let writing!: () => void
  const started = new Promise<void>((resolve) => (writing = resolve))
  let written = false
  const write = blobs.write.bind(blobs)
  blobs.write = async (...args: Parameters<typeof write>) => {
    writing()
    await new Promise((resolve) => setTimeout(resolve, 300))
    const pending = await write(...args)
    written = true
    return pending
  }
  const { status } = await api('POST', '/training', trainingBody(model.id, { training: { target_accuracy: undefined, epochs: 100 } }))
  t.equal(status, 202)
  await started
  await hub.close() // as on shutdown: no more frames
  await training.stop()
  t.ok(written, 'the weights being written when stop was called were written before it returned')
})
