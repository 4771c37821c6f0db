import t from 'tap'
import { IDEMPOTENCY_WINDOW_MS, idempotencyDecider, type IdempotencyEvent, type KeyClaim, LEGACY_ABANDONED_AFTER_MS, seedOf, standing } from '../../src/domain/idempotency.js'
import { DomainError } from '../../src/domain/errors.js'

const T0 = Date.parse('2026-12-01T00:00:00.000Z')
const iso = (ms: number) => new Date(T0 + ms).toISOString()
const claim = (overrides: Partial<KeyClaim> = {}): KeyClaim => ({
  claim_id: 'claim_a', customer_id: 'cust_a', key_sha256: 'ab', fingerprint: 'fp1', method: 'POST', route: '/api/v1/inference/batch', claimed_at: iso(0), runs_until: iso(120_000), ...overrides,
})
/** The claim as recorded: with the seed the decider gave it. */
const seeded = (c: KeyClaim, seed = c.claim_id): KeyClaim => ({ ...c, seed })
const answered = { type: 'IdempotentRequestAnswered' as const, data: { claim_id: 'claim_a', status: 202, content_type: 'application/json', body: '{"job_id":"batch_1"}', answered_at: iso(5) } }
const fold = (events: IdempotencyEvent[]) => events.reduce(idempotencyDecider.evolve, idempotencyDecider.initialState())
const decide = (events: IdempotencyEvent[], command: Parameters<typeof idempotencyDecider.decide>[0]) => idempotencyDecider.decide(command, fold(events))

t.test('given no claim, when a request claims the key, then it is claimed', async (t) => {
  t.same(decide([], { type: 'ClaimKey', claim: claim() }), [{ type: 'IdempotencyKeyClaimed', data: seeded(claim()) }], 'its own id seeds what it creates')
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
  t.same(decide(history, { type: 'ClaimKey', claim: later }), [{ type: 'IdempotencyKeyClaimed', data: seeded(later) }], 'with a new seed: it creates anew')
  t.equal(fold([...history, { type: 'IdempotencyKeyClaimed', data: seeded(later) }]).answer, undefined, 'the new claim has no answer yet')
})

t.test('a claim in progress makes a repeat wait until it runs out; then the same request takes it over with its seed', async (t) => {
  const claimed: IdempotencyEvent[] = [{ type: 'IdempotencyKeyClaimed', data: seeded(claim()) }]
  t.equal(standing(fold(claimed), new Date(T0 + 1000)), 'in_progress')
  t.same(decide(claimed, { type: 'ClaimKey', claim: claim({ claim_id: 'claim_b', claimed_at: iso(1000) }) }), [])
  t.equal(standing(fold(claimed), new Date(T0 + 120_000)), 'abandoned', 'past runs_until: its server stopped')
  const retry = claim({ claim_id: 'claim_b', claimed_at: iso(120_000), runs_until: iso(240_000) })
  t.same(decide(claimed, { type: 'ClaimKey', claim: retry }), [{ type: 'IdempotencyKeyClaimed', data: seeded(retry, 'claim_a') }], 'the retry names what it creates as the first run did')
  t.throws(() => decide(claimed, { type: 'ClaimKey', claim: { ...retry, fingerprint: 'fp2' } }), { code: 'IDEMPOTENCY_MISMATCH' }, 'another request may not take it: the first may have created something')
  const taken: IdempotencyEvent[] = [...claimed, { type: 'IdempotencyKeyClaimed', data: seeded(retry, 'claim_a') }]
  t.same(decide(taken, { type: 'AnswerRequest', answer: answered.data }), [], 'the first run, should it answer after all, records nothing')
  t.equal(standing(fold(taken), new Date(T0 + 130_000)), 'in_progress', 'the retry runs')
})

t.test('a released claim frees the key: the same request keeps the seed, another gets a new one', async (t) => {
  const claimed: IdempotencyEvent[] = [{ type: 'IdempotencyKeyClaimed', data: seeded(claim()) }]
  const released = decide(claimed, { type: 'ReleaseKey', claimId: 'claim_a', status: 503, at: iso(10) })
  t.same(released, [{ type: 'IdempotencyKeyReleased', data: { claim_id: 'claim_a', status: 503, released_at: iso(10) } }])
  const history = [...claimed, ...released]
  t.equal(standing(fold(history), new Date(T0 + 20)), 'released')
  const same = claim({ claim_id: 'claim_b', claimed_at: iso(20) })
  t.same(decide(history, { type: 'ClaimKey', claim: same }), [{ type: 'IdempotencyKeyClaimed', data: seeded(same, 'claim_a') }])
  const other = claim({ claim_id: 'claim_c', fingerprint: 'fp2', claimed_at: iso(20) })
  t.same(decide(history, { type: 'ClaimKey', claim: other }), [{ type: 'IdempotencyKeyClaimed', data: seeded(other) }])
})

t.test('claims recorded before seeds and runs_until: seeded by their own id, abandoned after 15 minutes', async (t) => {
  const { runs_until: _, ...legacy } = claim()
  const state = fold([{ type: 'IdempotencyKeyClaimed', data: legacy }])
  t.equal(seedOf(state.claim!), 'claim_a')
  t.equal(standing(state, new Date(T0 + LEGACY_ABANDONED_AFTER_MS - 1)), 'in_progress')
  t.equal(standing(state, new Date(T0 + LEGACY_ABANDONED_AFTER_MS)), 'abandoned')
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
