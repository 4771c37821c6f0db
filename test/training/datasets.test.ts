import onnxProto from 'onnx-proto'
import t from 'tap'
import { syntheticTask } from '../../src/sdk/trainer/synthetic.js'
import { multipart } from '../helpers/app.js'
import { SimDevice } from '../helpers/device.js'
import { MLP, trainingBody, trainingSetup } from '../helpers/training.js'

const { onnx } = onnxProto

/** A CSV of the synthetic 4-class task: a header, 8 feature columns and `label`. */
function clustersCsv(rows: number, seed: number): Buffer {
  const sample = syntheticTask({ inputs: MLP.inputs, outputs: MLP.outputs, seed }).sample(rows, 1)
  const header = [...Array.from({ length: MLP.inputs }, (_, i) => `f${i}`), 'label'].join(',')
  const lines = Array.from({ length: rows }, (_, r) => [...Array.from(sample.x.subarray(r * MLP.inputs, (r + 1) * MLP.inputs), (v) => v.toFixed(5)), sample.labels[r]].join(','))
  return Buffer.from([header, ...lines].join('\n'))
}

/** input -> LeakyRelu -> output: an operator the trainer does not have. */
function leakyReluModel(): Buffer {
  const value = (name: string) => onnx.ValueInfoProto.create({ name, type: { tensorType: { elemType: 1, shape: { dim: [{ dimParam: 'N' }, { dimValue: 4 }] } } } })
  const model = onnx.ModelProto.create({
    irVersion: 8,
    opsetImport: [{ domain: '', version: 17 }],
    graph: { name: 'leaky', node: [{ opType: 'LeakyRelu', input: ['input'], output: ['output'], name: 'leaky' }], input: [value('input')], output: [value('output')] },
  })
  return Buffer.from(onnx.ModelProto.encode(model).finish())
}

t.test('a dataset is uploaded, checked, and trains a model across two devices to its target', async (t) => {
  const { app, alice, api, model, waitFor, customer, store, projections } = await trainingSetup(t, { devices: 2 })
  const upload = async (content: Buffer, name = 'clusters.csv', key = alice.key, fields: Record<string, string> = {}) => {
    const form = multipart(fields, { field: 'file', name, content })
    const r = await app.inject({ method: 'POST', url: '/api/v1/datasets', headers: { ...form.headers, 'x-api-key': key }, payload: form.payload })
    return { status: r.statusCode, body: r.json() as any }
  }
  const created = await upload(clustersCsv(3000, 11))
  t.equal(created.status, 201, JSON.stringify(created.body))
  t.match(created.body, { id: /^ds_/, format: 'csv', rows: 3000, features: MLP.inputs, label_kind: 'class', classes: MLP.outputs })
  t.equal((await api('GET', `/datasets/${created.body.id}`)).body.rows, 3000)
  t.equal((await api('GET', '/datasets')).body.total, 1)

  // bad files say what is wrong, and where
  const bad = await upload(Buffer.from('f0,f1,label\n1,2,0\n3,x,1\n'))
  t.equal(bad.status, 400)
  t.match(bad.body.error, { code: 'VALIDATION_ERROR', message: /line 3/ })
  t.equal((await upload(Buffer.from(''))).status, 400)
  const jsonl = await upload(Buffer.from('{"features":[1,2],"label":0}\n{"features":[3,4],"label":1}\n'), 'small.jsonl')
  t.match(jsonl.body, { format: 'jsonl', rows: 2, features: 2 })
  const notMultipart = await api('POST', '/datasets', { rows: [] })
  t.equal(notMultipart.status, 415)
  const bob = await customer()
  const other = await app.inject({ method: 'GET', url: `/api/v1/datasets/${created.body.id}`, headers: { 'x-api-key': bob.key } })
  t.equal(other.statusCode, 404, "another customer's dataset is not found")

  // a dataset that does not fit the model, and a model the trainer cannot train, are refused with 400
  const misfit = await api('POST', '/training', trainingBody(model.id, { data: { type: 'dataset', dataset_id: jsonl.body.id } }))
  t.equal(misfit.status, 400)
  t.match(misfit.body.error.message, /2 features per row; the model takes 8/)
  const form = multipart({ name: 'leaky' }, { name: 'leaky.onnx', content: leakyReluModel() })
  const leaky = (await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...form.headers, 'x-api-key': alice.key }, payload: form.payload })).json() as { id: string }
  const unsupported = await api('POST', '/training', trainingBody(leaky.id))
  t.equal(unsupported.status, 400)
  t.match(unsupported.body.error, { code: 'VALIDATION_ERROR', message: /LeakyRelu/ })

  const single = await upload(clustersCsv(1, 3), 'one.csv')
  t.equal(single.body.rows, 1)
  const tooSmall = await api('POST', '/training', trainingBody(model.id, { data: { type: 'dataset', dataset_id: single.body.id, total_samples: undefined } }))
  t.equal(tooSmall.status, 400, 'one row: none to hold out for validation')
  t.match(tooSmall.body.error, { code: 'VALIDATION_ERROR', message: /data_config\.dataset_id: .* has 1 row, it needs at least 2/ })

  const started = await api('POST', '/training', trainingBody(model.id, { data: { type: 'dataset', dataset_id: created.body.id, total_samples: undefined }, training: { epochs: 30, sync_mode: 'full_sync' }, resources: { min_devices: 2 } }))
  t.equal(started.status, 202, JSON.stringify(started.body))
  const done = await waitFor(started.body.job_id, (job) => job.status === 'completed' || job.status === 'failed', 90_000)
  t.equal(done.status, 'completed', JSON.stringify(done))
  t.equal(done.config.total_samples, 2400, 'a dataset job trains on the 80% not held out')
  t.ok(done.validation_accuracy >= 0.9)
  const shards = (await store.readStream(`training-${started.body.job_id}`)).filter((e) => e.type === 'TrainingRoundCompleted').flatMap((e) => (e.data as any).contributions.map((c: any) => c.device_id))
  t.equal(new Set(shards).size, 2, 'both devices trained on their shards')

  // the training and dataset read models are what a replay of the log gives
  for (const name of ['training', 'datasets']) {
    const audit = await projections.audit(name)
    t.ok(audit.ok, `${name}: ${JSON.stringify(audit.tables)}`)
  }
})

t.test('a device that joins a dataset job after another left trains other rows than the device still there', async (t) => {
  const { app, alice, api, model, url } = await trainingSetup(t)
  const form = multipart({}, { field: 'file', name: 'clusters.csv', content: clustersCsv(400, 5) })
  const dataset = (await app.inject({ method: 'POST', url: '/api/v1/datasets', headers: { ...form.headers, 'x-api-key': alice.key }, payload: form.payload })).json() as { id: string }
  const devices: SimDevice[] = []
  t.teardown(() => devices.forEach((d) => d.kill()))
  const beating = setInterval(() => devices.forEach((d) => d.heartbeat()), 300)
  t.teardown(() => clearInterval(beating))
  const connect = async () => {
    const device = await SimDevice.connect(url)
    devices.push(device)
    await device.register({ canTrain: true })
    return device
  }
  const join = async () => {
    const device = await connect()
    const start = await device.next((f) => f.type === 'train_start')
    return { device, range: [start.data.start, start.data.end] as [number, number] }
  }
  const a = { device: await connect() }
  const body = trainingBody(model.id, { data: { type: 'dataset', dataset_id: dataset.id, total_samples: undefined }, training: { target_accuracy: undefined, epochs: 100, sync_mode: 'async' }, resources: { min_devices: 1, max_devices: 2 } })
  const started = await api('POST', '/training', body)
  t.equal(started.status, 202, JSON.stringify(started.body))
  const first = await a.device.next((f) => f.type === 'train_start')
  const b = await join() // the job's second device
  a.device.kill()
  const c = await join()
  t.not(first.data.start, undefined)
  // the shards are re-planned as devices come and go (test/training/shards.test.ts): b's is its latest start frame
  let bRange = b.range
  for (;;) {
    const moved = await b.device.next((f) => f.type === 'train_start', 500).catch(() => undefined)
    if (!moved) break
    bRange = [moved.data.start, moved.data.end]
  }
  const shards = [bRange, c.range].sort((x, y) => x[0] - y[0])
  t.same([shards[0]![0], shards[0]![1] === shards[1]![0], shards[1]![1]], [0, true, first.data.end], `the newcomer trains other rows than the device still there, and the two cover them all (${JSON.stringify(c.range)} and ${JSON.stringify(bRange)})`)
  t.equal((await api('DELETE', `/training/${started.body.job_id}`)).body.status, 'cancelled')
})
