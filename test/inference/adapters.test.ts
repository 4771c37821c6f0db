import * as ort from 'onnxruntime-node'
import t, { type Test } from 'tap'
import { handler } from '../../src/adapters/lambda-handler.js'
import { LambdaAdapters } from '../../src/adapters/lambda.js'
import { type AdapterModel, type Adapters, InProcessAdapters } from '../../src/adapters/runtime.js'
import { jpegBase64, pngBase64, redGreen } from '../adapters/fixtures.js'
import { startLambdaEndpoint } from '../adapters/lambda-endpoint.js'
import { multipart } from '../helpers/app.js'
import { inferenceSetup, poll } from '../helpers/inference.js'
import { denseOnnxModel } from '../helpers/onnx.js'

const FEATURES = ['age', 'income', 'tenure', 'visits']
const TABULAR_SCHEMA = { type: 'object', properties: Object.fromEntries(FEATURES.map((f) => [f, { type: 'number' }])), required: FEATURES }

/** The four models of the tests: one per pair of adapters, each a real ONNX file. */
const MODELS = {
  tabular: {
    bytes: denseOnnxModel({ inputs: 4, outputs: 3, seed: 3 }),
    fields: { input_schema: JSON.stringify(TABULAR_SCHEMA), labels: JSON.stringify(['bronze', 'silver', 'gold']), preprocessing: 'tabular', postprocessing: 'top_k_labels', adapter_options: JSON.stringify({ top_k: 2 }) },
    inputs: [{ features: { age: 30, income: 0.5, tenure: 2, visits: 7 } }, { age: 51, income: 1.5, tenure: 9, visits: 1 }, { features: { age: 18, income: 0.1, tenure: 0, visits: 30 } }],
  },
  image: {
    bytes: denseOnnxModel({ imageShape: [3, 4, 4], outputs: 2, seed: 5 }),
    fields: { input_shape: JSON.stringify([1, 3, 4, 4]), labels: JSON.stringify(['no', 'yes']), preprocessing: 'image_classification', postprocessing: 'binary_classification' },
    inputs: [{ image: pngBase64(8, 8, redGreen) }, { image: jpegBase64(4, 4, redGreen) }, { image: `data:image/png;base64,${pngBase64(2, 6, () => [10, 200, 30])}` }],
  },
  text: {
    bytes: denseOnnxModel({ inputs: 8, outputs: 1, seed: 7, softmax: false }),
    fields: { input_shape: JSON.stringify([1, 8]), preprocessing: 'text_tokens', postprocessing: 'regression', adapter_options: JSON.stringify({ vocabulary: ['<pad>', '<unk>', 'the', 'cat', 'sat', 'on', 'mat', '.'] }) },
    inputs: [{ text: 'The cat sat on the mat.' }, { text: 'the dog' }, { text: 'the cat the cat the cat the cat the cat' }],
  },
  raw: {
    bytes: denseOnnxModel({ inputs: 4, outputs: 2, seed: 9 }),
    fields: { preprocessing: 'passthrough', postprocessing: 'passthrough' },
    inputs: [{ data: [1, 2, 3, 4], shape: [1, 4] }, { data: [0, 0, 0, 1], shape: [1, 4] }, { data: [-1, 0.5, 2, 0], shape: [1, 4] }],
  },
} as const

type Kind = keyof typeof MODELS

async function setupModels(t: Test, adapters?: Adapters) {
  const context = await inferenceSetup(t, { workers: 1, ...(adapters ? { overrides: { adapters } } : {}) })
  const models = {} as Record<Kind, { id: string; description: AdapterModel; session: ort.InferenceSession }>
  for (const kind of Object.keys(MODELS) as Kind[]) {
    const { bytes, fields } = MODELS[kind]
    const body = multipart({ name: kind, ...fields }, { name: `${kind}.onnx`, content: bytes })
    const response = await context.app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': context.alice.key }, payload: body.payload })
    t.equal(response.statusCode, 201, `upload ${kind}: ${response.body}`)
    const m = response.json()
    const description: AdapterModel = {
      model_id: m.id,
      input_shape: m.input_shape,
      output_shape: m.output_shape,
      input_schema: m.input_schema,
      labels: m.labels,
      preprocessing: m.preprocessing,
      postprocessing: m.postprocessing,
      adapter_options: m.adapter_options,
    }
    models[kind] = { id: m.id, description, session: await ort.InferenceSession.create(bytes) }
  }
  /** What dcp should answer for an input: the same adapters around a direct onnxruntime run. */
  const local = new InProcessAdapters()
  const expected = async (kind: Kind, input: unknown) => {
    const { description, session } = models[kind]
    const [tensor] = await local.preprocess(description, [input], () => 'input')
    const out = (await session.run({ input: new ort.Tensor('float32', Float32Array.from(tensor!.data), tensor!.shape) })).output!
    const [result] = await local.postprocess(description, [{ data: Array.from(out.data as Float32Array), shape: out.dims.map(Number) }])
    return result
  }
  return { ...context, models, expected }
}

/** Numbers to 5 decimals, so a float32 round trip compares equal. */
function rounded(value: unknown): unknown {
  if (typeof value === 'number') return Math.round(value * 1e5) / 1e5
  if (Array.isArray(value)) return value.map(rounded)
  if (value && typeof value === 'object') return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, rounded(v)]))
  return value
}

t.test('every adapter on sync, async and batch inference gives what the adapters around onnxruntime give', async (t) => {
  const { api, models, expected } = await setupModels(t)
  for (const kind of Object.keys(MODELS) as Kind[]) {
    const inputs = MODELS[kind].inputs as readonly unknown[]
    const want = await Promise.all(inputs.map((input) => expected(kind, input)))

    const sync = await api('POST', '/inference', { model_id: models[kind].id, input: inputs[0] })
    t.equal(sync.status, 200, `${kind} sync: ${JSON.stringify(sync.body)}`)
    t.same(rounded(sync.body.result), rounded(want[0]), `${kind} sync`)

    const queued = await api('POST', '/inference?async=true', { model_id: models[kind].id, input: inputs[1] })
    t.equal(queued.status, 202)
    const polled = await poll(api, queued.body.job_id, (b) => b.status === 'completed', 20_000)
    t.same(rounded(polled.result), rounded(want[1]), `${kind} async`)

    const batch = await api('POST', '/inference/batch', { model_id: models[kind].id, inputs })
    t.equal(batch.status, 202, `${kind} batch: ${JSON.stringify(batch.body)}`)
    const done = await poll(api, batch.body.job_id, (b) => b.status === 'completed', 30_000)
    t.same(rounded(done.results.map((r: { result: unknown }) => r.result)), rounded(want), `${kind} batch`)
  }
  // The business formats, spelled out once so that a change to one is seen here.
  const tabular = await api('POST', '/inference', { model_id: models.tabular.id, input: MODELS.tabular.inputs[0] })
  t.match(tabular.body.result, { predictions: [{ label: /^(bronze|silver|gold)$/, index: Number, score: Number }, { label: String }] })
  t.equal(tabular.body.result.predictions.length, 2, 'top_k from adapter_options')
  const image = await api('POST', '/inference', { model_id: models.image.id, input: MODELS.image.inputs[0] })
  t.match(image.body.result, { label: /^(yes|no)$/, positive: Boolean, score: Number })
  const text = await api('POST', '/inference', { model_id: models.text.id, input: MODELS.text.inputs[0] })
  t.match(text.body.result, { value: Number })
  const raw = await api('POST', '/inference?raw=true', { model_id: models.tabular.id, input: MODELS.tabular.inputs[0] })
  t.match(raw.body.result, { data: [Number, Number, Number], shape: [1, 3] }, '?raw=true gives the tensor')
})

t.test('a business input the adapter cannot read is a 400 naming the field, for sync and batch', async (t) => {
  const { api, models } = await setupModels(t)
  const missing = await api('POST', '/inference', { model_id: models.tabular.id, input: { features: { age: 1, income: 2, tenure: 3 } } })
  t.equal(missing.status, 400)
  t.equal(missing.body.error.code, 'VALIDATION_ERROR')
  t.match(missing.body.error.message, /^input/)
  t.match(missing.body.error.message, /visits/)
  const notImage = await api('POST', '/inference/batch', { model_id: models.image.id, inputs: [MODELS.image.inputs[0], { image: 'bm90IGFuIGltYWdl' }] })
  t.equal(notImage.status, 400)
  t.match(notImage.body.error.message, /^inputs\.1\.image/)
  const tensorForText = await api('POST', '/inference', { model_id: models.text.id, input: { data: [1, 2], shape: [1, 2] } })
  t.equal(tensorForText.status, 400)
  t.match(tensorForText.body.error.message, /^input/)
  const objectForTensor = await api('POST', '/inference', { model_id: models.raw.id, input: { features: { a: 1 } } })
  t.equal(objectForTensor.status, 400)
  t.match(objectForTensor.body.error.message, /^input\.data/)
  const badOptions = multipart({ name: 'bad', preprocessing: 'tabular', adapter_options: JSON.stringify({ topk: 3 }) }, { name: 'b.onnx', content: MODELS.tabular.bytes })
  const { app, alice } = await setupModels(t)
  const refused = await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...badOptions.headers, 'x-api-key': alice.key }, payload: badOptions.payload })
  t.equal(refused.statusCode, 400, 'a model whose adapters cannot work is refused at upload')
  t.match(refused.json().error.message, /adapter_options|features|input_schema/)
})

t.test('the Lambda runtime: the same answers through the Invoke API, and its failures mapped to clear errors', async (t) => {
  let crash = false
  const endpoint = await startLambdaEndpoint({
    'dcmp-preprocess': async (event) => {
      if (crash) throw new TypeError('the image library blew up')
      return handler(event)
    },
    'dcmp-postprocess': handler,
  })
  t.teardown(() => endpoint.close())
  const lambda = new LambdaAdapters({ region: 'us-east-1', endpoint: endpoint.url, preprocessFunction: 'dcmp-preprocess', postprocessFunction: 'dcmp-postprocess', credentials: { accessKeyId: 'test', secretAccessKey: 'test' } })
  const { api, models, expected } = await setupModels(t, lambda)
  for (const kind of ['tabular', 'image', 'text'] as const) {
    const input = MODELS[kind].inputs[0]
    const sync = await api('POST', '/inference', { model_id: models[kind].id, input })
    t.equal(sync.status, 200, `${kind}: ${JSON.stringify(sync.body)}`)
    t.same(rounded(sync.body.result), rounded(await expected(kind, input)), `${kind} through Lambda equals in-process`)
  }
  const names = endpoint.invocations.map((i) => i.name)
  t.ok(names.includes('dcmp-preprocess') && names.includes('dcmp-postprocess'), 'both functions were invoked')
  t.ok(endpoint.invocations.every((i) => i.invocationType === undefined || i.invocationType === 'RequestResponse'))

  const batch = await api('POST', '/inference/batch', { model_id: models.tabular.id, inputs: MODELS.tabular.inputs })
  const done = await poll(api, batch.body.job_id, (b) => b.status === 'completed', 30_000)
  t.same(rounded(done.results.map((r: { result: unknown }) => r.result)), rounded(await Promise.all(MODELS.tabular.inputs.map((i) => expected('tabular', i)))), 'batch through Lambda')

  const bad = await api('POST', '/inference', { model_id: models.tabular.id, input: { age: 1 } })
  t.equal(bad.status, 400, 'a client mistake found in Lambda is the same 400')
  t.match(bad.body.error.message, /^input/)

  crash = true
  const crashed = await api('POST', '/inference', { model_id: models.image.id, input: MODELS.image.inputs[0] })
  t.equal(crashed.status, 502)
  t.equal(crashed.body.error.code, 'ADAPTER_FAILED')
  t.match(crashed.body.error.message, /dcmp-preprocess.*TypeError.*the image library blew up/)

  const missing = new LambdaAdapters({ region: 'us-east-1', endpoint: endpoint.url, preprocessFunction: 'dcmp-nope', postprocessFunction: 'dcmp-postprocess', credentials: { accessKeyId: 'test', secretAccessKey: 'test' } })
  const other = await setupModels(t, missing)
  const unavailable = await other.api('POST', '/inference', { model_id: other.models.tabular.id, input: MODELS.tabular.inputs[0] })
  t.equal(unavailable.status, 503)
  t.equal(unavailable.body.error.code, 'ADAPTER_UNAVAILABLE')
  t.match(unavailable.body.error.message, /dcmp-nope/)
})
