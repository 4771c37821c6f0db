import t from 'tap'
import { testApp } from '../helpers/app.js'
import { eventually } from '../helpers/device.js'

/**
 * A project stream told to end while it reads its figures (the server starts to close during the query)
 * ends then, not after its interval: found by #27 (the shutdown test of test/inference/faults.test.ts
 * waited out a 60 s interval on a loaded machine).
 */
t.test('a live stream ended while it reads its figures ends at once, and the server closes', async (t) => {
  const { app, store, customer } = await testApp(t)
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  const alice = await customer()
  const project = (await app.inject({ method: 'POST', url: '/api/v1/projects', headers: { 'x-api-key': alice.key }, payload: { name: 'live', type: 'realtime' } })).json()
  // the stream's own reads of the log's head (its read-your-writes, before its figures) wait until released
  const head = store.headPosition.bind(store)
  const held: (() => void)[] = []
  store.headPosition = async () => {
    if (new Error().stack?.includes('streamProject')) await new Promise<void>((resolve) => held.push(resolve))
    return head()
  }
  t.teardown(() => {
    store.headPosition = head
    held.forEach((release) => release())
  })
  const stream = await fetch(`${url}/api/v1/dashboard/projects/${project.project_id}/stream?interval=60000`, { headers: { 'x-api-key': alice.key } })
  t.equal(stream.status, 200)
  const text = stream.text()
  // the stream is in its first read; the server starts to close (its live streams are told to end) ...
  await eventually(async () => held.length > 0 || undefined, 10_000, 'the stream to read the head')
  const closing = app.close()
  // ... and the read then finishes
  store.headPosition = head
  held.splice(0).forEach((release) => release())
  const within = <T>(promise: Promise<T>, what: string) => {
    let timer: NodeJS.Timeout | undefined
    return Promise.race([promise, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: not within 10 s`)), 10_000)))]).finally(() => clearTimeout(timer))
  }
  t.match(await within(text, 'the end of the stream'), /event: stats/, 'the stream sent its figures and ended')
  await within(closing, 'the server\'s close')
})
