import t from 'tap'
import { LambdaAdapters, type LambdaAdaptersOptions } from '../../src/adapters/lambda.js'
import { handler } from '../../src/adapters/lambda-handler.js'
import { InProcessAdapters, type AdapterModel } from '../../src/adapters/runtime.js'
import { DomainError } from '../../src/domain/errors.js'
import { field, GREEN, jpegBase64, model, pngBase64, RED, redGreen } from './fixtures.js'
import { startLambdaEndpoint } from './lambda-endpoint.js'

const endpoint = await startLambdaEndpoint({
  'dcmp-preprocess': handler,
  'dcmp-postprocess': handler,
  // The real handler given an event it cannot read: it throws, as a deployed function with a bug would.
  'dcmp-broken': (event) => handler({ ...(event as object), model: undefined }),
  'dcmp-silent': () => new Promise(() => {}),
})
t.teardown(endpoint.close)

const local = new InProcessAdapters()
function lambda(options: Partial<LambdaAdaptersOptions> = {}): LambdaAdapters {
  const adapters = new LambdaAdapters({
    region: 'us-east-1',
    endpoint: endpoint.url,
    preprocessFunction: 'dcmp-preprocess',
    postprocessFunction: 'dcmp-postprocess',
    credentials: { accessKeyId: 'test', secretAccessKey: 'test' },
    ...options,
  })
  t.teardown(() => adapters.close())
  return adapters
}

const schema = { properties: { age: {}, income: {} } }
const PRE: Array<[string, AdapterModel, unknown[]]> = [
  ['image_classification NCHW', model({ preprocessing: 'image_classification', input_shape: [1, 3, 3, 3] }), [{ image: pngBase64(4, 4, redGreen) }, { image: jpegBase64(8, 8, () => GREEN) }]],
  ['image_classification NHWC grayscale', model({ preprocessing: 'image_classification', input_shape: [-1, 5, 2, 1] }), [{ image: `data:image/png;base64,${pngBase64(4, 4, redGreen)}` }]],
  ['tabular', model({ preprocessing: 'tabular', input_schema: schema }), [{ features: { income: 5000.123456789, age: 30 } }, { age: 1e-9, income: -3 }]],
  ['text_tokens, hashing', model({ preprocessing: 'text_tokens', input_shape: [1, 6] }), [{ text: 'Hello, world!' }, { text: 'a b c d e f g h' }]],
  ['text_tokens, vocabulary', model({ preprocessing: 'text_tokens', input_shape: [1, 4], adapter_options: { vocabulary: ['<pad>', '<unk>', 'hi'] } }), [{ text: 'hi there' }]],
]
const POST: Array<[string, AdapterModel, Array<{ data: number[]; shape: number[] }>]> = [
  ['top_k_labels', model({ postprocessing: 'top_k_labels', labels: ['a', 'b', 'c'], adapter_options: { top_k: 2 } }), [{ data: [1, 5, 2], shape: [1, 3] }, { data: [0.2, 0.3, 0.5, 0, 0, 1], shape: [2, 3] }]],
  ['binary_classification', model({ postprocessing: 'binary_classification', labels: ['no', 'yes'] }), [{ data: [0.3], shape: [1, 1] }, { data: [-1, 4], shape: [1, 2] }]],
  ['regression', model({ postprocessing: 'regression' }), [{ data: [Math.PI], shape: [1, 1] }, { data: [1.5, -2.25], shape: [1, 2] }]],
]

t.test('every adapter run through the Invoke endpoint gives the in-process results', async (t) => {
  const adapters = lambda()
  for (const [name, m, inputs] of PRE) {
    const before = endpoint.invocations.length
    t.same(await adapters.preprocess(m, inputs, field), await local.preprocess(m, inputs, field), name)
    t.equal(endpoint.invocations.length, before + 1, `${name}: one invocation`)
    const invocation = endpoint.invocations.at(-1)!
    t.equal(invocation.name, 'dcmp-preprocess')
    t.match(invocation.event, { adapter: m.preprocessing, model: { model_id: 'mdl_test' }, inputs, fields: inputs.map((_, i) => field(i)) })
  }
  for (const [name, m, outputs] of POST) {
    t.same(await adapters.postprocess(m, outputs), await local.postprocess(m, outputs), name)
    t.match(endpoint.invocations.at(-1), { name: 'dcmp-postprocess', event: { adapter: m.postprocessing } })
  }
})

t.test('the SDK sends signed, synchronous invocations to the configured endpoint', async (t) => {
  const before = endpoint.requests
  await lambda().postprocess(POST[2]![1], POST[2]![2])
  t.equal(endpoint.requests, before + 1, 'one HTTP request reached the local endpoint')
  const invocation = endpoint.invocations.at(-1)!
  t.equal(invocation.invocationType, 'RequestResponse')
  t.match(invocation.authorization, /^AWS4-HMAC-SHA256 Credential=test\/\d{8}\/us-east-1\/lambda\/aws4_request/)
})

t.test('passthrough stays in this process: nothing is invoked', async (t) => {
  const before = endpoint.requests
  const adapters = lambda()
  const tensors = [{ data: [1, 2], shape: [1, 2] }]
  t.same(await adapters.preprocess(model(), tensors, field), tensors)
  t.same(await adapters.postprocess(model({ postprocessing: 'passthrough' }), tensors), tensors)
  t.equal(endpoint.requests, before)
})

t.test('a client mistake comes back as the same VALIDATION_ERROR as in-process', async (t) => {
  const adapters = lambda()
  const cases: Array<[AdapterModel, unknown[]]> = [
    [PRE[0]![1], [{ image: pngBase64(2, 2, () => RED) }, { image: Buffer.from('GIF89a...').toString('base64') }]],
    [PRE[2]![1], [{ features: { age: 30 } }]],
    [PRE[3]![1], [{ text: ['not', 'a', 'string'] }]],
  ]
  for (const [m, inputs] of cases) {
    const before = endpoint.invocations.length
    const expected = await local.preprocess(m, inputs, field).catch((e: unknown) => e)
    t.ok(expected instanceof DomainError, `in-process: ${(expected as Error).message}`)
    await t.rejects(adapters.preprocess(m, inputs, field), { constructor: DomainError, code: 'VALIDATION_ERROR', message: (expected as Error).message })
    t.equal(endpoint.invocations.length, before + 1, 'the function found the mistake')
  }
  const noNames = model({ preprocessing: 'tabular' })
  const before = endpoint.requests
  await t.rejects(adapters.preprocess(noNames, [{ age: 1 }], field), { code: 'VALIDATION_ERROR', message: /^model has no feature names/ })
  t.equal(endpoint.requests, before, 'a model configuration that cannot work is refused before invoking')
})

t.test('a function that throws is ADAPTER_FAILED, with its error type and message', async (t) => {
  const adapters = lambda({ preprocessFunction: 'dcmp-broken', postprocessFunction: 'dcmp-broken' })
  await t.rejects(adapters.preprocess(PRE[2]![1], PRE[2]![2], field), {
    constructor: DomainError,
    code: 'ADAPTER_FAILED',
    message: /^dcmp-broken failed: TypeError: not an adapter request: model: /,
  })
  await t.rejects(adapters.postprocess(POST[0]![1], POST[0]![2]), { code: 'ADAPTER_FAILED', message: /^dcmp-broken failed: TypeError: / })
})

t.test('a function that cannot be reached is ADAPTER_UNAVAILABLE', async (t) => {
  const before = endpoint.requests
  await t.rejects(lambda({ preprocessFunction: 'dcmp-missing' }).preprocess(PRE[2]![1], PRE[2]![2], field), {
    constructor: DomainError,
    code: 'ADAPTER_UNAVAILABLE',
    message: /^dcmp-missing could not be invoked: ResourceNotFoundException: Function not found: .*dcmp-missing \(HTTP 404\)$/,
  })
  t.equal(endpoint.requests, before + 1, 'not found is not retried')

  const closed = await startLambdaEndpoint({})
  await closed.close()
  await t.rejects(lambda({ endpoint: closed.url }).postprocess(POST[2]![1], POST[2]![2]), { code: 'ADAPTER_UNAVAILABLE', message: /^dcmp-postprocess could not be invoked: .*ECONNREFUSED/ })

  const started = Date.now()
  const silentBefore = endpoint.invocations.filter((i) => i.name === 'dcmp-silent').length
  await t.rejects(lambda({ postprocessFunction: 'dcmp-silent', requestTimeoutMs: 300 }).postprocess(POST[2]![1], POST[2]![2]), {
    code: 'ADAPTER_UNAVAILABLE',
    message: /^dcmp-silent could not be invoked: /,
  })
  const attempts = endpoint.invocations.filter((i) => i.name === 'dcmp-silent').length - silentBefore
  t.equal(attempts, 2, 'one retry, then it gives up')
  t.ok(Date.now() - started < 5_000, `gave up after ${Date.now() - started} ms`)
})

t.test('a large request is split into invocations under maxPayloadBytes; results keep their order', async (t) => {
  const m = PRE[2]![1]
  const inputs = Array.from({ length: 60 }, (_, i) => ({ features: { age: i, income: i * 1000.5 } }))
  const before = endpoint.invocations.length
  const tensors = await lambda({ maxPayloadBytes: 1_200 }).preprocess(m, inputs, field)
  const made = endpoint.invocations.slice(before)
  t.ok(made.length >= 3, `${made.length} invocations`)
  t.ok(made.every((i) => i.requestBytes <= 1_200 && i.responseBytes <= 1_200), `requests ${made.map((i) => i.requestBytes)}; responses ${made.map((i) => i.responseBytes)}`)
  t.same(tensors, await local.preprocess(m, inputs, field))
  t.same(made.flatMap((i) => (i.event as { fields: string[] }).fields), inputs.map((_, i) => field(i)), 'each input sent once, in order')

  const outputs = Array.from({ length: 40 }, (_, i) => ({ data: [i, 40 - i, 20], shape: [1, 3] }))
  const postBefore = endpoint.invocations.length
  const results = await lambda({ maxPayloadBytes: 1_500 }).postprocess(POST[0]![1], outputs)
  t.ok(endpoint.invocations.length - postBefore >= 3, `${endpoint.invocations.length - postBefore} postprocess invocations`)
  t.same(results, await local.postprocess(POST[0]![1], outputs))
})

t.test('the split also keeps each response (the tensors) under the limit', async (t) => {
  const m = model({ preprocessing: 'image_classification', input_shape: [1, 3, 8, 8] })
  const inputs = Array.from({ length: 5 }, (_, i) => ({ image: pngBase64(2, 2, () => [i * 50, 0, 0]) }))
  const before = endpoint.invocations.length
  const tensors = await lambda({ maxPayloadBytes: 5_000 }).preprocess(m, inputs, field)
  const made = endpoint.invocations.slice(before)
  t.ok(made.length >= 3 && made.every((i) => i.responseBytes <= 5_000), `responses ${made.map((i) => i.responseBytes)}`)
  t.same(tensors, await local.preprocess(m, inputs, field))
})

t.test('with the default limit, a batch of 224x224 images fits AWS\'s 6 MB payloads', async (t) => {
  const m = model({ preprocessing: 'image_classification', input_shape: [1, 3, 224, 224] })
  const inputs = Array.from({ length: 8 }, (_, i) => ({ image: pngBase64(32, 32, (x, y) => [(x * 8 + i) % 256, y * 8, 100]) }))
  const before = endpoint.invocations.length
  const tensors = await lambda().preprocess(m, inputs, field)
  const made = endpoint.invocations.slice(before)
  t.ok(made.length > 1, `${made.length} invocations, responses ${made.map((i) => i.responseBytes)}`)
  const expected = await local.preprocess(m, inputs, field)
  t.equal(tensors.length, 8)
  t.ok(tensors.every((tensor, i) => tensor.data.length === 150_528 && tensor.data.every((v, j) => v === expected[i]!.data[j])), 'bit-for-bit the in-process tensors')
})

t.test('one input larger than a payload is refused, named; the earliest bad input is the one reported', async (t) => {
  const m = PRE[3]![1]
  await t.rejects(lambda({ maxPayloadBytes: 1_000 }).preprocess(m, [{ text: 'ok' }, { text: 'x'.repeat(2_000) }], field), {
    code: 'PAYLOAD_TOO_LARGE',
    message: /^inputs\.1: \d+ bytes is more than one Lambda invocation carries \(1000 bytes\)/,
  })
  const inputs = Array.from({ length: 30 }, (_, i) => (i === 7 || i === 25 ? { text: 7 } : { text: `text ${i}` }))
  await t.rejects(lambda({ maxPayloadBytes: 600, concurrency: 8 }).preprocess(m, inputs, field), { code: 'VALIDATION_ERROR', message: 'inputs.7.text: must be a string, got number' })
})
