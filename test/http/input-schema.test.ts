import { monitorEventLoopDelay } from 'node:perf_hooks'
import t from 'tap'
import { multipart, testApp, type TestApp } from '../helpers/app.js'
import { denseOnnxModel } from '../helpers/onnx.js'

async function upload(context: TestApp, key: string, inputSchema: Record<string, unknown>) {
  const body = multipart({ input_schema: JSON.stringify(inputSchema) }, { name: 'm.onnx', content: denseOnnxModel({ inputs: 10, outputs: 2 }) })
  return context.app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': key }, payload: body.payload })
}

/**
 * The body's schema keeps an object that is not a tensor as sent, and the model's input_schema checks it
 * before anything else (a passthrough model then refuses it as not a tensor: the sign it passed the schema).
 */
const PASSED = /input: .*the model has no preprocessing adapter/

t.test('a catastrophic pattern answers at once and the server stays responsive (patterns run on a linear-time engine)', async (t) => {
  const context = await testApp(t)
  const alice = await context.customer()
  const uploaded = await upload(context, alice.key, { type: 'object', properties: { tag: { type: 'string', pattern: '^(a+)+$' } } })
  t.equal(uploaded.statusCode, 201, uploaded.body)
  const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
  const evil = 'a'.repeat(40) + '!'
  // the server runs in this process: a blocked event loop shows as delay here, and as a slow GET /health
  const delay = monitorEventLoopDelay({ resolution: 10 })
  delay.enable()
  const started = performance.now()
  const inference = fetch(`${url}/api/v1/inference`, {
    method: 'POST',
    headers: { 'x-api-key': alice.key, 'content-type': 'application/json' },
    body: JSON.stringify({ model_id: uploaded.json().id, input: { tag: evil } }),
  })
  const healthTimes: number[] = []
  const health = (async () => {
    while (healthTimes.length < 10) {
      const asked = performance.now()
      const response = await fetch(`${url}/api/v1/health`)
      if (response.status === 200) healthTimes.push(performance.now() - asked)
      await new Promise((resolve) => setTimeout(resolve, 20))
    }
  })()
  const [answer] = await Promise.all([inference, health])
  delay.disable()
  t.equal(answer.status, 400)
  t.match(((await answer.json()) as { error: { message: string } }).error.message, /input\.tag: must match pattern/)
  t.ok(Math.max(...healthTimes) < 200, `GET /health answered in at most ${Math.round(Math.max(...healthTimes))} ms beside the request`)
  t.ok(delay.max / 1e6 < 200, `the event loop was held at most ${Math.round(delay.max / 1e6)} ms`)
  t.ok(performance.now() - started < 2000, 'the request itself answered quickly')
})

t.test('a pattern RE2 cannot run (a lookahead, a backreference) is refused at upload and PATCH, saying why', async (t) => {
  const context = await testApp(t)
  const alice = await context.customer()
  for (const pattern of ['^(?=a)a', '(a)\\1']) {
    const refused = await upload(context, alice.key, { type: 'object', properties: { tag: { type: 'string', pattern } } })
    t.equal(refused.statusCode, 400, refused.body)
    t.match(refused.json().error.message, /input_schema: not a valid JSON Schema: pattern .* is not supported: dcp runs patterns on a linear-time \(RE2\) engine/)
  }
  const model = (await upload(context, alice.key, { type: 'object' })).json()
  const patch = await context.app.inject({ method: 'PATCH', url: `/api/v1/models/${model.id}/schema`, headers: { 'x-api-key': alice.key }, payload: { input_schema: { patternProperties: { '(?<=x)y': { type: 'string' } } } } })
  t.equal(patch.statusCode, 400, patch.body)
  t.match(patch.json().error.message, /not supported/)
})

t.test("two customers' schemas with the same $id: each is checked by its own, request after request, no 500s", async (t) => {
  const context = await testApp(t)
  const alice = await context.customer('alice')
  const bob = await context.customer('bob')
  const $id = 'https://example.com/schemas/input'
  const aliceModel = (await upload(context, alice.key, { $id, type: 'object', required: ['tag'], properties: { tag: { type: 'string' } } })).json()
  const bobModel = (await upload(context, bob.key, { $id, type: 'object', required: ['tag'], properties: { tag: { type: 'number' } } })).json()
  const infer = (key: string, model_id: string, tag: unknown) =>
    context.app.inject({ method: 'POST', url: '/api/v1/inference', headers: { 'x-api-key': key }, payload: { model_id, input: { tag } } })
  for (let round = 0; round < 3; round++) {
    t.match((await infer(alice.key, aliceModel.id, 'x')).json().error.message, PASSED, `round ${round}: alice's string passes her schema`)
    const aliceWrong = await infer(alice.key, aliceModel.id, 1)
    t.equal(aliceWrong.statusCode, 400, aliceWrong.body)
    t.match(aliceWrong.json().error.message, /input\.tag: must be string/)
    t.match((await infer(bob.key, bobModel.id, 1)).json().error.message, PASSED, `round ${round}: bob's number passes his schema`)
    const bobWrong = await infer(bob.key, bobModel.id, 'x')
    t.equal(bobWrong.statusCode, 400, bobWrong.body)
    t.match(bobWrong.json().error.message, /input\.tag: must be number/)
  }
  // a new version of the schema is compiled afresh
  const patch = await context.app.inject({ method: 'PATCH', url: `/api/v1/models/${aliceModel.id}/schema`, headers: { 'x-api-key': alice.key }, payload: { input_schema: { $id, type: 'object', required: ['tag'], properties: { tag: { type: 'boolean' } } } } })
  t.equal(patch.statusCode, 200, patch.body)
  const after = await infer(alice.key, aliceModel.id, 'x')
  t.equal(after.statusCode, 400, after.body)
  t.match(after.json().error.message, /input\.tag: must be boolean/)
})
