import { z } from 'zod'
import type { Decider } from './decider.js'
import { DomainError } from './errors.js'

/**
 * An idempotency key: a customer's promise that requests sent with the same `Idempotency-Key` are one
 * request. Its stream records who claimed the key for which request (a fingerprint of method, route and
 * body), then the first answer, or that the request failed before it created anything (the key is free
 * again). Within IDEMPOTENCY_WINDOW_MS of the claim a repeat gets the recorded answer; after it, the key is
 * new. The stream is named per customer and key (`idempotencyStream`), so another customer's key never meets
 * this one, and its first append expects no stream: of concurrent duplicates, exactly one claims it.
 *
 * What the request creates is named by the claim's `seed` (see `createdId` in src/http/idempotency.ts), and
 * the create appends to that new stream expecting none: two runs of one request can never create two things.
 * A claim left without an outcome past its `runs_until` (the server stopped mid-request) is abandoned: the
 * same request takes it over with the same seed, so a retry finds what the first run created, if it did, and
 * answers from it instead of creating it again. A claim after a release keeps the seed too (for the same
 * request), so a key names one thing within its window whatever happened to the runs before.
 */

/** How long a key stands for its first request: 24 hours from the claim. */
export const IDEMPOTENCY_WINDOW_MS = 24 * 60 * 60 * 1000
/**
 * A claim recorded before claims had `runs_until` is abandoned this long after it was made (longer than any
 * request ran: a synchronous inference waits at most 10 minutes).
 */
export const LEGACY_ABANDONED_AFTER_MS = 15 * 60 * 1000

const KeyClaimed = z.object({
  type: z.literal('IdempotencyKeyClaimed'),
  data: z.object({
    /** This claim, among the key's claims over time (a key is claimed again after a release or the window). */
    claim_id: z.string(),
    customer_id: z.string(),
    /** sha256 of the key: the key itself is the client's and is not stored. */
    key_sha256: z.string(),
    /** sha256 of the request as it matters: method, route, parameters, query and body (or an upload's fields and file). */
    fingerprint: z.string(),
    method: z.string(),
    route: z.string(),
    claimed_at: z.string(),
    /**
     * Names what the request creates (`createdId`): this claim's id, or for a claim that takes over an
     * abandoned or released one of the same request, that one's seed. Absent in older claims: the claim id.
     */
    seed: z.string().optional(),
    /** Past this time with no outcome the claim is abandoned (its server stopped). Absent in older claims: 15 minutes after it. */
    runs_until: z.string().optional(),
  }),
})
const RequestAnswered = z.object({
  type: z.literal('IdempotentRequestAnswered'),
  data: z.object({
    claim_id: z.string(),
    /** The first answer, as sent: a repeat gets the same status and the same bytes. */
    status: z.number().int(),
    content_type: z.string(),
    body: z.string(),
    answered_at: z.string(),
  }),
})
const KeyReleased = z.object({
  type: z.literal('IdempotencyKeyReleased'),
  data: z.object({
    claim_id: z.string(),
    /** The failed answer's status: the request created nothing, so a retry runs it again. */
    status: z.number().int(),
    released_at: z.string(),
  }),
})

const IdempotencyEvent = z.discriminatedUnion('type', [KeyClaimed, RequestAnswered, KeyReleased])
export type IdempotencyEvent = z.infer<typeof IdempotencyEvent>
export type KeyClaim = z.infer<typeof KeyClaimed>['data']
export type RecordedAnswer = z.infer<typeof RequestAnswered>['data']

export type IdempotencyCommand =
  /** The seed is the decider's to give (a new one, or the seed of the claim this one takes over). */
  | { type: 'ClaimKey'; claim: Omit<KeyClaim, 'seed'> }
  | { type: 'AnswerRequest'; answer: RecordedAnswer }
  | { type: 'ReleaseKey'; claimId: string; status: number; at: string }

export interface IdempotencyState {
  /** The latest claim, with its answer once there is one. */
  claim: KeyClaim | undefined
  answer: RecordedAnswer | undefined
  released: boolean
}

/**
 * Where a key stands at a time: new (no claim in the window), released (free again; a claim of the same
 * request keeps the seed), answered (replay the answer), in progress elsewhere (wait), or abandoned (the same
 * request takes the claim over).
 */
export type KeyStanding = 'new' | 'released' | 'answered' | 'in_progress' | 'abandoned'

export function standing(state: IdempotencyState, at: Date): KeyStanding {
  const claim = state.claim
  if (!claim || at.getTime() - Date.parse(claim.claimed_at) >= IDEMPOTENCY_WINDOW_MS) return 'new'
  if (state.released) return 'released'
  if (state.answer) return 'answered'
  return at.getTime() >= runsUntil(claim) ? 'abandoned' : 'in_progress'
}

/** The seed that names what a claim's request creates. */
export const seedOf = (claim: KeyClaim) => claim.seed ?? claim.claim_id

function runsUntil(claim: KeyClaim): number {
  return claim.runs_until !== undefined ? Date.parse(claim.runs_until) : Date.parse(claim.claimed_at) + LEGACY_ABANDONED_AFTER_MS
}

export const idempotencyStream = (customerId: string, keySha256: string) => `idempotency-${customerId}-${keySha256}`

export const idempotencyDecider: Decider<IdempotencyCommand, IdempotencyEvent, IdempotencyState> = {
  initialState: () => ({ claim: undefined, answer: undefined, released: false }),

  evolve(state, event) {
    switch (event.type) {
      case 'IdempotencyKeyClaimed':
        return { claim: event.data, answer: undefined, released: false }
      case 'IdempotentRequestAnswered':
        return { ...state, answer: event.data }
      case 'IdempotencyKeyReleased':
        return { ...state, released: true }
    }
  },

  /**
   * ClaimKey claims a new or released key, and takes over an abandoned claim of the same request (keeping
   * its seed: the retry finds what the first run created); on a key that stands for the same request and is
   * answered or in progress it appends nothing (the caller replays the answer or waits for it); on one that
   * stands for another request it refuses.
   */
  decide(command, state) {
    switch (command.type) {
      case 'ClaimKey': {
        const now = standing(state, new Date(command.claim.claimed_at))
        const claimed = (seed: string): IdempotencyEvent[] => [{ type: 'IdempotencyKeyClaimed', data: { ...command.claim, seed } }]
        if (now === 'new') return claimed(command.claim.claim_id)
        const first = state.claim!
        const same = first.fingerprint === command.claim.fingerprint
        // released: nothing was created (as far as its run knew); another request may have the key
        if (now === 'released') return claimed(same ? seedOf(first) : command.claim.claim_id)
        if (!same) {
          const other = first.method !== command.claim.method || first.route !== command.claim.route ? ` (${first.method} ${first.route})` : ' with another body'
          throw new DomainError('IDEMPOTENCY_MISMATCH', `this Idempotency-Key was used for another request${other} in the last 24 hours; send the same request, or use a new key`)
        }
        return now === 'abandoned' ? claimed(seedOf(first)) : []
      }
      case 'AnswerRequest':
        if (!current(state, command.answer.claim_id)) return []
        return [{ type: 'IdempotentRequestAnswered', data: command.answer }]
      case 'ReleaseKey':
        if (!current(state, command.claimId)) return []
        return [{ type: 'IdempotencyKeyReleased', data: { claim_id: command.claimId, status: command.status, released_at: command.at } }]
      default: {
        const unknown: never = command
        throw new Error(`unknown command ${JSON.stringify(unknown)}`)
      }
    }
  },

  parse: ({ type, data }) => IdempotencyEvent.parse({ type, data }),
}

/** Is this claim the key's latest, still waiting for its outcome? (A claim taken over as abandoned is not.) */
function current(state: IdempotencyState, claimId: string): boolean {
  return state.claim?.claim_id === claimId && !state.answer && !state.released
}
