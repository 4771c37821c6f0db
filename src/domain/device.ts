import { timingSafeEqual } from 'node:crypto'
import { z } from 'zod'
import { Capabilities, Hardware, INSTANCE_TYPES, PLATFORMS } from '../protocol/frames.js'
import type { Decider } from './decider.js'
import { DomainError } from './errors.js'

/**
 * A device's life: registered once (with the hash of its SDK token, the enrollment token it used and the
 * instance type the platform asserts for it), then connected and disconnected any number of times; banned
 * and unbanned, quarantined and released by the platform; cut off for good when its enrollment token is
 * revoked. Heartbeats are facts with no rule to check and arrive every few seconds, so they go to a
 * stream of their own (`heartbeats-<id>`) and this stream stays short enough to fold on every connection.
 */
export const DeviceDescription = z.object({
  device_id: z.string(),
  platform: z.enum(PLATFORMS),
  sdk_version: z.string(),
  sdk_uuid: z.string(),
  instance_type: z.enum(INSTANCE_TYPES),
  hardware: Hardware,
  capabilities: Capabilities,
})
export type DeviceDescription = z.infer<typeof DeviceDescription>

const DeviceRegistered = z.object({
  type: z.literal('DeviceRegistered'),
  /** `instance_type` is the asserted one (its enrollment token's; `user` without one). */
  data: DeviceDescription.extend({ token_hash: z.string(), registered_at: z.string(), enrollment_token_id: z.string().nullable().default(null) }),
})
const DeviceConnected = z.object({ type: z.literal('DeviceConnected'), data: DeviceDescription.extend({ connected_at: z.string() }) })
const DeviceDisconnected = z.object({
  type: z.literal('DeviceDisconnected'),
  data: z.object({ device_id: z.string(), reason: z.string(), disconnected_at: z.string() }),
})
const DeviceBanned = z.object({ type: z.literal('DeviceBanned'), data: z.object({ device_id: z.string(), reason: z.string(), banned_at: z.string() }) })
const DeviceUnbanned = z.object({ type: z.literal('DeviceUnbanned'), data: z.object({ device_id: z.string(), unbanned_at: z.string() }) })
/** Held back by the platform (e.g. its results failed validation): connected, but given no work. */
const DeviceQuarantined = z.object({ type: z.literal('DeviceQuarantined'), data: z.object({ device_id: z.string(), reason: z.string(), at: z.string() }) })
const DeviceReleased = z.object({ type: z.literal('DeviceReleased'), data: z.object({ device_id: z.string(), at: z.string() }) })
/** Its enrollment token was revoked: it may never connect again, and its SDK token stops working. */
const DeviceEnrollmentRevoked = z.object({
  type: z.literal('DeviceEnrollmentRevoked'),
  data: z.object({ device_id: z.string(), token_id: z.string(), revoked_at: z.string() }),
})
const DeviceEvent = z.discriminatedUnion('type', [DeviceRegistered, DeviceConnected, DeviceDisconnected, DeviceBanned, DeviceUnbanned, DeviceQuarantined, DeviceReleased, DeviceEnrollmentRevoked])
export type DeviceEvent = z.infer<typeof DeviceEvent>
export const deviceEventTypes = DeviceEvent.options.map((o) => o.shape.type.value)

export const HeartbeatReceived = z.object({
  type: z.literal('HeartbeatReceived'),
  data: z.object({ device_id: z.string(), load: z.number(), memory_used_mb: z.number(), power_watts: z.number(), at: z.string() }),
})
export type HeartbeatReceived = z.infer<typeof HeartbeatReceived>

export type DeviceCommand =
  /** `device.instance_type` is the asserted type; `enrollmentTokenId` null for the secret or open enrollment. */
  | { type: 'RegisterDevice'; device: DeviceDescription; tokenHash: string; enrollmentTokenId: string | null; at: string }
  /** `device.instance_type` is what the device claims now: it must be the type it was enrolled as. */
  | { type: 'ConnectDevice'; device: DeviceDescription; tokenHash: string; at: string }
  /** `connectedAt`: the connection it ends; when the device connected again since, there is nothing to record. */
  | { type: 'DisconnectDevice'; reason: string; at: string; connectedAt?: string }
  | { type: 'BanDevice'; reason: string; at: string }
  | { type: 'UnbanDevice'; at: string }
  | { type: 'QuarantineDevice'; reason: string; at: string }
  | { type: 'ReleaseDevice'; at: string }
  | { type: 'RevokeEnrollment'; deviceId: string; tokenId: string; at: string }

export interface DeviceState {
  deviceId: string
  registered: boolean
  tokenHash: string
  connected: boolean
  /** When its current connection was made. */
  connectedAt?: string
  /** As recorded at its registration: the platform's word, not the device's. */
  instanceType: 'aws' | 'user'
  enrollmentTokenId: string | null
  banned?: { reason: string; at: string }
  quarantined?: { reason: string; at: string }
  /** Its enrollment token was revoked. */
  revoked: boolean
}

const sameHash = (a: string, b: string) => a.length === b.length && timingSafeEqual(Buffer.from(a), Buffer.from(b))

export const deviceStream = (deviceId: string) => `device-${deviceId}`
export const heartbeatStream = (deviceId: string) => `heartbeats-${deviceId}`

export const deviceDecider: Decider<DeviceCommand, DeviceEvent, DeviceState> = {
  initialState: () => ({ deviceId: '', registered: false, tokenHash: '', connected: false, instanceType: 'user', enrollmentTokenId: null, revoked: false }),

  evolve(state, event) {
    switch (event.type) {
      case 'DeviceRegistered': {
        const d = event.data
        return { ...state, deviceId: d.device_id, registered: true, tokenHash: d.token_hash, connected: false, instanceType: d.instance_type, enrollmentTokenId: d.enrollment_token_id }
      }
      case 'DeviceConnected':
        return { ...state, connected: true, connectedAt: event.data.connected_at }
      case 'DeviceDisconnected':
        return { ...state, connected: false }
      case 'DeviceBanned':
        return { ...state, banned: { reason: event.data.reason, at: event.data.banned_at } }
      case 'DeviceUnbanned': {
        const { banned: _banned, ...rest } = state
        return rest
      }
      case 'DeviceQuarantined':
        return { ...state, quarantined: { reason: event.data.reason, at: event.data.at } }
      case 'DeviceReleased': {
        const { quarantined: _quarantined, ...rest } = state
        return rest
      }
      case 'DeviceEnrollmentRevoked':
        return { ...state, deviceId: event.data.device_id, revoked: true }
    }
  },

  decide(command, state) {
    switch (command.type) {
      case 'RegisterDevice':
        if (state.registered) throw new DomainError('CONFLICT', `device ${command.device.device_id} is already registered`)
        // its enrollment token was revoked while it was enrolling
        if (state.revoked) throw new DomainError('FORBIDDEN', 'the enrollment token was revoked')
        return [
          { type: 'DeviceRegistered', data: { ...command.device, token_hash: command.tokenHash, registered_at: command.at, enrollment_token_id: command.enrollmentTokenId } },
          { type: 'DeviceConnected', data: { ...command.device, connected_at: command.at } },
        ]
      case 'ConnectDevice':
        // the token proves it is the device that registered; hashes of 256-bit secrets, compared in constant time
        if (!state.registered || !sameHash(state.tokenHash, command.tokenHash)) throw new DomainError('AUTH_INVALID', 'unknown device or wrong SDK token')
        // the messages become WebSocket close reasons (at most 123 bytes)
        if (state.revoked) throw new DomainError('FORBIDDEN', 'the enrollment token of this device was revoked')
        if (state.banned) throw new DomainError('FORBIDDEN', `device banned: ${state.banned.reason}`)
        if (command.device.instance_type !== state.instanceType) {
          throw new DomainError('FORBIDDEN', `instance_type ${command.device.instance_type} refused: this device was enrolled as ${state.instanceType}`)
        }
        return [{ type: 'DeviceConnected', data: { ...command.device, instance_type: state.instanceType, connected_at: command.at } }]
      case 'BanDevice':
        if (!state.registered) throw new DomainError('NOT_FOUND', 'device not found')
        if (state.banned) return []
        return [{ type: 'DeviceBanned', data: { device_id: state.deviceId, reason: command.reason, banned_at: command.at } }]
      case 'UnbanDevice':
        if (!state.registered) throw new DomainError('NOT_FOUND', 'device not found')
        if (!state.banned) return []
        return [{ type: 'DeviceUnbanned', data: { device_id: state.deviceId, unbanned_at: command.at } }]
      case 'QuarantineDevice':
        if (!state.registered) throw new DomainError('NOT_FOUND', 'device not found')
        if (state.quarantined) return []
        return [{ type: 'DeviceQuarantined', data: { device_id: state.deviceId, reason: command.reason, at: command.at } }]
      case 'ReleaseDevice':
        if (!state.registered) throw new DomainError('NOT_FOUND', 'device not found')
        if (!state.quarantined) return []
        return [{ type: 'DeviceReleased', data: { device_id: state.deviceId, at: command.at } }]
      case 'RevokeEnrollment':
        // also on a stream not registered yet: a device enrolling while its token is revoked never registers
        if (state.revoked) return []
        return [{ type: 'DeviceEnrollmentRevoked', data: { device_id: command.deviceId, token_id: command.tokenId, revoked_at: command.at } }]
      case 'DisconnectDevice':
        if (!state.connected || (command.connectedAt !== undefined && command.connectedAt !== state.connectedAt)) return []
        return [{ type: 'DeviceDisconnected', data: { device_id: state.deviceId, reason: command.reason, disconnected_at: command.at } }]
      default: {
        const unknown: never = command
        throw new Error(`unknown command ${JSON.stringify(unknown)}`)
      }
    }
  },

  parse: ({ type, data }) => DeviceEvent.parse({ type, data }),
}
