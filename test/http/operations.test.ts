import { type Test, t } from 'tap'
import { ADMIN_KEY, testApp } from '../helpers/app.js'

/**
 * The OpenAPI document of the fleet, usage, efficiency, dashboard and admin routes: each operation has a
 * stable operationId, its success body a schema (or its media type, for streams and downloads), and links
 * where one answer's id feeds another operation, so that a client generator and a stateful fuzzer can use it.
 */

const JSON_OPERATIONS = [
  'post /admin/customers', 'get /admin/customers', 'post /admin/customers/{id}/keys', 'get /admin/customers/{id}/keys',
  'post /admin/enrollment-tokens', 'get /admin/enrollment-tokens', 'get /admin/devices/{id}/logs',
  'post /admin/devices/{id}/ban', 'delete /admin/devices/{id}/ban', 'post /admin/devices/{id}/release',
  'get /devices', 'get /devices/stats', 'get /devices/{id}', 'get /devices/{id}/logs',
  'get /efficiency', 'get /efficiency/comparison', 'get /efficiency/chart/{type}', 'get /efficiency/active', 'get /efficiency/job/{jobId}',
  'get /usage', 'get /usage/projects/{id}', 'get /usage/hourly', 'get /admin/usage', 'get /admin/audit/usage', 'get /internal/uuid-usage', 'get /internal/uuid-usage/errors',
  'get /dashboard/devices', 'get /dashboard/jobs', 'get /dashboard/projects', 'get /dashboard/tasks', 'get /dashboard/tasks/throughput',
  'get /dashboard/efficiency', 'get /dashboard/comparison', 'get /cluster/utilization', 'post /dashboard/stream-tickets',
  'post /dashboard/benchmark', 'get /dashboard/benchmark/{id}', 'post /dashboard/benchmark/perf', 'get /dashboard/benchmark/perf/{id}',
]
const NO_BODY = ['delete /admin/customers/{id}/keys/{keyId}', 'delete /admin/enrollment-tokens/{id}']
const MEDIA = { 'get /dashboard/projects/{id}/stream': 'text/event-stream', 'get /sdk/models/{id}': 'application/octet-stream', 'get /sdk/package': 'application/gzip' }

type Operation = { operationId?: string; parameters?: { name: string; in: string }[]; responses: Record<string, { content?: Record<string, { schema?: Record<string, unknown> }>; links?: Record<string, { operationId: string; parameters?: Record<string, string> }> }> }

async function documentOf(t: Test) {
  const { app } = await testApp(t)
  const doc = (await app.inject({ method: 'GET', url: '/api/v1/openapi.json' })).json() as { paths: Record<string, Record<string, Operation>> }
  const operation = (key: string): Operation => {
    const [method, path] = key.split(' ') as [string, string]
    return doc.paths[`/api/v1${path}`]![method]!
  }
  const all = Object.values(doc.paths).flatMap((path) => Object.values(path))
  return { app, doc, operation, all }
}
const success = (operation: Operation) => Object.keys(operation.responses).filter((status) => /^2\d\d$/.test(status))

t.test('every operation has an operationId, unique in the document', async (t) => {
  const { operation, all } = await documentOf(t)
  for (const key of [...JSON_OPERATIONS, ...NO_BODY, ...Object.keys(MEDIA)]) t.match(operation(key).operationId, /^[a-z][A-Za-z]+$/, key)
  const ids = all.map((o) => o.operationId).filter((id) => id !== undefined)
  t.same(ids.filter((id, i) => ids.indexOf(id) !== i), [], 'no operationId is used twice')
})

t.test('every success body is described: a JSON schema, or the media type of a stream or a download', async (t) => {
  const { operation } = await documentOf(t)
  for (const key of JSON_OPERATIONS) {
    const statuses = success(operation(key))
    t.ok(statuses.length > 0, `${key} has a success status`)
    for (const status of statuses) t.match(operation(key).responses[status]!.content?.['application/json']?.schema, { type: 'object' }, `${key} ${status} has a body schema`)
  }
  for (const key of NO_BODY) t.same(success(operation(key)), ['204'], `${key}: 204, no body`)
  for (const [key, media] of Object.entries(MEDIA)) t.ok(operation(key).responses['200']!.content?.[media], `${key}: ${media}`)
  t.match(operation('get /sdk/package').responses['200']!.content!['application/gzip']!.schema, { type: 'string', format: 'binary' })
  // fixed states are enums, and a field left out of a body is not allowed in it
  const device = operation('get /devices/{id}').responses['200']!.content!['application/json']!.schema as { properties: Record<string, { enum?: string[] }>; additionalProperties: unknown }
  t.same(device.properties.status!.enum, ['idle', 'busy', 'offline'])
  t.equal(device.additionalProperties, false)
})

t.test("links: each names an operation of the document and that operation's parameters", async (t) => {
  const { all, operation } = await documentOf(t)
  const byId = new Map(all.map((o) => [o.operationId, o]))
  let links = 0
  for (const from of all) {
    for (const response of Object.values(from.responses)) {
      for (const [name, link] of Object.entries(response.links ?? {})) {
        links++
        const target = byId.get(link.operationId)
        t.ok(target, `${from.operationId} -> ${name}: ${link.operationId} exists`)
        for (const parameter of Object.keys(link.parameters ?? {})) t.ok(target?.parameters?.some((p) => p.name === parameter), `${link.operationId} takes ${parameter}`)
      }
    }
  }
  t.ok(links >= 10, `${links} links`)
  // on the first success status, the one that carries the id
  t.match(operation('post /admin/customers').responses['201']!.links, { revokeApiKey: { operationId: 'revokeApiKey', parameters: { id: '$response.body#/id', keyId: '$response.body#/key_id' } } })
  t.match(operation('post /admin/enrollment-tokens').responses['201']!.links, { revokeEnrollmentToken: { parameters: { id: '$response.body#/id' } } })
  t.match(operation('post /dashboard/benchmark').responses['202']!.links, { getBenchmark: { parameters: { id: '$response.body#/benchmark_id' } } })
})

t.test('a link followed as a client would: the created customer\'s key is revoked through it', async (t) => {
  const { app, doc, operation } = await documentOf(t)
  const admin = { 'x-admin-key': ADMIN_KEY }
  const created = await app.inject({ method: 'POST', url: '/api/v1/admin/customers', headers: admin, payload: { name: 'Linked' } })
  t.equal(created.statusCode, 201, created.body)
  const link = operation('post /admin/customers').responses['201']!.links!.revokeApiKey!
  // `$response.body#/<pointer>`: the value at that JSON pointer of the answer
  const value = (expression: string) => expression.replace(/^\$response\.body#/, '').split('/').slice(1).reduce<any>((at, key) => at[key], created.json())
  const [path, method] = Object.entries(doc.paths).flatMap(([p, ops]) => Object.entries(ops).filter(([, o]) => o.operationId === link.operationId).map(([m]) => [p, m] as const))[0]!
  const url = path.replace(/\{(\w+)\}/g, (_, name: string) => encodeURIComponent(value(link.parameters![name]!)))
  const revoked = await app.inject({ method: method.toUpperCase() as 'DELETE', url, headers: admin })
  t.equal(revoked.statusCode, 204, revoked.body)
  const refused = await app.inject({ method: 'GET', url: '/api/v1/usage', headers: { 'x-api-key': created.json().api_key } })
  t.equal(refused.statusCode, 401, 'the key the link revoked is refused')
})
