/**
 * Errors of the event store that a request can cause reach the client as the error contract's 4xx, not a
 * 500: an append larger than the log takes (EventStoreDB's MaxAppendSize) is 413 PAYLOAD_TOO_LARGE.
 */
import Fastify from 'fastify'
import t from 'tap'
import { EventStoreUnavailableError, PayloadTooLargeError } from '../../src/event-store/errors.js'
import { registerErrorContract } from '../../src/http/errors.js'

t.test('an append above the store limit is 413 PAYLOAD_TOO_LARGE', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  registerErrorContract(app)
  app.post('/api/v1/inference', async () => {
    throw new PayloadTooLargeError('job-1', 1_048_576)
  })
  const response = await app.inject({ method: 'POST', url: '/api/v1/inference', payload: { input: [1, 2, 3] } })
  t.equal(response.statusCode, 413)
  t.equal(response.json().error.code, 'PAYLOAD_TOO_LARGE')
  t.match(response.json().error.message, /too large to record.*1048576 bytes/)
})

t.test('an event store that cannot be reached is 503 SERVICE_UNAVAILABLE with Retry-After, not a 500', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  registerErrorContract(app)
  app.post('/api/v1/inference', async () => {
    throw new EventStoreUnavailableError('deadline exceeded')
  })
  const response = await app.inject({ method: 'POST', url: '/api/v1/inference', payload: { input: [1, 2, 3] } })
  t.equal(response.statusCode, 503)
  t.equal(response.headers['retry-after'], '1')
  t.equal(response.json().error.code, 'SERVICE_UNAVAILABLE')
  t.match(response.json().error.message, /event store is unavailable.*deadline exceeded/)
})
