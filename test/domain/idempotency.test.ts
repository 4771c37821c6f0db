import t from 'tap'
import { ABANDONED_AFTER_MS, IDEMPOTENCY_WINDOW_MS, idempotencyDecider, type IdempotencyEvent, type KeyClaim, standing } from '../../src/domain/idempotency.js'
import { DomainError } from '../../src/domain/errors.js'

const T0 = Date.parse('2026-12-01T00:00:00.000Z')
const iso = (ms: number) => new Date(T0 + ms).toISOString()
const claim = (overrides: Partial<KeyClaim> = {}): KeyClaim => ({
  claim_id: 'claim_a', customer_id: 'cust_a', key_sha256: 'ab', fingerprint: 'fp1', method: 'POST', route: '/api/v1/inference/batch', claimed_at: iso(0), ...overrides,
})
const answered = { type: 'IdempotentRequestAnswered' as const, data: { claim_id: 'claim_a', status: 202, content_type: 'application/json', body: '{"job_id":"batch_1"}', answered_at: iso(5) } }
const fold = (events: IdempotencyEvent[]) => events.reduce(idempotencyDecider.evolve, idempotencyDecider.initialState())
const decide = (events: IdempotencyEvent[], command: Parameters<typeof idempotencyDecider.decide>[0]) => idempotencyDecider.decide(command, fold(events))

t.test('given no claim, when a request claims the key, then it is claimed', async (t) => {
  t.same(decide([], { type: 'ClaimKey', claim: claim() }), [{ type: 'IdempotencyKeyClaimed', data: claim() }])
})

t.test('given an answered claim, a repeat of the same request appends nothing and finds the answer; another request is refused', async (t) => {
  const history: IdempotencyEvent[] = [{ type: 'IdempotencyKeyClaimed', data: claim() }, answered]
  t.same(decide(history, { type: 'ClaimKey', claim: claim({ claim_id: 'claim_b', claimed_at: iso(60_000) }) }), [])
  t.equal(standing(fold(history), new Date(T0 + 60_000)), 'answered')
  t.same(fold(history).answer, answered.data)
  t.throws(() => decide(history, { type: 'ClaimKey', claim: claim({ claim_id: 'claim_b', fingerprint: 'fp2' }) }), new DomainError('IDEMPOTENCY_MISMATCH', ''))
  t.throws(() => decide(history, { type: 'ClaimKey', claim: claim({ claim_id: 'claim_b', fingerprint: 'fp3', route: '/api/v1/projects' }) }), { code: 'IDEMPOTENCY_MISMATCH', message: /POST \/api\/v1\/inference\/batch/ })
})

t.test('given a claim older than the window, the key is new again, whatever the request', async (t) => {
  const history: IdempotencyEvent[] = [{ type: 'IdempotencyKeyClaimed', data: claim() }, answered]
  const later = claim({ claim_id: 'claim_b', fingerprint: 'fp2', claimed_at: iso(IDEMPOTENCY_WINDOW_MS) })
  t.same(decide(history, { type: 'ClaimKey', claim: later }), [{ type: 'IdempotencyKeyClaimed', data: later }])
  t.equal(fold([...history, { type: 'IdempotencyKeyClaimed', data: later }]).answer, undefined, 'the new claim has no answer yet')
})

t.test('a claim in progress makes a repeat wait; a released or abandoned one frees the key', async (t) => {
  const claimed: IdempotencyEvent[] = [{ type: 'IdempotencyKeyClaimed', data: claim() }]
  t.equal(standing(fold(claimed), new Date(T0 + 1000)), 'in_progress')
  t.same(decide(claimed, { type: 'ClaimKey', claim: claim({ claim_id: 'claim_b', claimed_at: iso(1000) }) }), [])
  t.equal(standing(fold(claimed), new Date(T0 + ABANDONED_AFTER_MS)), 'free', 'abandoned by a server that stopped')
  const released = decide(claimed, { type: 'ReleaseKey', claimId: 'claim_a', status: 503, at: iso(10) })
  t.same(released, [{ type: 'IdempotencyKeyReleased', data: { claim_id: 'claim_a', status: 503, released_at: iso(10) } }])
  t.equal(standing(fold([...claimed, ...released]), new Date(T0 + 20)), 'free')
})

t.test('only the current claim records an outcome, once', async (t) => {
  const claimed: IdempotencyEvent[] = [{ type: 'IdempotencyKeyClaimed', data: claim() }]
  t.same(decide(claimed, { type: 'AnswerRequest', answer: answered.data }), [answered])
  t.same(decide([...claimed, answered], { type: 'AnswerRequest', answer: answered.data }), [], 'answered already')
  t.same(decide(claimed, { type: 'AnswerRequest', answer: { ...answered.data, claim_id: 'claim_old' } }), [], 'a claim taken over as abandoned records nothing')
  t.same(decide([...claimed, answered], { type: 'ReleaseKey', claimId: 'claim_a', status: 500, at: iso(9) }), [])
})

t.test('events read back are checked', async (t) => {
  t.throws(() => idempotencyDecider.parse({ type: 'IdempotencyKeyClaimed', data: { claim_id: 1 }, schemaVersion: 1 }))
  t.same(idempotencyDecider.parse({ type: answered.type, data: answered.data, schemaVersion: 1 }), answered)
})
