import { utimes, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { Readable } from 'node:stream'
import t, { type Test } from 'tap'
import { BlobCollector } from '../../src/blobs/blob-gc.js'
import { handleCommand } from '../../src/commands/handle-command.js'
import { modelDecider, modelStream } from '../../src/domain/model.js'
import { type RoundData, trainingDecider, type TrainingSpec, trainingStream } from '../../src/domain/training-job.js'
import { ADMIN_KEY, multipart, testApp } from '../helpers/app.js'
import { SimDevice } from '../helpers/device.js'
import { denseOnnxModel } from '../helpers/onnx.js'

const HOUR = 3600_000
const hex = (checksum: string) => checksum.replace(/^sha256:/, '')

/** A running app, a customer, and a collector with a day's grace whose clock the test moves forward. */
async function setup(t: Test) {
  const context = await testApp(t)
  const alice = await context.customer()
  let offsetMs = 0
  const collector = new BlobCollector({
    blobs: context.blobs,
    store: context.store,
    db: context.database.db,
    waitFor: (position, ms) => context.projections.waitFor(position, ms),
    graceMs: 24 * HOUR,
    now: () => new Date(Date.now() + offsetMs),
  })
  const send = async (method: string, url: string, form?: ReturnType<typeof multipart> | { headers?: undefined; payload: object }) => {
    const response = await context.app.inject({ method, url: `/api/v1${url}`, headers: { ...form?.headers, 'x-api-key': alice.key }, ...(form ? { payload: form.payload } : {}) })
    if (response.statusCode >= 300) throw new Error(`${method} ${url}: ${response.statusCode} ${response.body}`)
    return (response.body ? response.json() : {}) as { id: string; checksum: string }
  }
  return {
    ...context,
    alice,
    /** Collects as if `hours` had passed since now. */
    collectAfter: (hours: number) => {
      offsetMs = hours * HOUR
      return collector.collect()
    },
    uploadModel: (seed: number) => send('POST', '/models', multipart({ name: `m${seed}` }, { name: 'm.onnx', content: denseOnnxModel({ inputs: 4, outputs: 2, seed }) })),
    uploadDataset: (rows: number) => {
      const csv = ['a,b,label', ...Array.from({ length: rows }, (_, i) => `${i},${i * 2},${i % 2}`)].join('\n')
      return send('POST', '/datasets', multipart({ name: 'd', format: 'csv' }, { field: 'file', name: 'd.csv', content: Buffer.from(csv) }))
    },
    remove: (url: string) => send('DELETE', url),
    infer: (modelId: string) => send('POST', '/inference', { payload: { model_id: modelId, input: { data: [1, 2, 3, 4], shape: [1, 4] }, async: true } }) as Promise<unknown> as Promise<{ job_id: string }>,
    stored: (checksum: string) => context.blobs.has(hex(checksum)),
  }
}

t.test("a deleted model's file is collected once the grace period has passed, not before; live models' files never", async (t) => {
  const { blobs, uploadModel, remove, collectAfter, stored } = await setup(t)
  const deleted = await uploadModel(1)
  const kept = await uploadModel(2)
  // uploaded long ago: only the deletion's own grace period keeps the file now
  const twoDaysAgo = new Date(Date.now() - 48 * HOUR)
  for (const m of [deleted, kept]) await utimes(blobs.pathOf(hex(m.checksum)), twoDaysAgo, twoDaysAgo)
  await remove(`/models/${deleted.id}`)

  t.match(await collectAfter(0), { deleted: 0 }, 'just deleted: kept')
  t.match(await collectAfter(23), { deleted: 0 }, 'within the grace period: kept')
  t.ok(await stored(deleted.checksum))

  const result = await collectAfter(25)
  t.notOk(await stored(deleted.checksum), 'collected after the grace period')
  t.ok(await stored(kept.checksum), 'the live model keeps its file')
  t.equal(result.deleted, 1)
  t.equal(result.scanned, 2)
  t.ok(result.freed_bytes > 0)
  t.match(await collectAfter(25), { deleted: 0, freed_bytes: 0 }, 'a second run finds nothing more (idempotent)')
})

t.test('a file two models share survives the deletion of one; a dataset keeps its file until deleted', async (t) => {
  const { uploadModel, uploadDataset, remove, collectAfter, stored } = await setup(t)
  const first = await uploadModel(3)
  const second = await uploadModel(3)
  t.equal(first.checksum, second.checksum, 'the same content: one blob')
  const dataset = await uploadDataset(10)
  await remove(`/models/${first.id}`)

  await collectAfter(25)
  t.ok(await stored(second.checksum), 'the other model still holds it')
  t.ok(await stored(dataset.checksum), 'the dataset holds its file')

  await remove(`/models/${second.id}`)
  await remove(`/datasets/${dataset.id}`)
  await collectAfter(25)
  t.notOk(await stored(second.checksum), 'no model holds it any more')
  t.notOk(await stored(dataset.checksum), 'a deleted dataset releases its file')
})

t.test('a task waiting to run on a deleted model holds its file until it has finished', async (t) => {
  const { app, uploadModel, infer, remove, collectAfter, stored } = await setup(t)
  const device = await SimDevice.connect(await app.listen({ port: 0, host: '127.0.0.1' }))
  t.teardown(() => device.socket.close())
  await device.register()
  const model = await uploadModel(8)
  const job = await infer(model.id)
  await remove(`/models/${model.id}`)
  await collectAfter(25)
  t.ok(await stored(model.checksum), 'the queued task holds it (a device would download it)')
  await remove(`/inference/${job.job_id}`)
  await collectAfter(25)
  t.notOk(await stored(model.checksum), 'released once the task is cancelled')
})

t.test("a training job holds its model and dataset while it may run, and its checkpoints always", async (t) => {
  const { store, blobs, alice, uploadModel, uploadDataset, remove, collectAfter, stored } = await setup(t)
  const model = await uploadModel(4)
  const dataset = await uploadDataset(20)
  const jobId = 'train_gc000001'
  const spec: TrainingSpec = {
    job_id: jobId, customer_id: alice.id, model_id: model.id, model_name: 'm4', model_checksum: model.checksum,
    data_config: { type: 'dataset', total_samples: 16, batch_size: 4, dataset_id: dataset.id, dataset_checksum: dataset.checksum, dataset_format: 'csv', validation_fraction: 0.2, clusters_per_class: 1 },
    training_config: { epochs: 1, learning_rate: 0.01, optimizer: 'sgd', target_accuracy: null, sync_mode: 'full_sync', local_steps: 1, sync_interval_ms: 1000, loss: 'cross_entropy' },
    resource_config: { min_devices: 1, max_devices: null, prefer_gpu: false, sdk_types: null, min_sdk_version: null },
    weight: 16, total_batches: 4, seed: 1, submitted_at: new Date().toISOString(),
  }
  const metadata = { metadata: { customerId: alice.id } }
  await handleCommand(store, trainingStream(jobId), trainingDecider, { type: 'SubmitTraining', spec }, metadata)
  const weights = await blobs.write(Readable.from([Buffer.from('round 1 weights')]))
  await weights.keep()
  const round: RoundData = {
    job_id: jobId, customer_id: alice.id, round: 1, weights_sha256: weights.sha256, loss: 1, validation_loss: 1, accuracy: 0.5,
    samples: 4, steps: 1, batches_completed: 1, epoch: 0, contributions: [], wall_ms: 10, at: new Date().toISOString(),
  }
  await handleCommand(store, trainingStream(jobId), trainingDecider, { type: 'CompleteRound', round }, metadata)
  await remove(`/models/${model.id}`)
  await remove(`/datasets/${dataset.id}`)

  await collectAfter(25)
  t.ok(await stored(model.checksum), 'the running job holds its deleted model')
  t.ok(await stored(dataset.checksum), 'and its deleted dataset')
  t.ok(await blobs.has(weights.sha256), 'and its checkpoint')

  await handleCommand(store, trainingStream(jobId), trainingDecider, { type: 'CancelTraining', customerId: alice.id, at: new Date().toISOString() }, metadata)
  await collectAfter(25)
  t.notOk(await stored(model.checksum), 'a finished job releases its inputs')
  t.notOk(await stored(dataset.checksum))
  t.ok(await blobs.has(weights.sha256), 'its checkpoints stay while the job exists')
})

t.test('a blob written before its event is appended survives; an upload of content being collected writes it again', async (t) => {
  const { store, blobs, alice, uploadModel, collectAfter, stored } = await setup(t)
  // the upload has kept its file, the collector runs, then the event is appended
  const bytes = denseOnnxModel({ inputs: 4, outputs: 2, seed: 5 })
  const pending = await blobs.write(Readable.from([bytes]))
  await pending.keep()
  t.match(await collectAfter(0), { deleted: 0 }, 'written just now: kept, though nothing refers to it yet')
  t.ok(await blobs.has(pending.sha256))
  const at = new Date().toISOString()
  const description = { model_id: 'model_gcrace01', customer_id: alice.id, name: 'race', format: 'onnx' as const, size: bytes.length, checksum: `sha256:${pending.sha256}`, input_shape: null, output_shape: null, inputs: [], outputs: [], input_schema: null, output_schema: null, labels: null, preprocessing: null, postprocessing: null, adapter_options: null, validation: null, validation_tolerance: null, max_batch_size: null, max_queue_delay_ms: null, uploaded_at: at }
  await handleCommand(store, modelStream('model_gcrace01'), modelDecider, { type: 'UploadModel', model: description }, { metadata: { customerId: alice.id, occurredAt: at } })
  await collectAfter(25)
  t.ok(await blobs.has(pending.sha256), 'now the model holds it')

  // a model deleted long ago left an old file; the same content is uploaded again just before a collection
  const old = await uploadModel(6)
  const twoDaysAgo = new Date(Date.now() - 48 * HOUR)
  await handleCommand(store, modelStream(old.id), modelDecider, { type: 'DeleteModel', customerId: alice.id, at: twoDaysAgo.toISOString() }, { metadata: { customerId: alice.id } })
  await utimes(blobs.pathOf(hex(old.checksum)), twoDaysAgo, twoDaysAgo)
  const again = await blobs.write(Readable.from([denseOnnxModel({ inputs: 4, outputs: 2, seed: 6 })]))
  await again.keep()
  t.equal(again.sha256, hex(old.checksum))
  await collectAfter(0)
  t.ok(await stored(old.checksum), 'kept again: written anew, so it is young')
  await utimes(blobs.pathOf(hex(old.checksum)), twoDaysAgo, twoDaysAgo)
  await collectAfter(0)
  t.notOk(await stored(old.checksum), 'had it not been written again, it would have been collected')
})

t.test('temporary files of writes that never finished are collected after the grace period', async (t) => {
  const { blobs, collectAfter } = await setup(t)
  const stale = path.join(blobs.root, 'tmp', 'crashed-upload')
  const fresh = path.join(blobs.root, 'tmp', 'upload-in-progress')
  await writeFile(stale, Buffer.alloc(1000))
  await writeFile(fresh, Buffer.alloc(10))
  const twoDaysAgo = new Date(Date.now() - 48 * HOUR)
  await utimes(stale, twoDaysAgo, twoDaysAgo)
  const result = await collectAfter(0)
  t.same(await blobs.pending(), ['upload-in-progress'], 'the old one is gone, the one being written stays')
  t.match(result, { deleted: 1, freed_bytes: 1000 })
})

t.test('nothing is collected while the read models are behind the log', async (t) => {
  const { projections, store, uploadModel, remove, collectAfter, stored } = await setup(t)
  const model = await uploadModel(7)
  await remove(`/models/${model.id}`)
  await projections.stop()
  // an event the read models have not seen
  await store.append('customer-unseen', [{ type: 'CustomerNoted', data: {} }])
  await t.rejects(collectAfter(25), { code: 'REFERENCES_BEHIND' })
  t.ok(await stored(model.checksum), 'nothing deleted')
})

t.test('POST /admin/blobs/gc runs a collection now and says what it freed; operators only', async (t) => {
  const { app, blobs } = await setup(t)
  const stale = path.join(blobs.root, 'tmp', 'crashed-upload')
  await writeFile(stale, Buffer.alloc(300))
  const twoDaysAgo = new Date(Date.now() - 48 * HOUR)
  await utimes(stale, twoDaysAgo, twoDaysAgo)
  const url = '/api/v1/admin/blobs/gc'
  t.equal((await app.inject({ method: 'POST', url })).statusCode, 401, 'no admin key')
  t.equal((await app.inject({ method: 'POST', url, headers: { 'x-api-key': 'dcp_k_nope' } })).statusCode, 401, 'a customer key is not an admin key')
  const junk = await app.inject({ method: 'POST', url, headers: { 'x-admin-key': ADMIN_KEY }, payload: { force: true } })
  t.equal(junk.statusCode, 400, junk.body)
  t.equal(junk.json().error.code, 'VALIDATION_ERROR')
  const response = await app.inject({ method: 'POST', url, headers: { 'x-admin-key': ADMIN_KEY } })
  t.equal(response.statusCode, 200, response.body)
  t.same(response.json(), { scanned: 0, deleted: 1, freed_bytes: 300 })
  t.same(await blobs.pending(), [])
})
