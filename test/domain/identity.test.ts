import t from 'tap'
import { type DeviceCommand, type DeviceEvent, deviceDecider } from '../../src/domain/device.js'
import { type EnrollmentTokenCommand, type EnrollmentTokenEvent, enrollmentTokenDecider } from '../../src/domain/enrollment-token.js'

const tokenAfter = (events: EnrollmentTokenEvent[]) => events.reduce(enrollmentTokenDecider.evolve, enrollmentTokenDecider.initialState())
const deviceAfter = (events: DeviceEvent[]) => events.reduce(deviceDecider.evolve, deviceDecider.initialState())
const created = (overrides: Partial<Extract<EnrollmentTokenEvent, { type: 'EnrollmentTokenCreated' }>['data']> = {}): EnrollmentTokenEvent => ({
  type: 'EnrollmentTokenCreated',
  data: { token_id: 'enr_1', label: 'lab', prefix: 'dcp_e_abcdef', token_hash: 'h'.repeat(64), instance_type: 'aws', expires_at: '2026-12-08T00:00:00.000Z', max_devices: 2, created_at: '2026-12-07T00:00:00.000Z', ...overrides },
})
const enroll = (overrides: Partial<Extract<EnrollmentTokenCommand, { type: 'EnrollDevice' }>> = {}): EnrollmentTokenCommand => ({ type: 'EnrollDevice', deviceId: 'dev_a', tokenHash: 'h'.repeat(64), claimedType: 'aws', at: '2026-12-07T12:00:00.000Z', ...overrides })
const used = (deviceId: string): EnrollmentTokenEvent => ({ type: 'EnrollmentTokenUsed', data: { token_id: 'enr_1', device_id: deviceId, enrolled_at: '2026-12-07T01:00:00.000Z' } })

t.test('an enrollment token enrolls devices of its type, until revoked, expired or used up', async (t) => {
  t.same(enrollmentTokenDecider.decide(enroll(), tokenAfter([created()])), [used('dev_a')].map((e) => ({ ...e, data: { ...e.data, enrolled_at: '2026-12-07T12:00:00.000Z' } })))
  t.throws(() => enrollmentTokenDecider.decide(enroll({ tokenHash: 'x'.repeat(64) }), tokenAfter([created()])), { code: 'AUTH_INVALID' })
  t.throws(() => enrollmentTokenDecider.decide(enroll({ claimedType: 'user' }), tokenAfter([created()])), { code: 'FORBIDDEN', message: /enrolls aws devices/ })
  t.throws(() => enrollmentTokenDecider.decide(enroll({ at: '2026-12-08T00:00:00.000Z' }), tokenAfter([created()])), { message: 'the enrollment token expired' })
  t.throws(() => enrollmentTokenDecider.decide(enroll(), tokenAfter([created(), used('dev_x'), used('dev_y')])), { message: /used up/ })
  const revoked: EnrollmentTokenEvent = { type: 'EnrollmentTokenRevoked', data: { token_id: 'enr_1', revoked_at: '2026-12-07T02:00:00.000Z' } }
  t.throws(() => enrollmentTokenDecider.decide(enroll(), tokenAfter([created(), revoked])), { message: 'the enrollment token was revoked' })
  t.same(enrollmentTokenDecider.decide({ type: 'RevokeEnrollmentToken', at: 'now' }, tokenAfter([created(), revoked])), [], 'revoking twice records nothing')
  t.same(tokenAfter([created(), used('dev_x')]).devices, ['dev_x'])
})

const description = { device_id: 'dev_a', platform: 'nodejs' as const, sdk_version: '1', sdk_uuid: 'sdk-nodejs-aaaaaa', instance_type: 'aws' as const, hardware: { cpu_model: 'c', cpu_cores: 1, memory_mb: 1, gpus: [] }, capabilities: { formats: ['onnx' as const], gpu: false, can_train: false, max_concurrent_tasks: 1, max_batch_inputs: 1 } }
const registered: DeviceEvent = { type: 'DeviceRegistered', data: { ...description, token_hash: 't'.repeat(64), registered_at: '2026-12-07T00:00:00.000Z', enrollment_token_id: 'enr_1' } }
const connect = (instanceType: 'aws' | 'user' = 'aws', tokenHash = 't'.repeat(64)): DeviceCommand => ({ type: 'ConnectDevice', device: { ...description, instance_type: instanceType }, tokenHash, at: '2026-12-07T03:00:00.000Z' })

t.test('a returning device: its token, the type it enrolled as, and not while banned or revoked', async (t) => {
  t.match(deviceDecider.decide(connect(), deviceAfter([registered])), [{ type: 'DeviceConnected', data: { instance_type: 'aws' } }])
  t.throws(() => deviceDecider.decide(connect('aws', 'u'.repeat(64)), deviceAfter([registered])), { code: 'AUTH_INVALID' })
  t.throws(() => deviceDecider.decide(connect('aws', 'short'), deviceAfter([registered])), { code: 'AUTH_INVALID' }, 'a hash of another length')
  t.throws(() => deviceDecider.decide(connect('user'), deviceAfter([registered])), { code: 'FORBIDDEN', message: /enrolled as aws/ })
  const banned: DeviceEvent = { type: 'DeviceBanned', data: { device_id: 'dev_a', reason: 'cheating', banned_at: '2026-12-07T01:00:00.000Z' } }
  t.throws(() => deviceDecider.decide(connect(), deviceAfter([registered, banned])), { message: 'device banned: cheating' })
  const unbanned: DeviceEvent = { type: 'DeviceUnbanned', data: { device_id: 'dev_a', unbanned_at: '2026-12-07T02:00:00.000Z' } }
  t.equal(deviceDecider.decide(connect(), deviceAfter([registered, banned, unbanned])).length, 1)
  const revoked: DeviceEvent = { type: 'DeviceEnrollmentRevoked', data: { device_id: 'dev_a', token_id: 'enr_1', revoked_at: '2026-12-07T02:00:00.000Z' } }
  t.throws(() => deviceDecider.decide(connect(), deviceAfter([registered, revoked])), { message: /revoked/ })
  // revoked before it registered (its token revoked while it was enrolling): it never registers
  t.throws(() => deviceDecider.decide({ type: 'RegisterDevice', device: description, tokenHash: 't'.repeat(64), enrollmentTokenId: 'enr_1', at: 'now' }, deviceAfter([revoked])), { code: 'FORBIDDEN' })
})

t.test('quarantine and release are recorded once each', async (t) => {
  const quarantine: DeviceCommand = { type: 'QuarantineDevice', reason: 'bad results', at: '2026-12-07T04:00:00.000Z' }
  const [quarantined] = deviceDecider.decide(quarantine, deviceAfter([registered]))
  t.match(quarantined, { type: 'DeviceQuarantined', data: { device_id: 'dev_a', reason: 'bad results' } })
  t.same(deviceDecider.decide(quarantine, deviceAfter([registered, quarantined!])), [])
  t.match(deviceDecider.decide({ type: 'ReleaseDevice', at: 'later' }, deviceAfter([registered, quarantined!])), [{ type: 'DeviceReleased' }])
  t.same(deviceDecider.decide({ type: 'ReleaseDevice', at: 'later' }, deviceAfter([registered])), [])
  t.throws(() => deviceDecider.decide(quarantine, deviceAfter([])), { code: 'NOT_FOUND' })
})

t.test('a DeviceRegistered recorded before enrollment tokens reads back with none', async (t) => {
  const { enrollment_token_id: _none, ...old } = (registered as Extract<DeviceEvent, { type: 'DeviceRegistered' }>).data
  const parsed = deviceDecider.parse({ type: 'DeviceRegistered', data: old, schemaVersion: 1 })
  t.match(parsed, { type: 'DeviceRegistered', data: { enrollment_token_id: null, instance_type: 'aws' } })
})
