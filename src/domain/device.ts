import { z } from 'zod'
import { Capabilities, Hardware, INSTANCE_TYPES, PLATFORMS } from '../protocol/frames.js'
import type { Decider } from './decider.js'
import { DomainError } from './errors.js'

/**
 * A device's life: registered once (with the hash of its SDK token), then connected and disconnected any
 * number of times. Heartbeats are facts with no rule to check and arrive every few seconds, so they go to a
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
  data: DeviceDescription.extend({ token_hash: z.string(), registered_at: z.string() }),
})
const DeviceConnected = z.object({ type: z.literal('DeviceConnected'), data: DeviceDescription.extend({ connected_at: z.string() }) })
const DeviceDisconnected = z.object({
  type: z.literal('DeviceDisconnected'),
  data: z.object({ device_id: z.string(), reason: z.string(), disconnected_at: z.string() }),
})
const DeviceEvent = z.discriminatedUnion('type', [DeviceRegistered, DeviceConnected, DeviceDisconnected])
export type DeviceEvent = z.infer<typeof DeviceEvent>
export const deviceEventTypes = DeviceEvent.options.map((o) => o.shape.type.value)

export const HeartbeatReceived = z.object({
  type: z.literal('HeartbeatReceived'),
  data: z.object({ device_id: z.string(), load: z.number(), memory_used_mb: z.number(), power_watts: z.number(), at: z.string() }),
})
export type HeartbeatReceived = z.infer<typeof HeartbeatReceived>

export type DeviceCommand =
  | { type: 'RegisterDevice'; device: DeviceDescription; tokenHash: string; at: string }
  | { type: 'ConnectDevice'; device: DeviceDescription; tokenHash: string; at: string }
  /** `connectedAt`: the connection it ends; when the device connected again since, there is nothing to record. */
  | { type: 'DisconnectDevice'; reason: string; at: string; connectedAt?: string }

export interface DeviceState {
  deviceId: string
  registered: boolean
  tokenHash: string
  connected: boolean
  /** When its current connection was made. */
  connectedAt?: string
}

export const deviceStream = (deviceId: string) => `device-${deviceId}`
export const heartbeatStream = (deviceId: string) => `heartbeats-${deviceId}`

export const deviceDecider: Decider<DeviceCommand, DeviceEvent, DeviceState> = {
  initialState: () => ({ deviceId: '', registered: false, tokenHash: '', connected: false }),

  evolve(state, event) {
    switch (event.type) {
      case 'DeviceRegistered':
        return { deviceId: event.data.device_id, registered: true, tokenHash: event.data.token_hash, connected: false }
      case 'DeviceConnected':
        return { ...state, connected: true, connectedAt: event.data.connected_at }
      case 'DeviceDisconnected':
        return { ...state, connected: false }
    }
  },

  decide(command, state) {
    switch (command.type) {
      case 'RegisterDevice':
        if (state.registered) throw new DomainError('CONFLICT', `device ${command.device.device_id} is already registered`)
        return [
          { type: 'DeviceRegistered', data: { ...command.device, token_hash: command.tokenHash, registered_at: command.at } },
          { type: 'DeviceConnected', data: { ...command.device, connected_at: command.at } },
        ]
      case 'ConnectDevice':
        // the token proves it is the device that registered: the hub compares hashes of 256-bit secrets
        if (!state.registered || state.tokenHash !== command.tokenHash) throw new DomainError('AUTH_INVALID', 'unknown device or wrong SDK token')
        return [{ type: 'DeviceConnected', data: { ...command.device, connected_at: command.at } }]
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
