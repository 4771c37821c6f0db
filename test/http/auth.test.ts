import { mkdtemp, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import t from 'tap'
import { ensureInternalToken } from '../../src/internal-token.js'
import { ADMIN_KEY, multipart, testApp } from '../helpers/app.js'
import { denseOnnxModel } from '../helpers/onnx.js'

/** A concrete URL for a route pattern: params become another tenant's real ids where we have them. */
function concrete(url: string, ids: Record<string, string>): string {
  return url.replace(/:([A-Za-z]+)/g, (_, name: string) => ids[name] ?? `x_${name}`)
}

// another tenant's key on every route that names a resource: test/http/tenancy.test.ts, with real resources and valid bodies
t.test('route table: every route refuses a missing key, a wrong key, and a key of the wrong kind', async (t) => {
  const { app, customer } = await testApp(t)
  const alice = await customer()
  const bob = await customer()
  const body = multipart({}, { name: 'm.onnx', content: denseOnnxModel() })
  const bobsModel = (await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': bob.key }, payload: body.payload })).json()
  const ids = { id: bobsModel.id, jobId: 'job_x', keyId: bob.keyId }
  await app.ready()
  const routes = app.routeTable.filter((r) => r.auth !== 'none')
  t.ok(routes.length >= 10, `${routes.length} authenticated routes found`)
  const headerOf = { api_key: 'x-api-key', admin: 'x-admin-key', internal: 'x-internal-token', sdk: 'x-sdk-token' } as const
  for (const route of routes) {
    const url = concrete(route.url, ids)
    const method = route.method as 'GET'
    const payload = ['POST', 'PATCH', 'PUT'].includes(route.method) ? {} : undefined
    const header = headerOf[route.auth as keyof typeof headerOf]
    const none = await app.inject({ method, url, payload })
    t.equal(none.statusCode, 401, `${route.method} ${route.url} without a key`)
    t.equal(none.json().error.code, 'AUTH_REQUIRED')
    const wrong = await app.inject({ method, url, payload, headers: { [header]: 'not-the-key-0000000000000000' } })
    t.equal(wrong.statusCode, 401, `${route.method} ${route.url} with a wrong key`)
    t.equal(wrong.json().error.code, 'AUTH_INVALID')
    if (route.auth !== 'api_key') {
      const customerKey = await app.inject({ method, url, payload, headers: { [header]: alice.key } })
      t.equal(customerKey.statusCode, 401, `${route.method} ${route.url}: a customer's API key is not an ${route.auth} credential`)
    }
  }
  // bob's model is untouched after all that
  const still = await app.inject({ method: 'GET', url: `/api/v1/models/${bobsModel.id}`, headers: { 'x-api-key': bob.key } })
  t.equal(still.statusCode, 200)
})

t.test('API keys: random, prefixed, stored only as a hash, shown once, revocable', async (t) => {
  const { app, database, customer } = await testApp(t)
  const alice = await customer('Alice Ltd')
  t.match(alice.key, /^dcp_k_[A-Za-z0-9_-]{43}$/, '256 random bits behind a recognisable prefix')
  const { rows } = await database.pool.query('select data::text from events')
  t.notOk(rows.some((r: { data: string }) => r.data.includes(alice.key)), 'the key is not in the log')
  const admin = { 'x-admin-key': ADMIN_KEY }
  const keys = await app.inject({ method: 'GET', url: `/api/v1/admin/customers/${alice.id}/keys`, headers: admin })
  t.equal(keys.statusCode, 200)
  t.notOk(keys.body.includes(alice.key), 'listing shows no key')
  t.equal(keys.json().keys[0].prefix, alice.key.slice(0, 12))
  const second = await app.inject({ method: 'POST', url: `/api/v1/admin/customers/${alice.id}/keys`, headers: admin })
  t.equal(second.statusCode, 201)
  const secondKey = second.json().api_key as string
  t.not(secondKey, alice.key)
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/models', headers: { 'x-api-key': secondKey } })).statusCode, 200)
  const revoke = await app.inject({ method: 'DELETE', url: `/api/v1/admin/customers/${alice.id}/keys/${alice.keyId}`, headers: admin })
  t.equal(revoke.statusCode, 204)
  const refused = await app.inject({ method: 'GET', url: '/api/v1/models', headers: { 'x-api-key': alice.key } })
  t.equal(refused.statusCode, 401, 'a revoked key is refused at once')
  t.match(refused.json().error.message, /revoked/)
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/models', headers: { 'x-api-key': secondKey } })).statusCode, 200, 'the other key still works')
  t.equal((await app.inject({ method: 'DELETE', url: `/api/v1/admin/customers/${alice.id}/keys/${alice.keyId}`, headers: admin })).statusCode, 204, 'revoking twice is fine')
  t.equal((await app.inject({ method: 'DELETE', url: `/api/v1/admin/customers/${alice.id}/keys/key_nope`, headers: admin })).statusCode, 404)
  t.equal((await app.inject({ method: 'POST', url: '/api/v1/admin/customers/cust_nope/keys', headers: admin })).statusCode, 404)
  const list = await app.inject({ method: 'GET', url: '/api/v1/admin/customers', headers: admin })
  t.same(list.json().customers.map((c: { name: string; active_keys: number }) => [c.name, c.active_keys]), [['Alice Ltd', 1]])
  const bad = await app.inject({ method: 'POST', url: '/api/v1/admin/customers', headers: admin, payload: { name: '' } })
  t.equal(bad.statusCode, 400)
  t.match(bad.json().error.message, /body\.name/)
})

t.test('without ADMIN_KEY the admin routes refuse every request', async (t) => {
  const { app } = await testApp(t, { adminKey: undefined })
  for (const headers of [{}, { 'x-admin-key': 'anything-at-all-0000' }, { 'x-admin-key': '' }]) {
    const response = await app.inject({ method: 'GET', url: '/api/v1/admin/customers', headers })
    t.equal(response.statusCode, 403)
    t.match(response.json().error.message, /ADMIN_KEY/)
  }
})

t.test('rate limit per API key: 429 with Retry-After; other keys unaffected', async (t) => {
  const { app, customer } = await testApp(t, { rateLimit: { max: 3, windowMs: 60_000 } })
  const alice = await customer()
  const bob = await customer()
  const codes = []
  for (let i = 0; i < 5; i++) codes.push((await app.inject({ method: 'GET', url: '/api/v1/models', headers: { 'x-api-key': alice.key } })).statusCode)
  t.same(codes, [200, 200, 200, 429, 429])
  const limited = await app.inject({ method: 'GET', url: '/api/v1/models', headers: { 'x-api-key': alice.key } })
  t.match(limited.json(), { error: { code: 'RATE_LIMITED', message: /^rate limit of 3 requests per .+ exceeded; retry in \d+ s$/ } }, 'the error format, message included')
  t.ok(Number(limited.headers['retry-after']) > 0, 'Retry-After says when')
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/models', headers: { 'x-api-key': bob.key } })).statusCode, 200)
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/health' })).statusCode, 200, 'health is not limited')
})

t.test('internal token: generated once into the data directory, owner-only, reused, and checked', async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'dcp-token-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  const token = await ensureInternalToken(dir)
  t.match(token, /^dcp_i_[A-Za-z0-9_-]{43}$/)
  t.equal((await stat(path.join(dir, 'internal_token'))).mode & 0o777, 0o600, 'readable by its owner only')
  t.equal(await ensureInternalToken(dir), token, 'reused on the next start')

  const { app } = await testApp(t, { internalToken: token })
  // internal endpoints arrive with usage metering; this one exercises the same hook
  app.get('/api/v1/internal/ping', { config: { auth: 'internal' } }, async () => ({ ok: true }))
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/internal/ping' })).statusCode, 401)
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/internal/ping', headers: { 'x-internal-token': `${token}x` } })).statusCode, 401)
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/internal/ping', headers: { 'x-internal-token': token } })).statusCode, 200)
})

t.test('failed authentications are limited per address before any lookup; valid keys go on', async (t) => {
  const { app, customer } = await testApp(t, { authFailures: { max: 5, windowMs: 60_000 } })
  const alice = await customer()
  const guesses = []
  for (let i = 0; i < 8; i++) guesses.push(await app.inject({ method: 'GET', url: '/api/v1/admin/customers', headers: { 'x-admin-key': `guess-${i}-000000000000000` } }))
  t.same(guesses.map((r) => r.statusCode), [401, 401, 401, 401, 401, 429, 429, 429], 'the sixth guess is refused unheard')
  t.equal(guesses[5]!.json().error.code, 'RATE_LIMITED')
  t.ok(Number(guesses[5]!.headers['retry-after']) > 0, 'with Retry-After')
  // random API keys count the same (each one would otherwise cost a lookup and get its own rate-limit bucket)
  const random = await app.inject({ method: 'GET', url: '/api/v1/models', headers: { 'x-api-key': 'dcp_k_random0000000000000000' } })
  t.equal(random.statusCode, 429)
  // the address is blocked for authenticating routes, not for health; another address is not blocked
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/health' })).statusCode, 200)
  const elsewhere = await app.inject({ method: 'GET', url: '/api/v1/models', headers: { 'x-api-key': alice.key }, remoteAddress: '10.0.0.9' })
  t.equal(elsewhere.statusCode, 200, 'a valid key from another address is served')
})
