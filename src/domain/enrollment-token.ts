import { timingSafeEqual } from 'node:crypto'
import { z } from 'zod'
import { INSTANCE_TYPES } from '../protocol/frames.js'
import type { Decider } from './decider.js'
import { DomainError } from './errors.js'

/**
 * An enrollment token: what a contributor's devices present to register. The platform, not the device,
 * says what kind of machine a device is: the token's `instance_type` (`aws` only for machines the platform
 * runs) becomes the instance type of every device enrolled with it. Its stream records each enrollment, so
 * `max_devices` holds even when devices enroll at the same moment (the append's expected revision).
 */
const TokenCreated = z.object({
  type: z.literal('EnrollmentTokenCreated'),
  data: z.object({
    token_id: z.string(),
    label: z.string(),
    /** The token's first characters, to recognise it in a list; the token itself is never stored. */
    prefix: z.string(),
    token_hash: z.string(),
    instance_type: z.enum(INSTANCE_TYPES),
    expires_at: z.string().nullable(),
    max_devices: z.number().int().nullable(),
    created_at: z.string(),
  }),
})
const TokenUsed = z.object({
  type: z.literal('EnrollmentTokenUsed'),
  data: z.object({ token_id: z.string(), device_id: z.string(), enrolled_at: z.string() }),
})
const TokenRevoked = z.object({ type: z.literal('EnrollmentTokenRevoked'), data: z.object({ token_id: z.string(), revoked_at: z.string() }) })

const EnrollmentTokenEvent = z.discriminatedUnion('type', [TokenCreated, TokenUsed, TokenRevoked])
export type EnrollmentTokenEvent = z.infer<typeof EnrollmentTokenEvent>
export const enrollmentTokenEventTypes = EnrollmentTokenEvent.options.map((o) => o.shape.type.value)

export type EnrollmentTokenCommand =
  | { type: 'CreateEnrollmentToken'; tokenId: string; label: string; prefix: string; tokenHash: string; instanceType: 'aws' | 'user'; expiresAt: string | null; maxDevices: number | null; at: string }
  /** A device presents the token (`tokenHash`: the SHA-256 of what it sent) claiming `claimedType`. */
  | { type: 'EnrollDevice'; deviceId: string; tokenHash: string; claimedType: 'aws' | 'user'; at: string }
  | { type: 'RevokeEnrollmentToken'; at: string }

export interface EnrollmentTokenState {
  created: boolean
  tokenId: string
  tokenHash: string
  instanceType: 'aws' | 'user'
  expiresAt: string | null
  maxDevices: number | null
  /** Devices enrolled with it, in order. */
  devices: string[]
  revoked: boolean
}

export const enrollmentTokenStream = (tokenId: string) => `enrollment-${tokenId}`

const sameHash = (a: string, b: string) => a.length === b.length && timingSafeEqual(Buffer.from(a), Buffer.from(b))

export const enrollmentTokenDecider: Decider<EnrollmentTokenCommand, EnrollmentTokenEvent, EnrollmentTokenState> = {
  initialState: () => ({ created: false, tokenId: '', tokenHash: '', instanceType: 'user', expiresAt: null, maxDevices: null, devices: [], revoked: false }),

  evolve(state, event) {
    switch (event.type) {
      case 'EnrollmentTokenCreated': {
        const d = event.data
        return { ...state, created: true, tokenId: d.token_id, tokenHash: d.token_hash, instanceType: d.instance_type, expiresAt: d.expires_at, maxDevices: d.max_devices }
      }
      case 'EnrollmentTokenUsed':
        return { ...state, devices: [...state.devices, event.data.device_id] }
      case 'EnrollmentTokenRevoked':
        return { ...state, revoked: true }
    }
  },

  decide(command, state) {
    switch (command.type) {
      case 'CreateEnrollmentToken': {
        if (state.created) throw new DomainError('CONFLICT', `enrollment token ${command.tokenId} exists`)
        const { tokenId, label, prefix, tokenHash, instanceType, expiresAt, maxDevices, at } = command
        return [{ type: 'EnrollmentTokenCreated', data: { token_id: tokenId, label, prefix, token_hash: tokenHash, instance_type: instanceType, expires_at: expiresAt, max_devices: maxDevices, created_at: at } }]
      }
      case 'EnrollDevice':
        // the messages become WebSocket close reasons (at most 123 bytes)
        if (!state.created || !sameHash(state.tokenHash, command.tokenHash)) throw new DomainError('AUTH_INVALID', 'unknown enrollment token')
        if (state.revoked) throw new DomainError('FORBIDDEN', 'the enrollment token was revoked')
        if (state.expiresAt !== null && command.at >= state.expiresAt) throw new DomainError('FORBIDDEN', 'the enrollment token expired')
        if (state.maxDevices !== null && state.devices.length >= state.maxDevices) throw new DomainError('FORBIDDEN', `the enrollment token is used up (max_devices ${state.maxDevices})`)
        if (command.claimedType !== state.instanceType) throw new DomainError('FORBIDDEN', `instance_type ${command.claimedType} refused: this enrollment token enrolls ${state.instanceType} devices`)
        return [{ type: 'EnrollmentTokenUsed', data: { token_id: state.tokenId, device_id: command.deviceId, enrolled_at: command.at } }]
      case 'RevokeEnrollmentToken':
        if (!state.created) throw new DomainError('NOT_FOUND', 'enrollment token not found')
        if (state.revoked) return []
        return [{ type: 'EnrollmentTokenRevoked', data: { token_id: state.tokenId, revoked_at: command.at } }]
      default: {
        const unknown: never = command
        throw new Error(`unknown command ${JSON.stringify(unknown)}`)
      }
    }
  },

  parse: ({ type, data }) => EnrollmentTokenEvent.parse({ type, data }),
}
