import t, { type Test } from 'tap'
import { parseDataset, splitDataset } from '../../src/datasets/parse.js'
import { decodeWeights, type Weights, weightsFromBase64, weightsToBase64 } from '../../src/domain/fedavg.js'
import { TorchTool } from '../../src/commands/torch-tool.js'
import { TrainingCoordinator } from '../../src/commands/training.js'
import { trainingStream } from '../../src/domain/training-job.js'
import { syntheticTask } from '../../src/sdk/trainer/synthetic.js'
import { listeningApp, multipart } from '../helpers/app.js'
import { type RegisterOptions, SimDevice } from '../helpers/device.js'
import { mlpOnnxModel } from '../helpers/onnx.js'
import { close, runPython, TORCH_PRELUDE, torchScriptMlp } from '../helpers/torch.js'
import { MLP, trainingBody } from '../helpers/training.js'

/** A running server, a customer, and an upload helper. */
const server = (t: Test) => listeningApp(t, { rateLimit: { max: 100_000, windowMs: 60_000 } }, { heartbeatIntervalMs: 1000, roundDeadlineMs: 5000 })

/** A device that can train, heartbeating until the test ends. */
async function trainer(t: Test, url: string, register: RegisterOptions): Promise<SimDevice> {
  const device = await SimDevice.connect(url)
  await device.register({ canTrain: true, ...register })
  const beat = setInterval(() => device.heartbeat(), 300)
  t.teardown(() => {
    clearInterval(beat)
    device.socket.close()
  })
  return device
}

const PYTHON_TRAINER: RegisterOptions = { platform: 'python', formats: ['onnx', 'torchscript'], trainFormats: ['torchscript'], sdkUuid: 'sdk-python-test01' }
const stream = (seed: number) => ({ total_samples: 1_000_000, seed })

t.test('a TorchScript job goes only to devices that train TorchScript, with train_start saying so; an ONNX job only to ONNX trainers', async (t) => {
  const { url, api, upload, store } = await server(t)
  const torchModel = await upload('mlp.pt', await torchScriptMlp({ ...MLP, seed: 1 }))
  t.equal(torchModel.format, 'torchscript')
  const onnxModel = await upload('mlp.onnx', mlpOnnxModel({ ...MLP, seed: 7 }))

  // a Node device trains ONNX only (it declares no train_formats): no device for a TorchScript job
  const nodeTrainer = await trainer(t, url, {})
  const refused = await api('POST', '/training', trainingBody(torchModel.id, { data: stream(5) }))
  t.equal(refused.status, 503, JSON.stringify(refused.body))
  t.equal(refused.body.error.code, 'NO_TRAINING_DEVICES')
  t.match(refused.body.error.message as string, /trains torchscript models/)

  const pythonTrainer = await trainer(t, url, PYTHON_TRAINER)
  const torchJob = await api('POST', '/training', trainingBody(torchModel.id, { data: stream(5), training: { target_accuracy: undefined } }))
  t.equal(torchJob.status, 202, JSON.stringify(torchJob.body))
  t.equal(torchJob.body.estimated_devices, 1, 'only the Python trainer could take it')
  const start = await pythonTrainer.next((f) => f.type === 'train_start')
  t.match(start, { job_id: torchJob.body.job_id, round: 0, model: { id: torchModel.id, format: 'torchscript', download_path: `/api/v1/sdk/models/${torchModel.id}` } })

  const onnxJob = await api('POST', '/training', trainingBody(onnxModel.id, { data: stream(6), training: { target_accuracy: undefined } }))
  t.equal(onnxJob.status, 202, JSON.stringify(onnxJob.body))
  const onnxStart = await nodeTrainer.next((f) => f.type === 'train_start')
  t.match(onnxStart, { job_id: onnxJob.body.job_id, model: { id: onnxModel.id, format: 'onnx' } })

  const assigned = async (jobId: string) => (await store.readStream(trainingStream(jobId))).filter((e) => e.type === 'TrainingDevicesAssigned').flatMap((e) => (e.data as any).devices.map((d: any) => d.device_id))
  t.same(await assigned(torchJob.body.job_id), [pythonTrainer.deviceId], 'the TorchScript job: the Python trainer only')
  t.same(await assigned(onnxJob.body.job_id), [nodeTrainer.deviceId], 'the ONNX job: the Node trainer only')
  t.notOk(nodeTrainer.frames.some((f) => f.type === 'train_start' && f.job_id === torchJob.body.job_id), 'the Node trainer never got the TorchScript job')
  t.equal(((await store.readStream(trainingStream(torchJob.body.job_id)))[0]!.data as { model_format: string }).model_format, 'torchscript', 'the job records its format')
})

t.test('without a Python runtime (DCP_PYTHON pointing nowhere) a TorchScript job is a 400 that says how to get one', async (t) => {
  const before = process.env.DCP_PYTHON
  process.env.DCP_PYTHON = '/nowhere/python'
  const context = await server(t).finally(() => {
    if (before === undefined) delete process.env.DCP_PYTHON
    else process.env.DCP_PYTHON = before
  })
  const model = await context.upload('mlp.pt', await torchScriptMlp({ ...MLP, seed: 1 }))
  await trainer(t, context.url, PYTHON_TRAINER)
  const response = await context.api('POST', '/training', trainingBody(model.id, { data: stream(5) }))
  t.equal(response.status, 400, JSON.stringify(response.body))
  t.equal(response.body.error.code, 'VALIDATION_ERROR')
  t.match(response.body.error.message as string, /no Python runtime.*npm run setup:python/)
  t.equal((await context.api('GET', '/training')).body.total, 0, 'no job recorded')
})

/**
 * Plays a Python trainer: downloads the model as a device does, has torch work out its initial weights and
 * weights trained on the job's own synthetic task, and answers every train_start and train_weights with the
 * weights it was sent moved 5% of the way to those (a few rounds to the target).
 */
async function playPythonTrainer(t: Test, url: string, device: SimDevice, seed: number) {
  const start = await device.next((f) => f.type === 'train_start')
  const download = await fetch(`${url}${start.model.download_path}`, { headers: { 'x-sdk-token': device.sdkToken } })
  t.equal(download.status, 200, 'the device downloads the TorchScript model')
  const bytes = Buffer.from(await download.arrayBuffer())
  const samples = syntheticTask({ inputs: MLP.inputs, outputs: MLP.outputs, seed, kind: 'classification' }).sample(2000, 99)
  const found = await runPython<{ initial: Record<string, number[]>; target: Record<string, number[]> }>(`${TORCH_PRELUDE}
m = load(args['model'])
initial = weights(m)
x, labels = torch.tensor(args['x']).reshape(-1, ${MLP.inputs}), torch.tensor(args['labels'])
optimizer = torch.optim.Adam(m.parameters(), lr=0.05)
for _ in range(200):
    optimizer.zero_grad(); loss = torch.nn.functional.cross_entropy(m(x), labels); loss.backward(); optimizer.step()
print(json.dumps({'initial': initial, 'target': weights(m)}))
`, { model: bytes.toString('base64'), x: Array.from(samples.x), labels: Array.from(samples.labels) })
  const asWeights = (w: Record<string, number[]>): Weights => Object.fromEntries(Object.entries(w).map(([k, v]) => [k, Float32Array.from(v)]))
  const initial = asWeights(found.initial)
  const target = asWeights(found.target)
  const answer = (frame: any) => {
    const base = frame.weights ? weightsFromBase64(frame.weights) : initial
    const moved = Object.fromEntries(Object.entries(base).map(([name, values]) => [name, values.map((v, k) => v + 0.05 * (target[name]![k]! - v))]))
    device.send({ type: 'train_update', job_id: frame.job_id, base_round: frame.round, weights: weightsToBase64(moved), samples: 320, steps: 10, loss: 0.5, metrics: { cpu_ms: 5, gpu_ms: 0, wall_ms: 5 }, power_watts: 10 })
  }
  device.socket.on('message', (raw) => {
    const frame = JSON.parse(raw.toString())
    if (frame.type === 'train_weights') answer(frame)
  })
  answer(start)
  return { device, initial }
}

t.test('a TorchScript job end to end: a Python trainer\'s updates are aggregated, validated by torch, and the trained TorchScript model is registered and loads in torch', async (t) => {
  const { url, api, upload, store, blobs } = await server(t)
  const original = await torchScriptMlp({ ...MLP, seed: 2 })
  const model = await upload('mlp.pt', original)
  const seed = 777
  const device = await trainer(t, url, PYTHON_TRAINER)
  const started = await api('POST', '/training', trainingBody(model.id, { data: stream(seed), training: { sync_mode: 'full_sync', loss: 'cross_entropy', target_accuracy: 0.9, local_steps: 10, epochs: 10 } }))
  t.equal(started.status, 202, JSON.stringify(started.body))
  const jobId = started.body.job_id
  const { initial } = await playPythonTrainer(t, url, device, seed)

  let done: any
  for (const deadline = Date.now() + 60_000; Date.now() < deadline; await new Promise((r) => setTimeout(r, 100))) {
    done = (await api('GET', `/training/${jobId}`)).body
    if (done.status !== 'queued' && done.status !== 'running') break
  }
  t.equal(done.status, 'completed', JSON.stringify(done))
  t.equal(done.end_reason, 'target_accuracy')
  const rounds = (await store.readStream(trainingStream(jobId))).filter((e) => e.type === 'TrainingRoundCompleted').map((e) => e.data as any)
  t.ok(rounds.length >= 2, `${rounds.length} rounds: the device trained on from the aggregated weights it was sent`)
  t.ok(rounds.every((r) => r.contributions.length === 1 && r.contributions[0].sdk_uuid === PYTHON_TRAINER.sdkUuid), 'every round aggregated the Python trainer\'s update')
  const last = rounds.at(-1)!
  t.ok(last.accuracy >= 0.9, `validation accuracy ${last.accuracy}`)

  const trained = await api('GET', `/models/${done.trained_model_id}`)
  t.equal(trained.status, 200)
  t.equal(trained.body.format, 'torchscript')
  const file = await blobs.read(trained.body.checksum.replace('sha256:', ''))
  const lastWeights = decodeWeights(await blobs.read(last.weights_sha256))
  t.notOk(close(lastWeights['0.weight']!, initial['0.weight']!, 1e-3), 'the weights moved')
  // torch, on its own, loads the trained file: its weights are the last round's, and on the job's validation
  // samples it gives the loss and accuracy the server recorded for that round (the tool validated it)
  const validation = syntheticTask({ inputs: MLP.inputs, outputs: MLP.outputs, seed, kind: 'classification' }).validationSet(1000)
  const check = await runPython<{ weights: Record<string, number[]>; loss: number; accuracy: number; untrained: number }>(`${TORCH_PRELUDE}
m = load(args['model'])
x, labels = torch.tensor(args['x']).reshape(-1, ${MLP.inputs}), torch.tensor(args['labels'])
with torch.no_grad(): out, before = m(x), load(args['original'])(x)
print(json.dumps({'weights': weights(m), 'loss': float(torch.nn.functional.cross_entropy(out, labels)), 'accuracy': float((out.argmax(1) == labels).float().mean()), 'untrained': float((before.argmax(1) == labels).float().mean())}))
`, { model: Buffer.from(file).toString('base64'), original: original.toString('base64'), x: Array.from(validation.x), labels: Array.from(validation.labels) })
  t.ok(check.untrained < 0.9, `the uploaded model was not there yet (${check.untrained})`)
  for (const [name, values] of Object.entries(lastWeights)) t.ok(close(check.weights[name]!, values, 0), `${name}: the last round's`)
  t.ok(Math.abs(check.loss - last.validation_loss) < 1e-5, `validation loss ${last.validation_loss} vs torch ${check.loss}`)
  t.equal(check.accuracy, last.accuracy)
})

/** A CSV of the synthetic 4-class task (seed `seed`): a header, the MLP's 8 feature columns and `label`. */
function clustersCsv(rows: number, seed: number): Buffer {
  const sample = syntheticTask({ inputs: MLP.inputs, outputs: MLP.outputs, seed }).sample(rows, 1)
  const header = [...Array.from({ length: MLP.inputs }, (_, i) => `f${i}`), 'label'].join(',')
  const lines = Array.from({ length: rows }, (_, r) => [...Array.from(sample.x.subarray(r * MLP.inputs, (r + 1) * MLP.inputs), (v) => v.toFixed(5)), sample.labels[r]].join(','))
  return Buffer.from([header, ...lines].join('\n'))
}

t.test("a TorchScript dataset job: the data must fit the model torch describes, and the rounds are validated on the dataset's held-out rows", async (t) => {
  const { app, alice, url, api, upload, store, blobs } = await server(t)
  const model = await upload('mlp.pt', await torchScriptMlp({ ...MLP, seed: 3 }))
  const dataset = async (content: Buffer, name: string) => {
    const form = multipart({}, { field: 'file', name, content })
    const r = await app.inject({ method: 'POST', url: '/api/v1/datasets', headers: { ...form.headers, 'x-api-key': alice.key }, payload: form.payload })
    if (r.statusCode !== 201) throw new Error(`dataset upload failed: ${r.statusCode} ${r.body}`)
    return r.json() as { id: string; checksum: string }
  }
  const csv = clustersCsv(400, 11)
  const clusters = await dataset(csv, 'clusters.csv')
  const narrow = await dataset(Buffer.from('{"features":[1,2],"label":0}\n{"features":[3,4],"label":1}\n'), 'narrow.jsonl')
  const device = await trainer(t, url, PYTHON_TRAINER)

  const misfit = await api('POST', '/training', trainingBody(model.id, { data: { type: 'dataset', dataset_id: narrow.id } }))
  t.equal(misfit.status, 400, JSON.stringify(misfit.body))
  t.match(misfit.body.error.message as string, /2 features per row; the model takes 8/, 'the input size torch found')

  // 320 training rows, batches of 32: one round of 10 steps is the whole epoch, and the job ends with it
  const splitSeed = 5
  const started = await api('POST', '/training', trainingBody(model.id, { data: { type: 'dataset', dataset_id: clusters.id, seed: splitSeed }, training: { sync_mode: 'full_sync', loss: 'cross_entropy', epochs: 1, local_steps: 10, target_accuracy: undefined } }))
  t.equal(started.status, 202, JSON.stringify(started.body))
  const start = await device.next((f) => f.type === 'train_start', 30_000)
  t.match(start.data, { type: 'dataset', dataset_id: clusters.id, start: 0, end: 320, split_seed: splitSeed })
  device.frames.unshift(start) // the trainer below takes it from here
  await playPythonTrainer(t, url, device, 11)

  let done: any
  for (const deadline = Date.now() + 60_000; Date.now() < deadline; await new Promise((r) => setTimeout(r, 100))) {
    done = (await api('GET', `/training/${started.body.job_id}`)).body
    if (done.status !== 'queued' && done.status !== 'running') break
  }
  t.equal(done.status, 'completed', JSON.stringify(done))
  t.equal(done.end_reason, 'epochs')
  const round = (await store.readStream(trainingStream(started.body.job_id))).filter((e) => e.type === 'TrainingRoundCompleted').map((e) => e.data as any).at(-1)!
  const { validation } = splitDataset(parseDataset(csv, 'csv'), { validationFraction: 0.2, seed: splitSeed })
  const trained = await api('GET', `/models/${done.trained_model_id}`)
  t.equal(trained.body.format, 'torchscript')
  const check = await runPython<{ loss: number; accuracy: number }>(`${TORCH_PRELUDE}
m = load(args['model'])
x, labels = torch.tensor(args['x']).reshape(-1, ${MLP.inputs}), torch.tensor(args['labels']).long()
with torch.no_grad(): out = m(x)
print(json.dumps({'loss': float(torch.nn.functional.cross_entropy(out, labels)), 'accuracy': float((out.argmax(1) == labels).float().mean())}))
`, { model: Buffer.from(await blobs.read(trained.body.checksum.replace('sha256:', ''))).toString('base64'), x: Array.from(validation.features), labels: Array.from(validation.labels) })
  t.equal(validation.rows, 80)
  t.ok(Math.abs(check.loss - round.validation_loss) < 1e-5, `validation loss ${round.validation_loss} vs torch on the held-out rows ${check.loss}`)
  t.equal(check.accuracy, round.accuracy)
})

t.test('after a restart a TorchScript job resumes where a server has Python, and fails saying why where it has none', async (t) => {
  const { url, api, upload, store, blobs, database, projections, training } = await server(t)
  const bytes = await torchScriptMlp({ ...MLP, seed: 4 })
  const model = await upload('mlp.pt', bytes)
  const device = await trainer(t, url, PYTHON_TRAINER)
  const started = await api('POST', '/training', trainingBody(model.id, { data: stream(9), training: { sync_mode: 'full_sync', loss: 'cross_entropy', target_accuracy: undefined } }))
  t.equal(started.status, 202, JSON.stringify(started.body))
  const jobId = started.body.job_id
  const start = await device.next((f) => f.type === 'train_start')
  const initial = Object.fromEntries(Object.entries((await runPython<{ w: Record<string, number[]> }>(`${TORCH_PRELUDE}\nprint(json.dumps({'w': weights(load(args))}))`, bytes.toString('base64'))).w).map(([k, v]) => [k, Float32Array.from(v, (x) => x * 0.5)]))
  device.send({ type: 'train_update', job_id: jobId, base_round: start.round, weights: weightsToBase64(initial), samples: 320, steps: 10, loss: 1, metrics: { cpu_ms: 1, gpu_ms: 0, wall_ms: 1 }, power_watts: 1 })
  await device.next((f) => f.type === 'train_weights' && f.round === 1)
  await training.stop() // the server goes down after round 1
  await projections.waitFor(await store.headPosition())

  const withPython = new TrainingCoordinator({ store, db: database.db, blobs })
  await withPython.recover()
  await withPython.stop()
  t.notOk((await store.readStream(trainingStream(jobId))).some((e) => e.type === 'TrainingFailed'), 'with Python the job is loaded again (not failed)')
  await projections.waitFor(await store.headPosition())

  const withoutPython = new TrainingCoordinator({ store, db: database.db, blobs, torch: new TorchTool({ python: undefined }) })
  await withoutPython.recover()
  await withoutPython.stop()
  const failed = (await store.readStream(trainingStream(jobId))).find((e) => e.type === 'TrainingFailed')
  t.match((failed?.data as { error: string } | undefined)?.error, /cannot run on this server.*npm run setup:python/, 'the failure says why and what to do')
})
