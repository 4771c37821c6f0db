import t from 'tap'
import { multipart, testApp } from '../helpers/app.js'
import { denseOnnxModel } from '../helpers/onnx.js'

t.test('deeply nested JSON: a 400 saying the nesting is too deep, not a 500 from an overflowed stack', async (t) => {
  const { app, customer } = await testApp(t)
  const alice = await customer()
  const headers = { 'x-api-key': alice.key, 'content-type': 'application/json' }
  const nested = (depth: number) => '['.repeat(depth) + ']'.repeat(depth)
  for (const depth of [65, 20_000]) {
    const response = await app.inject({ method: 'POST', url: '/api/v1/projects', headers, payload: `{"name":"p","type":"realtime","extra":${nested(depth)}}` })
    t.equal(response.statusCode, 400, `${depth} levels: ${response.body.slice(0, 200)}`)
    t.equal(response.json().error.code, 'VALIDATION_ERROR')
    t.match(response.json().error.message, /^body\.extra(\.0)*: nested more than 64 levels deep/)
  }
  // 64 levels in all (the body is one) pass the depth check (the route's schema then drops the unknown field)
  const fine = await app.inject({ method: 'POST', url: '/api/v1/projects', headers, payload: `{"name":"p","type":"realtime","extra":${nested(63)}}` })
  t.equal(fine.statusCode, 201, fine.body)
})

t.test('a __proto__ key: a 400 that says what is refused', async (t) => {
  const { app, customer } = await testApp(t)
  const alice = await customer()
  const headers = { 'x-api-key': alice.key, 'content-type': 'application/json' }
  for (const payload of ['{"name":"p","type":"realtime","__proto__":{"admin":true}}', '{"name":"p","type":"realtime","x":{"constructor":{"prototype":{"a":1}}}}']) {
    const response = await app.inject({ method: 'POST', url: '/api/v1/projects', headers, payload })
    t.equal(response.statusCode, 400, response.body)
    t.equal(response.json().error.code, 'VALIDATION_ERROR')
    t.match(response.json().error.message, /"__proto__" key, or a "constructor" object with a "prototype" key, is refused/)
  }
  // the word itself inside a value is only text
  const fine = await app.inject({ method: 'POST', url: '/api/v1/projects', headers, payload: '{"name":"__proto__ constructor","type":"realtime"}' })
  t.equal(fine.statusCode, 201, fine.body)
  // malformed JSON keeps fastify's message
  const bad = await app.inject({ method: 'POST', url: '/api/v1/projects', headers, payload: '{"name":' })
  t.equal(bad.statusCode, 400)
  t.match(bad.json().error.message, /^Body is not valid JSON/)
})

t.test('a model upload field of JSON nested too deep: a 400 naming the field', async (t) => {
  const { app, customer } = await testApp(t)
  const alice = await customer()
  const deep = '{"a":'.repeat(20_000) + '1' + '}'.repeat(20_000)
  const body = multipart({ adapter_options: deep }, { name: 'm.onnx', content: denseOnnxModel() })
  const response = await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': alice.key }, payload: body.payload })
  t.equal(response.statusCode, 400, response.body.slice(0, 300))
  t.match(response.json().error.message, /^adapter_options: nested more than 64 levels deep/)
})
