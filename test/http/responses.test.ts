import Fastify from 'fastify'
import { t } from 'tap'
import { z } from 'zod'
import { droppedField, responseSerializer } from '../../src/http/responses.js'
import { testApp } from '../helpers/app.js'

const Body = z.object({ id: z.string(), count: z.number().int(), at: z.string() })

async function appWith(strict: boolean, body: unknown) {
  const app = Fastify({ logger: false })
  app.setSerializerCompiler(responseSerializer({ strict }))
  app.get('/thing', { schema: { response: { 200: Body } } }, async () => body)
  await app.ready()
  return app
}

t.test('a body the schema describes is sent as it is (dates as JSON writes them)', async (t) => {
  const at = new Date('2026-01-02T03:04:05.000Z')
  const app = await appWith(true, { id: 'a', count: 2, at })
  const response = await app.inject({ method: 'GET', url: '/thing' })
  t.equal(response.statusCode, 200)
  t.same(response.json(), { id: 'a', count: 2, at: at.toISOString() })
})

t.test('strict: a field the schema leaves out is a 500 naming it, not silently dropped', async (t) => {
  const app = await appWith(true, { id: 'a', count: 2, at: 'x', secret_extra: 1 })
  const response = await app.inject({ method: 'GET', url: '/thing' })
  t.equal(response.statusCode, 500)
  t.match(response.body, /secret_extra is not in the schema/)
})

t.test('strict: a wrong type is a 500 naming the field', async (t) => {
  const app = await appWith(true, { id: 'a', count: 'two', at: 'x' })
  const response = await app.inject({ method: 'GET', url: '/thing' })
  t.equal(response.statusCode, 500)
  t.match(response.body, /count/)
})

t.test('not strict (production): the body goes out as the handler made it, unchecked', async (t) => {
  const app = await appWith(false, { id: 'a', count: 'two', at: 'x', extra: true })
  const response = await app.inject({ method: 'GET', url: '/thing' })
  t.equal(response.statusCode, 200)
  t.same(response.json(), { id: 'a', count: 'two', at: 'x', extra: true })
})

t.test('droppedField finds a field dropped deep in arrays and objects', async (t) => {
  t.equal(droppedField({ a: [{ b: 1, c: 2 }] }, { a: [{ b: 1 }] }), 'a[0].c')
  t.equal(droppedField({ a: [{ b: 1 }] }, { a: [{ b: 1 }] }), undefined)
  t.equal(droppedField({ a: null }, { a: null }), undefined)
})

t.test('the OpenAPI document carries the success schemas of the routes that declare one', async (t) => {
  const { app } = await testApp(t, { strictResponses: true })
  const document = (await app.inject({ method: 'GET', url: '/api/v1/openapi.json' })).json()
  const health = document.paths['/api/v1/health'].get.responses['200']
  t.match(health, { description: String, content: { 'application/json': { schema: { type: 'object', required: ['status', 'version', 'timestamp'] } } } })
  const detailed = document.paths['/api/v1/health/detailed'].get.responses
  t.ok(detailed['503'].content, 'the 503 of the detailed health has its body')
  t.ok(detailed['4XX'] && detailed['5XX'], 'the error contract is still there')
  const served = await app.inject({ method: 'GET', url: '/api/v1/health/detailed' })
  t.equal(served.statusCode, 200, served.body)
})

t.test('OpenAPI 3.0: every nullable enum of the document lists null (else a documented null is "schema-violating")', async (t) => {
  const { app } = await testApp(t)
  const document = (await app.inject({ method: 'GET', url: '/api/v1/openapi.json' })).json()
  const offending: string[] = []
  let nullableEnums = 0
  const walk = (node: unknown, at: string): void => {
    if (!node || typeof node !== 'object') return
    const schema = node as { nullable?: boolean; enum?: unknown[] }
    if (schema.nullable === true && Array.isArray(schema.enum)) {
      nullableEnums++
      if (!schema.enum.includes(null)) offending.push(at)
    }
    for (const [key, value] of Object.entries(node)) walk(value, `${at}/${key}`)
  }
  walk(document.paths, '')
  t.ok(nullableEnums > 0, `${nullableEnums} nullable enums (PATCH /models/{id}/schema's preprocessing among them)`)
  t.same(offending, [])
})
