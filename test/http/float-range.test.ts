import t from 'tap'
import { multipart, testApp } from '../helpers/app.js'
import { denseOnnxModel } from '../helpers/onnx.js'

t.test('an input value beyond float32 is a 400 naming the field, before any device sees it', async (t) => {
  const context = await testApp(t)
  const alice = await context.customer()
  const headers = { 'x-api-key': alice.key }
  const body = multipart({}, { name: 'm.onnx', content: denseOnnxModel({ inputs: 3, outputs: 2 }) })
  const model = (await context.app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, ...headers }, payload: body.payload })).json()
  const cases: [Record<string, unknown>, string][] = [
    [{ model_id: model.id, input: { data: [0.5, 1e39, 0.5], shape: [1, 3] } }, 'input.data.1'],
    [{ model_id: model.id, input: { data: [-3.5e38, 0, 0], shape: [1, 3] } }, 'input.data.0'],
  ]
  for (const [payload, field] of cases) {
    const response = await context.app.inject({ method: 'POST', url: '/api/v1/inference', headers, payload })
    t.equal(response.statusCode, 400, response.body)
    t.equal(response.json().error.message, `${field}: must be within the float32 range (±3.4028235e38)`)
  }
  const batch = await context.app.inject({ method: 'POST', url: '/api/v1/inference/batch', headers, payload: { model_id: model.id, inputs: [{ data: [1, 2, 3], shape: [1, 3] }, { data: [1, 2, 1e300], shape: [1, 3] }] } })
  t.equal(batch.statusCode, 400, batch.body)
  t.match(batch.json().error.message, /^inputs\.1\.data\.2: must be within the float32 range/)
  // the largest float32 itself is a value like any other (no device: 503 after the checks)
  const edge = await context.app.inject({ method: 'POST', url: '/api/v1/inference', headers, payload: { model_id: model.id, input: { data: [3.4028234663852886e38, -3.4028234663852886e38, 0], shape: [1, 3] } } })
  t.equal(edge.json().error.code, 'NO_DEVICES', edge.body)
})

t.test('the passthrough and tabular adapters refuse such values too', async (t) => {
  const context = await testApp(t)
  const alice = await context.customer()
  const headers = { 'x-api-key': alice.key }
  const upload = async (fields: Record<string, string>) => {
    const body = multipart(fields, { name: 'm.onnx', content: denseOnnxModel({ inputs: 3, outputs: 2 }) })
    const response = await context.app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, ...headers }, payload: body.payload })
    t.equal(response.statusCode, 201, response.body)
    return response.json()
  }
  const passthrough = await upload({ preprocessing: 'passthrough' })
  const p = await context.app.inject({ method: 'POST', url: '/api/v1/inference', headers, payload: { model_id: passthrough.id, input: { data: [0, 0, 1e39], shape: [1, 3] } } })
  t.equal(p.statusCode, 400, p.body)
  t.match(p.json().error.message, /input\.data\.2: must be within the float32 range/)
  const schema = { type: 'object', properties: { a: { type: 'number' }, b: { type: 'number' }, c: { type: 'number' } } }
  const tabular = await upload({ preprocessing: 'tabular', input_schema: JSON.stringify(schema), input_shape: '[1,3]' })
  const tab = await context.app.inject({ method: 'POST', url: '/api/v1/inference', headers, payload: { model_id: tabular.id, input: { features: { a: 1, b: -1e39, c: 0 } } } })
  t.equal(tab.statusCode, 400, tab.body)
  t.match(tab.json().error.message, /input\.features\.b: must be within the float32 range/)
})
