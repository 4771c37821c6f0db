import { createHash } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import * as ort from 'onnxruntime-node'
import t from 'tap'
import { denseOnnxModel, torchScriptArchive } from '../helpers/onnx.js'
import { multipart, testApp } from '../helpers/app.js'
import { eventually } from '../helpers/device.js'
import http from 'node:http'
import { DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE_DELAY_MS } from '../../src/domain/model.js'
import { findModel } from '../../src/projections/models.js'

t.test('ONNX upload round trip: stored by content hash, shapes read from the file, visible at once', async (t) => {
  const { app, blobs, customer } = await testApp(t)
  const alice = await customer()
  const bytes = denseOnnxModel({ inputs: 10, outputs: 2 })
  const body = multipart(
    { name: 'my-classifier', labels: '["cat","dog"]', preprocessing: 'passthrough', postprocessing: 'top_k_labels', input_schema: '{"type":"object"}' },
    { name: 'classifier.onnx', content: bytes },
  )
  const response = await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': alice.key }, payload: body.payload })
  t.equal(response.statusCode, 201, response.body)
  const model = response.json()
  const sha = createHash('sha256').update(bytes).digest('hex')
  t.match(model.id, /^model_[a-z0-9]{8}$/)
  t.equal(model.name, 'my-classifier')
  t.equal(model.format, 'onnx')
  t.equal(model.size, bytes.length)
  t.equal(model.checksum, `sha256:${sha}`)
  t.same(model.input_shape, [-1, 10], 'filled in from the graph (-1: a dynamic batch size)')
  t.same(model.output_shape, [-1, 2])
  t.same(model.inputs, [{ name: 'input', type: 'float32', shape: [-1, 10] }])
  t.same(model.labels, ['cat', 'dog'])
  t.equal(model.postprocessing, 'top_k_labels')
  t.same(model.input_schema, { type: 'object' })

  // the stored blob is the file, byte for byte, and onnxruntime runs it
  const stored = await readFile(blobs.pathOf(sha))
  t.ok(stored.equals(bytes))
  const session = await ort.InferenceSession.create(stored)
  const out = await session.run({ input: new ort.Tensor('float32', new Float32Array(10).fill(0.5), [1, 10]) })
  t.equal(out.output!.dims[1], 2)
  t.same(await blobs.pending(), [], 'no temporary file left')

  const get = await app.inject({ method: 'GET', url: `/api/v1/models/${model.id}`, headers: { 'x-api-key': alice.key } })
  t.equal(get.statusCode, 200, 'read-your-writes: the GET right after the POST sees it')
  t.same(get.json(), model)
  const list = await app.inject({ method: 'GET', url: '/api/v1/models', headers: { 'x-api-key': alice.key } })
  t.equal(list.json().total, 1)
  t.same(list.json().models, [model])
})

t.test('TorchScript upload; name and format from the file name; shapes as given', async (t) => {
  const { app, customer } = await testApp(t)
  const alice = await customer()
  const body = multipart({ input_shape: '[1,3,224,224]', output_shape: '[1,1000]' }, { name: 'resnet.pt', content: torchScriptArchive('resnet') })
  const response = await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': alice.key }, payload: body.payload })
  t.equal(response.statusCode, 201, response.body)
  t.equal(response.json().format, 'torchscript')
  t.equal(response.json().name, 'resnet')
  t.same(response.json().input_shape, [1, 3, 224, 224])
})

t.test('a JSON field may come as a part of type application/json (as OpenAPI encodes an object field)', async (t) => {
  const { app, customer } = await testApp(t)
  const alice = await customer()
  const boundary = 'dcp-json-parts'
  const part = (name: string, value: string, type?: string) => `--${boundary}\r\nContent-Disposition: form-data; name="${name}"\r\n${type ? `Content-Type: ${type}\r\n` : ''}\r\n${value}\r\n`
  const payload = Buffer.concat([
    Buffer.from(part('labels', '["cat","dog"]', 'application/json') + part('input_schema', '{"type":"object"}', 'application/json') + part('name', '"quoted"', 'application/json')),
    Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\nContent-Type: application/octet-stream\r\n\r\n`),
    denseOnnxModel({ inputs: 10, outputs: 2 }),
    Buffer.from(`\r\n--${boundary}--\r\n`),
  ])
  const response = await app.inject({ method: 'POST', url: '/api/v1/models', headers: { 'content-type': `multipart/form-data; boundary=${boundary}`, 'x-api-key': alice.key }, payload })
  t.equal(response.statusCode, 201, response.body)
  t.match(response.json(), { name: 'quoted', labels: ['cat', 'dog'], input_schema: { type: 'object' } })
})

t.test('bad uploads: a clear 400, 413 or 415, and nothing left behind', async (t) => {
  const { app, blobs, customer } = await testApp(t, { maxModelBytes: 4096 })
  const alice = await customer()
  const onnx = denseOnnxModel()
  const cases: [string, ReturnType<typeof multipart>, number, RegExp][] = [
    ['corrupt ONNX', multipart({}, { name: 'x.onnx', content: Buffer.from('this is not a model at all') }), 400, /model: not an ONNX model/],
    ['zip that is not TorchScript', multipart({ format: 'torchscript' }, { name: 'x.pt', content: Buffer.from('PK\u0003\u0004garbage') }), 400, /not a TorchScript archive/],
    ['ONNX declared as TorchScript', multipart({ format: 'torchscript' }, { name: 'x.pt', content: onnx }), 400, /not a TorchScript archive/],
    ['TorchScript declared as ONNX', multipart({ format: 'onnx' }, { name: 'x.onnx', content: torchScriptArchive() }), 400, /zip archive/],
    ['empty file', multipart({}, { name: 'x.onnx', content: Buffer.alloc(0) }), 400, /empty/],
    ['no file', multipart({ name: 'nothing' }), 400, /model: a model file is required/],
    ['unknown adapter', multipart({ preprocessing: 'resize_magic' }, { name: 'x.onnx', content: onnx }), 400, /preprocessing/],
    ['invalid JSON Schema', multipart({ input_schema: '{"type":"no-such-type"}' }, { name: 'x.onnx', content: onnx }), 400, /input_schema: not a valid JSON Schema/],
    ['labels not JSON', multipart({ labels: 'cat,dog' }, { name: 'x.onnx', content: onnx }), 400, /labels: must be JSON/],
    ['shape against the file', multipart({ input_shape: '[1,11]' }, { name: 'x.onnx', content: onnx }), 400, /input_shape: \[1,11\] does not match/],
    ['unknown field', multipart({ colour: 'blue' }, { name: 'x.onnx', content: onnx }), 400, /colour/],
    ['wrong file field', multipart({}, { field: 'file', name: 'x.onnx', content: onnx }), 400, /file: unexpected file/],
    ['too large', multipart({}, { name: 'big.onnx', content: Buffer.alloc(5000, 1) }), 413, /limit/],
  ]
  for (const [what, body, status, message] of cases) {
    const response = await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': alice.key }, payload: body.payload })
    t.equal(response.statusCode, status, `${what}: ${response.body}`)
    t.match(response.json().error.message, message, what)
    t.ok(response.json().error.code, `${what}: has a code`)
  }
  const json = await app.inject({ method: 'POST', url: '/api/v1/models', headers: { 'x-api-key': alice.key }, payload: { name: 'x' } })
  t.equal(json.statusCode, 415)
  t.equal(json.json().error.code, 'UNSUPPORTED_MEDIA_TYPE')
  t.same(await blobs.pending(), [], 'no temporary files')
  const list = await app.inject({ method: 'GET', url: '/api/v1/models', headers: { 'x-api-key': alice.key } })
  t.equal(list.json().total, 0, 'no model was registered')
})

t.test('schema patch changes only the fields given; delete hides the model', async (t) => {
  const { app, customer } = await testApp(t)
  const alice = await customer()
  const body = multipart({ labels: '["a","b"]', preprocessing: 'passthrough' }, { name: 'm.onnx', content: denseOnnxModel() })
  const created = (await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': alice.key }, payload: body.payload })).json()
  const headers = { 'x-api-key': alice.key }
  const patched = await app.inject({ method: 'PATCH', url: `/api/v1/models/${created.id}/schema`, headers, payload: { labels: ['x', 'y'], input_schema: { type: 'object' } } })
  t.equal(patched.statusCode, 200, patched.body)
  t.same(patched.json().labels, ['x', 'y'])
  t.same(patched.json().input_schema, { type: 'object' })
  t.equal(patched.json().preprocessing, 'passthrough', 'untouched field kept')
  const cleared = await app.inject({ method: 'PATCH', url: `/api/v1/models/${created.id}/schema`, headers, payload: { preprocessing: null } })
  t.equal(cleared.json().preprocessing, null, 'null clears a field')
  t.same(cleared.json().labels, ['x', 'y'])
  const got = (await app.inject({ method: 'GET', url: `/api/v1/models/${created.id}`, headers })).json()
  t.same(got, cleared.json(), 'the read model agrees with the response')
  for (const [payload, message] of [
    [{ labels: 'cat' }, /labels/],
    [{ preprocessing: 'nope' }, /preprocessing/],
    [{ input_schema: { type: 12 } }, /input_schema: not a valid JSON Schema/],
    [{ weights: [] }, /weights/],
    [{ preprocessing: 'tabular' }, /feature/],
    [{ adapter_options: { topk: 3 } }, /adapter_options/],
  ] as const) {
    const bad = await app.inject({ method: 'PATCH', url: `/api/v1/models/${created.id}/schema`, headers, payload })
    t.equal(bad.statusCode, 400)
    t.match(bad.json().error.message, message)
  }
  t.equal((await app.inject({ method: 'DELETE', url: `/api/v1/models/${created.id}`, headers })).statusCode, 204)
  t.equal((await app.inject({ method: 'GET', url: `/api/v1/models/${created.id}`, headers })).statusCode, 404)
  t.equal((await app.inject({ method: 'DELETE', url: `/api/v1/models/${created.id}`, headers })).statusCode, 404, 'deleting twice: not found')
  t.equal((await app.inject({ method: 'PATCH', url: `/api/v1/models/${created.id}/schema`, headers, payload: { labels: [] } })).statusCode, 404)
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/models', headers })).json().total, 0)
})

t.test('concurrent uploads all land, each with its own id', async (t) => {
  // twelve at once (the default lets a customer run two): the blob store's concurrent writes are the point
  const { app, customer } = await testApp(t, { uploads: { total: 12, perCustomer: 12 } })
  const alice = await customer()
  const responses = await Promise.all(
    Array.from({ length: 12 }, (_, i) => {
      const body = multipart({ name: `m${i}` }, { name: 'm.onnx', content: denseOnnxModel({ seed: i % 3 }) })
      return app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': alice.key }, payload: body.payload })
    }),
  )
  t.same(responses.map((r) => r.statusCode), Array(12).fill(201))
  t.equal(new Set(responses.map((r) => r.json().id)).size, 12)
  t.equal(new Set(responses.map((r) => r.json().checksum)).size, 3, 'same content, same checksum')
  const list = await app.inject({ method: 'GET', url: '/api/v1/models?limit=5', headers: { 'x-api-key': alice.key } })
  t.equal(list.json().total, 12)
  t.equal(list.json().models.length, 5, 'paginated')
})

t.test("tenants never see or touch each other's models", async (t) => {
  const { app, customer } = await testApp(t)
  const alice = await customer()
  const bob = await customer()
  const body = multipart({}, { name: 'secret.onnx', content: denseOnnxModel() })
  const model = (await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': alice.key }, payload: body.payload })).json()
  const asBob = { 'x-api-key': bob.key }
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/models', headers: asBob })).json().total, 0)
  t.equal((await app.inject({ method: 'GET', url: `/api/v1/models/${model.id}`, headers: asBob })).statusCode, 404)
  t.equal((await app.inject({ method: 'DELETE', url: `/api/v1/models/${model.id}`, headers: asBob })).statusCode, 404)
  t.equal((await app.inject({ method: 'PATCH', url: `/api/v1/models/${model.id}/schema`, headers: asBob, payload: { labels: ['x'] } })).statusCode, 404)
  t.equal((await app.inject({ method: 'GET', url: `/api/v1/models/${model.id}`, headers: { 'x-api-key': alice.key } })).json().labels, null, "bob's patch changed nothing")
})

t.test('uploads in progress are bounded per customer and in all: past it 429 before the body is read', async (t) => {
  const { app, customer } = await testApp(t, { uploads: { total: 3, perCustomer: 2 } })
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  const alice = await customer()
  const bob = await customer()
  const boundary = '----dcpslow'
  // an upload whose body has begun and not ended: it holds a slot while it runs
  const slow = (key: string) => {
    const request = http.request(`${url}/api/v1/models`, { method: 'POST', headers: { 'x-api-key': key, 'content-type': `multipart/form-data; boundary=${boundary}` } })
    request.on('error', () => {})
    request.write(`--${boundary}\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\nContent-Type: application/octet-stream\r\n\r\n`)
    const answered = new Promise<number>((resolve) => request.on('response', (r) => (r.resume(), resolve(r.statusCode!))))
    return { request, answered }
  }
  const upload = (key: string) => {
    const body = multipart({ name: 'm' }, { name: 'm.onnx', content: denseOnnxModel() })
    return app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': key }, payload: body.payload })
  }
  const a1 = slow(alice.key)
  const a2 = slow(alice.key)
  await eventually(async () => app.uploadsInProgress() === 2, 10_000, 'two uploads running')
  const third = await upload(alice.key)
  t.equal(third.statusCode, 429, 'a third upload of one customer is refused')
  t.match(third.json().error, { code: 'RATE_LIMITED', message: /2 uploads in progress/ })
  t.ok(third.headers['retry-after'])
  const b1 = slow(bob.key)
  await eventually(async () => app.uploadsInProgress() === 3, 10_000, 'three uploads running')
  t.equal((await upload(bob.key)).statusCode, 429, 'past the total, another customer waits too')
  for (const { request } of [a1, a2, b1]) request.end(`\r\n--${boundary}--\r\n`)
  await Promise.all([a1.answered, a2.answered, b1.answered])
  t.equal((await upload(alice.key)).statusCode, 201, 'the slots are free again once those ended')
})

t.test('a customer\'s storage quota: an upload past it is 413 QUOTA_EXCEEDED and leaves no file; deleting makes room', async (t) => {
  const size = denseOnnxModel().length
  const { app, customer, blobs } = await testApp(t, { maxStorageBytes: Math.floor(size * 1.5) })
  const alice = await customer()
  const bob = await customer()
  const upload = (key: string, seed: number) => {
    const body = multipart({ name: `m${seed}` }, { name: 'm.onnx', content: denseOnnxModel({ seed }) })
    return app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': key }, payload: body.payload })
  }
  const first = await upload(alice.key, 1)
  t.equal(first.statusCode, 201)
  const second = await upload(alice.key, 2)
  t.equal(second.statusCode, 413)
  t.match(second.json().error, { code: 'QUOTA_EXCEEDED', message: /past your storage quota/ })
  const sha = createHash('sha256').update(denseOnnxModel({ seed: 2 })).digest('hex')
  t.notOk(await blobs.has(sha).catch(() => false), 'the refused file is not kept')
  t.equal((await upload(bob.key, 2)).statusCode, 201, 'another customer has its own quota')
  t.equal((await app.inject({ method: 'DELETE', url: `/api/v1/models/${first.json().id}`, headers: { 'x-api-key': alice.key } })).statusCode, 204)
  t.equal((await upload(alice.key, 3)).statusCode, 201, 'a deleted model no longer counts')
})

t.test('dynamic batching settings: taken at upload, shown with the defaults applied, null in the read model when not given', async (t) => {
  const { app, customer, database } = await testApp(t)
  const alice = await customer()
  const headers = { 'x-api-key': alice.key }
  const upload = async (fields: Record<string, string>) => {
    const body = multipart(fields, { name: 'm.onnx', content: denseOnnxModel() })
    const response = await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, ...headers }, payload: body.payload })
    t.equal(response.statusCode, 201, response.body)
    return response.json()
  }
  const set = await upload({ max_batch_size: '64', max_queue_delay_ms: '5' })
  t.match(set, { max_batch_size: 64, max_queue_delay_ms: 5 })
  const plain = await upload({})
  t.match(plain, { max_batch_size: DEFAULT_MAX_BATCH_SIZE, max_queue_delay_ms: DEFAULT_MAX_QUEUE_DELAY_MS }, 'the defaults, never null')
  t.same([DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE_DELAY_MS], [32, 0])
  const off = await upload({ max_batch_size: '1', max_queue_delay_ms: '10000' })
  t.match(off, { max_batch_size: 1, max_queue_delay_ms: 10000 }, 'the bounds themselves are taken')

  for (const model of [set, plain, off]) t.same((await app.inject({ method: 'GET', url: `/api/v1/models/${model.id}`, headers })).json(), model, 'GET agrees with the upload')
  const list = (await app.inject({ method: 'GET', url: '/api/v1/models', headers })).json()
  t.same(list.models.map((m: any) => [m.id, m.max_batch_size, m.max_queue_delay_ms]).sort(), [set, plain, off].map((m) => [m.id, m.max_batch_size, m.max_queue_delay_ms]).sort())
  // the read model the dispatcher reads: the model's own values, null where the default applies
  t.match(await findModel(database.db, alice.id, set.id), { max_batch_size: 64, max_queue_delay_ms: 5 })
  t.match(await findModel(database.db, alice.id, plain.id), { max_batch_size: null, max_queue_delay_ms: null })
})

t.test('dynamic batching settings: bad values at upload are a 400 naming the field, and register nothing', async (t) => {
  const { app, blobs, customer } = await testApp(t)
  const alice = await customer()
  const cases: [Record<string, string>, RegExp][] = [
    [{ max_batch_size: '0' }, /^max_batch_size: must be an integer from 1 to 4096$/],
    [{ max_batch_size: '4097' }, /^max_batch_size: /],
    [{ max_batch_size: '2.5' }, /^max_batch_size: /],
    [{ max_batch_size: '"32"' }, /^max_batch_size: /],
    [{ max_batch_size: 'null' }, /^max_batch_size: /],
    [{ max_batch_size: 'many' }, /^max_batch_size: must be JSON/],
    [{ max_batch_size: '1e400' }, /^max_batch_size: /],
    [{ max_queue_delay_ms: '-1' }, /^max_queue_delay_ms: must be an integer from 0 to 10000$/],
    [{ max_queue_delay_ms: '10001' }, /^max_queue_delay_ms: /],
    [{ max_queue_delay_ms: '0.5' }, /^max_queue_delay_ms: /],
    [{ max_queue_delay_ms: 'true' }, /^max_queue_delay_ms: /],
    [{ max_queue_delay_ms: '[5]' }, /^max_queue_delay_ms: /],
  ]
  for (const [fields, message] of cases) {
    const body = multipart(fields, { name: 'm.onnx', content: denseOnnxModel() })
    const response = await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': alice.key }, payload: body.payload })
    t.equal(response.statusCode, 400, `${JSON.stringify(fields)}: ${response.body}`)
    t.equal(response.json().error.code, 'VALIDATION_ERROR')
    t.match(response.json().error.message, message, JSON.stringify(fields))
  }
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/models', headers: { 'x-api-key': alice.key } })).json().total, 0, 'no model was registered')
  t.same(await blobs.pending(), [], 'no temporary files')
})

t.test('dynamic batching settings: PATCH sets and clears them; a bad value is a 400 naming the field and changes nothing', async (t) => {
  const { app, customer, database } = await testApp(t)
  const alice = await customer()
  const headers = { 'x-api-key': alice.key }
  const body = multipart({ labels: '["a","b"]', max_batch_size: '8' }, { name: 'm.onnx', content: denseOnnxModel() })
  const created = (await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, ...headers }, payload: body.payload })).json()
  const patch = (payload: unknown) => app.inject({ method: 'PATCH', url: `/api/v1/models/${created.id}/schema`, headers, payload: payload as object })
  const get = async () => (await app.inject({ method: 'GET', url: `/api/v1/models/${created.id}`, headers })).json()

  const delay = await patch({ max_queue_delay_ms: 20 })
  t.equal(delay.statusCode, 200, delay.body)
  t.match(delay.json(), { max_batch_size: 8, max_queue_delay_ms: 20, labels: ['a', 'b'] }, 'the field given changes, the others stay')
  const both = await patch({ max_batch_size: 4096, max_queue_delay_ms: 0 })
  t.match(both.json(), { max_batch_size: 4096, max_queue_delay_ms: 0 })
  t.same(await get(), both.json(), 'the read model agrees with the response')
  t.match(await findModel(database.db, alice.id, created.id), { max_batch_size: 4096, max_queue_delay_ms: 0 })

  const cleared = await patch({ max_batch_size: null })
  t.match(cleared.json(), { max_batch_size: DEFAULT_MAX_BATCH_SIZE, max_queue_delay_ms: 0 }, 'null clears: the default shows')
  t.match(await findModel(database.db, alice.id, created.id), { max_batch_size: null, max_queue_delay_ms: 0 }, 'stored as null, not as the default')
  await patch({ max_queue_delay_ms: null })
  t.match(await findModel(database.db, alice.id, created.id), { max_batch_size: null, max_queue_delay_ms: null })
  await patch({ max_batch_size: 2, max_queue_delay_ms: 7 })

  const before = await get()
  t.match(before, { max_batch_size: 2, max_queue_delay_ms: 7 })
  const bad: [unknown, RegExp][] = [
    [{ max_batch_size: 0 }, /max_batch_size: must be an integer from 1 to 4096/],
    [{ max_batch_size: 4097 }, /max_batch_size/],
    [{ max_batch_size: 1.5 }, /max_batch_size/],
    [{ max_batch_size: '16' }, /max_batch_size/],
    [{ max_batch_size: true }, /max_batch_size/],
    [{ max_batch_size: 1e300 }, /max_batch_size/],
    [{ max_queue_delay_ms: -1 }, /max_queue_delay_ms: must be an integer from 0 to 10000/],
    [{ max_queue_delay_ms: 10_001 }, /max_queue_delay_ms/],
    [{ max_queue_delay_ms: 0.25 }, /max_queue_delay_ms/],
    [{ max_queue_delay_ms: { ms: 5 } }, /max_queue_delay_ms/],
    // a good value beside a bad one: refused whole
    [{ max_batch_size: 16, max_queue_delay_ms: -5 }, /max_queue_delay_ms/],
    [{ max_queue_delay_ms: 5, max_batch_size: [16] }, /max_batch_size/],
  ]
  for (const [payload, message] of bad) {
    const response = await patch(payload)
    t.equal(response.statusCode, 400, `${JSON.stringify(payload)}: ${response.body}`)
    t.equal(response.json().error.code, 'VALIDATION_ERROR')
    t.match(response.json().error.message, message, JSON.stringify(payload))
  }
  t.same(await get(), before, 'nothing changed, updated_at included')
  t.match(await findModel(database.db, alice.id, created.id), { max_batch_size: 2, max_queue_delay_ms: 7 })
})

t.test('dynamic batching settings: a model recorded before they existed reads with the defaults; a rebuild gives the same rows', async (t) => {
  const { app, customer, database, store, projections } = await testApp(t)
  const alice = await customer()
  const headers = { 'x-api-key': alice.key }
  // a ModelUploaded and a ModelSchemaUpdated as they were recorded before these settings
  const at = '2026-01-01T00:00:00.000Z'
  const old = { model_id: 'model_old00001', customer_id: alice.id, name: 'old', format: 'onnx', size: 10, checksum: `sha256:${'0'.repeat(64)}`, input_shape: null, output_shape: null, inputs: [], outputs: [], input_schema: null, output_schema: null, labels: null, preprocessing: null, postprocessing: null, adapter_options: null, validation: null, validation_tolerance: null, uploaded_at: at }
  const metadata = { schemaVersion: 1, customerId: alice.id, occurredAt: at }
  const { position } = await store.append('model-model_old00001', [
    { type: 'ModelUploaded', data: old, metadata },
    { type: 'ModelSchemaUpdated', data: { model_id: old.model_id, customer_id: alice.id, changes: { labels: ['x'] }, updated_at: at }, metadata },
  ])
  await projections.waitFor(position)
  t.match((await app.inject({ method: 'GET', url: `/api/v1/models/${old.model_id}`, headers })).json(), { labels: ['x'], max_batch_size: DEFAULT_MAX_BATCH_SIZE, max_queue_delay_ms: DEFAULT_MAX_QUEUE_DELAY_MS })
  t.match(await findModel(database.db, alice.id, old.model_id), { max_batch_size: null, max_queue_delay_ms: null })

  // then the new settings on it, and on a model uploaded with them
  t.equal((await app.inject({ method: 'PATCH', url: `/api/v1/models/${old.model_id}/schema`, headers, payload: { max_queue_delay_ms: 3 } })).statusCode, 200)
  const body = multipart({ max_batch_size: '100' }, { name: 'm.onnx', content: denseOnnxModel() })
  const uploaded = (await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, ...headers }, payload: body.payload })).json()
  const rows = async () => Promise.all([old.model_id, uploaded.id].map((id) => findModel(database.db, alice.id, id)))
  const before = await rows()
  t.match(before, [{ max_batch_size: null, max_queue_delay_ms: 3 }, { max_batch_size: 100, max_queue_delay_ms: null }])

  t.ok((await projections.audit('models')).ok, 'a replay of the log gives the live rows')
  await projections.rebuild('models')
  t.same(await rows(), before, 'the rebuilt read model holds the same rows')
})
