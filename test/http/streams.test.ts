import { Writable } from 'node:stream'
import t, { type Test } from 'tap'
import { sseEvents } from '../../src/cli/sse.js'
import { ADMIN_KEY, testApp } from '../helpers/app.js'

type Sse = { event: string; data: string }

/** A running server with two customers, each with a project; `overrides` reach buildApp. */
async function setup(t: Test, overrides: Parameters<typeof testApp>[1] = {}) {
  const context = await testApp(t, overrides)
  const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
  const alice = await context.customer('alice')
  const bob = await context.customer('bob')
  const call = async (key: string, method: string, route: string, payload?: unknown) => {
    const response = await fetch(`${url}/api/v1${route}`, { method, headers: { 'x-api-key': key, ...(payload === undefined ? {} : { 'content-type': 'application/json' }) }, ...(payload === undefined ? {} : { body: JSON.stringify(payload) }) })
    return { status: response.status, body: (await response.json()) as any }
  }
  const project = async (key: string) => (await call(key, 'POST', '/projects', { name: 'live', type: 'realtime' })).body.project_id as string
  const ticket = async (key: string, projectId?: string) => call(key, 'POST', '/dashboard/stream-tickets', projectId === undefined ? undefined : { project_id: projectId })
  const streamUrl = (projectId: string, query: string) => `${url}/api/v1/dashboard/projects/${projectId}/stream?${query}`
  return { ...context, url, alice, bob, call, project, ticket, streamUrl }
}

/** Opens a stream; `events` fills as they come, `ended` resolves when the server closes it, `close()` hangs up. */
async function open(url: string, headers: Record<string, string> = {}) {
  const abort = new AbortController()
  const response = await fetch(url, { headers, signal: abort.signal })
  const events: Sse[] = []
  const ended =
    response.status === 200
      ? (async () => {
          try {
            for await (const e of sseEvents(response.body as unknown as AsyncIterable<Uint8Array>)) events.push(e)
            return true
          } catch {
            return false // we hung up
          }
        })()
      : Promise.resolve(true)
  if (response.status !== 200) await response.text()
  return { status: response.status, response, events, ended, close: () => abort.abort() }
}

const within = <T>(promise: Promise<T>, ms: number, what: string) =>
  Promise.race([promise, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`${what} not within ${ms} ms`)), ms))])

t.test('a stream ticket opens one stream, once, before it expires, for its own customer and project only', async (t) => {
  const { alice, bob, project, ticket, streamUrl } = await setup(t, { streamTicketTtlMs: 1000 })
  const mine = await project(alice.key)
  const other = await project(alice.key)
  const bobs = await project(bob.key)

  const issued = await ticket(alice.key, mine)
  t.equal(issued.status, 201)
  t.match(issued.body, { ticket: /^dcp_t_/, expires_at: String })
  t.ok(Date.parse(issued.body.expires_at) - Date.now() <= 1000, 'expires with the configured ttl')

  const first = await open(streamUrl(mine, `interval=200&ticket=${issued.body.ticket}`))
  t.equal(first.status, 200, 'the ticket opens the stream')
  await within((async () => { while (first.events.length === 0) await new Promise((r) => setTimeout(r, 20)) })(), 5000, 'a stats event')
  t.equal(first.events[0]!.event, 'stats')
  first.close()
  t.equal((await open(streamUrl(mine, `ticket=${issued.body.ticket}`))).status, 401, 'a used ticket is refused')

  const late = (await ticket(alice.key, mine)).body.ticket
  await new Promise((r) => setTimeout(r, 1200))
  t.equal((await open(streamUrl(mine, `ticket=${late}`))).status, 401, 'an expired ticket is refused')

  const any = (await ticket(alice.key)).body.ticket
  t.equal((await open(streamUrl(bobs, `ticket=${any}`))).status, 404, "alice's ticket does not open bob's project")
  const bound = (await ticket(alice.key, mine)).body.ticket
  t.equal((await open(streamUrl(other, `ticket=${bound}`))).status, 403, 'a ticket for one project does not open another')
  t.equal((await ticket(alice.key, bobs)).status, 404, "no ticket for bob's project")
  t.equal((await open(streamUrl(mine, 'ticket=dcp_t_made-up'))).status, 401)
  t.equal((await open(streamUrl(mine, ''))).status, 401, 'neither ticket nor key')

  const withKey = await open(streamUrl(mine, `api_key=${alice.key}`))
  t.equal(withKey.status, 400, 'an API key in the URL is refused')
  const refused = await fetch(streamUrl(mine, `api_key=${alice.key}`), { headers: { 'x-api-key': alice.key } })
  t.equal(refused.status, 400, 'even beside a valid header')
  t.match(((await refused.json()) as any).error, { code: 'VALIDATION_ERROR', message: /ticket/ })

  const header = await open(streamUrl(mine, 'interval=200'), { 'x-api-key': alice.key })
  t.equal(header.status, 200, 'the X-API-Key header still opens it (dcp watch)')
  header.close()
})

t.test('keys and tickets in URLs never reach the request log', async (t) => {
  let log = ''
  const logStream = new Writable({ write(chunk, _encoding, done) { log += chunk.toString(); done() } })
  const { alice, project, ticket, streamUrl, url } = await setup(t, { logLevel: 'info', logStream })
  const mine = await project(alice.key)
  const issued = (await ticket(alice.key, mine)).body.ticket as string
  const stream = await open(streamUrl(mine, `interval=200&ticket=${issued}`))
  t.equal(stream.status, 200)
  stream.close()
  await open(streamUrl(mine, `api_key=${alice.key}`))
  await fetch(`${url}/api/v1/dashboard/devices?limit=5&api_key=${alice.key}`)
  await new Promise((r) => setTimeout(r, 200))

  t.match(log, /incoming request/, 'requests are logged')
  t.match(log, /ticket=\[redacted\]/)
  t.match(log, /api_key=\[redacted\]/)
  t.match(log, /limit=5/, 'other parameters are kept')
  t.notOk(log.includes(alice.key), 'the API key is not in the log')
  t.notOk(log.includes(issued), 'the ticket is not in the log')
})

t.test('revoking the key ends its open streams within seconds, and its tickets open none', async (t) => {
  const { alice, project, ticket, streamUrl, app } = await setup(t, { streamCredentialCheckMs: 300 })
  const mine = await project(alice.key)
  // an interval of a minute: the key check does not wait for the next update
  const byHeader = await open(streamUrl(mine, 'interval=60000'), { 'x-api-key': alice.key })
  const byTicket = await open(streamUrl(mine, `interval=60000&ticket=${(await ticket(alice.key, mine)).body.ticket}`))
  t.equal(byHeader.status, 200)
  t.equal(byTicket.status, 200)
  const unused = (await ticket(alice.key, mine)).body.ticket

  const revoked = await app.inject({ method: 'DELETE', url: `/api/v1/admin/customers/${alice.id}/keys/${alice.keyId}`, headers: { 'x-admin-key': ADMIN_KEY } })
  t.equal(revoked.statusCode, 204)
  const at = Date.now()
  for (const stream of [byHeader, byTicket]) {
    t.equal(await within(stream.ended, 5000, 'the stream to end'), true, 'the server ended the stream')
    const last = stream.events.at(-1)!
    t.equal(last.event, 'stream_error')
    t.match(JSON.parse(last.data), { code: 'AUTH_INVALID', message: /revoked/ })
  }
  t.ok(Date.now() - at < 3000, `ended ${Date.now() - at} ms after the revocation`)
  t.equal((await open(streamUrl(mine, `ticket=${unused}`))).status, 401, 'a ticket issued before the revocation opens nothing')
})

t.test('a customer may hold at most maxStreamsPerCustomer streams open: the next gets 429', async (t) => {
  const { alice, bob, project, streamUrl } = await setup(t, { maxStreamsPerCustomer: 2 })
  const mine = await project(alice.key)
  const bobs = await project(bob.key)
  const opened = [await open(streamUrl(mine, 'interval=1000'), { 'x-api-key': alice.key }), await open(streamUrl(mine, 'interval=1000'), { 'x-api-key': alice.key })]
  t.same(opened.map((s) => s.status), [200, 200])
  const third = await fetch(streamUrl(mine, 'interval=1000'), { headers: { 'x-api-key': alice.key } })
  t.equal(third.status, 429)
  t.match(((await third.json()) as any).error, { code: 'RATE_LIMITED', message: /at most 2 live streams/ })
  t.ok(third.headers.get('retry-after'))

  const bobsStream = await open(streamUrl(bobs, 'interval=1000'), { 'x-api-key': bob.key })
  t.equal(bobsStream.status, 200, "another customer's streams do not count")
  bobsStream.close()

  opened[0]!.close()
  const again = await within((async () => {
    for (;;) {
      const s = await open(streamUrl(mine, 'interval=1000'), { 'x-api-key': alice.key })
      if (s.status === 200) return s
      await new Promise((r) => setTimeout(r, 100))
    }
  })(), 5000, 'a slot to free up')
  t.equal(again.status, 200, 'a closed stream frees its slot')
  again.close()
  opened[1]!.close()
})
