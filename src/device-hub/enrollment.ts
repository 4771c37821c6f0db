import { handleCommand } from '../commands/handle-command.js'
import { deviceDecider, type DeviceDescription, deviceStream } from '../domain/device.js'
import { enrollmentTokenDecider, enrollmentTokenStream } from '../domain/enrollment-token.js'
import { DomainError } from '../domain/errors.js'
import type { EventStore, Position } from '../event-store/port.js'
import { sameSecret, sha256 } from '../http/auth.js'
import type { DeviceFrame } from '../protocol/frames.js'

type Register = Extract<DeviceFrame, { type: 'register' }>

export interface EnrollmentPolicy {
  store: EventStore
  /** ENROLLMENT_SECRET: a shortcut that enrolls `user` devices. */
  enrollmentSecret?: string | undefined
  /** Production: without a secret, a new device needs an enrollment token (no open enrollment). */
  production?: boolean | undefined
  /** The id of the enrollment token whose secret hashes to this (the enrollment_tokens read model). */
  findEnrollmentToken?: ((tokenHash: string) => Promise<string | undefined>) | undefined
}

/** Who a device is once the hub let it in: what the platform asserts, not what it claimed. */
export interface Admitted {
  deviceId: string
  /** A new device's SDK token (sent once). */
  sdkToken?: string
  instanceType: 'aws' | 'user'
  /** Who runs it: its enrollment token (one per contributor), or the device itself without one. Validation's replicas go to another. */
  contributor: string
  quarantined: boolean
  position: Position
}

/**
 * A new device: its instance type is its enrollment token's (`user` with the secret or open enrollment);
 * a claim that disagrees is refused. Refusals are DomainErrors (AUTH_INVALID: unknown credentials; FORBIDDEN:
 * known, not allowed) whose messages become close reasons.
 */
export async function enrollDevice(policy: EnrollmentPolicy, frame: Register, describe: (deviceId: string, instanceType: 'aws' | 'user') => DeviceDescription, ids: { deviceId: string; sdkToken: string; at: string }): Promise<Admitted> {
  const { deviceId, sdkToken, at } = ids
  let instanceType: 'aws' | 'user' = 'user'
  let enrollmentTokenId: string | null = null
  if (frame.enrollment_token !== undefined) {
    // 1. the token's own stream decides: revoked, expired, used up, or the claim disagrees
    const tokenHash = sha256(frame.enrollment_token)
    const tokenId = await policy.findEnrollmentToken?.(tokenHash)
    if (!tokenId) throw new DomainError('AUTH_INVALID', 'unknown enrollment token')
    const used = await handleCommand(policy.store, enrollmentTokenStream(tokenId), enrollmentTokenDecider, { type: 'EnrollDevice', deviceId, tokenHash, claimedType: frame.instance_type, at }, { metadata: { occurredAt: at } })
    instanceType = used.state.instanceType
    enrollmentTokenId = tokenId
  } else {
    // 2. without a token: `user` only, with the secret when one is set; none in production refuses everyone
    if (frame.instance_type !== 'user') throw new DomainError('FORBIDDEN', `instance_type ${frame.instance_type} refused: only an ${frame.instance_type} enrollment token enrolls one`)
    if (policy.enrollmentSecret) {
      if (!(frame.enrollment_secret && sameSecret(frame.enrollment_secret, policy.enrollmentSecret))) throw new DomainError('AUTH_INVALID', 'enrollment secret missing or wrong')
    } else if (policy.production) {
      throw new DomainError('FORBIDDEN', 'enrollment closed: this production hub needs an enrollment_token (no ENROLLMENT_SECRET is set)')
    }
  }
  // 3. the device's stream records who it is
  const registered = await handleCommand(policy.store, deviceStream(deviceId), deviceDecider, { type: 'RegisterDevice', device: describe(deviceId, instanceType), tokenHash: sha256(sdkToken), enrollmentTokenId, at }, { metadata: { occurredAt: at } })
  return { deviceId, sdkToken, instanceType, contributor: enrollmentTokenId ?? deviceId, quarantined: false, position: registered.position }
}

/** A returning device: its SDK token, not banned or revoked, and the instance type it was enrolled as. */
export async function reconnectDevice(policy: EnrollmentPolicy, frame: Register, describe: (deviceId: string, instanceType: 'aws' | 'user') => DeviceDescription, at: string): Promise<Admitted> {
  const deviceId = frame.device_id!
  try {
    const result = await handleCommand(policy.store, deviceStream(deviceId), deviceDecider, { type: 'ConnectDevice', device: describe(deviceId, frame.instance_type), tokenHash: sha256(frame.sdk_token!), at }, { metadata: { occurredAt: at } })
    return { deviceId, instanceType: result.state.instanceType, contributor: result.state.enrollmentTokenId ?? deviceId, quarantined: result.state.quarantined !== undefined, position: result.position }
  } catch (error) {
    if (error instanceof DomainError && error.code === 'AUTH_INVALID') throw new DomainError('AUTH_INVALID', 'wrong SDK token for this device')
    throw error
  }
}
