import t, { type Test } from 'tap'
import { CLOSE } from '../../src/protocol/frames.js'
import { ADMIN_KEY, listeningApp, testApp } from '../helpers/app.js'
import { eventually } from '../helpers/device.js'

async function listening(t: Test, options: Parameters<typeof testApp>[2] = {}) {
  const context = await listeningApp(t, { rateLimit: { max: 100_000, windowMs: 60_000 } }, { heartbeatIntervalMs: 60_000, ...options })
  const { url, alice, connect } = context
  const get = async (path: string) => {
    const response = await fetch(`${url}/api/v1${path}`, { headers: { 'x-api-key': alice.key } })
    return { status: response.status, body: (await response.json()) as any }
  }
  const admin = async (method: string, path: string, payload?: unknown) => {
    const response = await context.app.inject({ method: method as 'GET', url: `/api/v1${path}`, headers: { 'x-admin-key': ADMIN_KEY }, ...(payload !== undefined ? { payload: payload as object } : {}) })
    return { status: response.statusCode, body: response.body ? response.json() : undefined, text: response.body }
  }
  return { ...context, url, connect, get, admin }
}

t.test('the platform, not the device, says which devices are aws; a returning device keeps the type it enrolled as', async (t) => {
  const { connect, get, hub, enrollmentToken } = await listening(t)
  // given open (development) enrollment: a user device gets in, a claimed aws one does not
  const claimer = await connect()
  const refused = await claimer.refused({ instanceType: 'aws' })
  t.equal(refused.code, CLOSE.FORBIDDEN)
  t.match(refused.reason, /instance_type aws refused.*aws enrollment token/)
  t.equal(hub.capacity('onnx', 'aws').slots, 0, 'no aws slot: nothing restricted to aws can run on it')

  // an aws token makes an aws device
  const aws = await enrollmentToken({ instance_type: 'aws' })
  const cloud = await connect()
  await cloud.register({ instanceType: 'aws', enrollmentToken: aws.token })
  t.equal(hub.capacity('onnx', 'aws').slots, 1)
  t.match((await get(`/devices/${cloud.deviceId}`)).body, { instance_type: 'aws', enrollment_token_id: aws.id, banned: null, quarantined: null })
  // ...but not one that claims otherwise
  const confused = await connect()
  t.match(await confused.refused({ instanceType: 'user', enrollmentToken: aws.token }), { code: CLOSE.FORBIDDEN, reason: /instance_type user refused: this enrollment token enrolls aws devices/ })
  // a user token cannot make an aws device either
  const user = await enrollmentToken({ instance_type: 'user' })
  const pretender = await connect()
  t.match(await pretender.refused({ instanceType: 'aws', enrollmentToken: user.token }), { code: CLOSE.FORBIDDEN, reason: /enrolls user devices/ })
  const unknown = await connect()
  t.match(await unknown.refused({ enrollmentToken: 'dcp_e_not-a-token' }), { code: CLOSE.UNAUTHORIZED, reason: 'unknown enrollment token' })

  // a user device that comes back claiming aws is refused; as user it is back
  const contributed = await connect()
  await contributed.register()
  contributed.kill()
  await eventually(async () => !hub.isConnected(contributed.deviceId), 5000, 'the device gone')
  const upgrade = await connect()
  t.match(await upgrade.refused({ as: { deviceId: contributed.deviceId, sdkToken: contributed.sdkToken }, instanceType: 'aws' }), { code: CLOSE.FORBIDDEN, reason: /instance_type aws refused: this device was enrolled as user/ })
  const back = await connect()
  await back.register({ as: { deviceId: contributed.deviceId, sdkToken: contributed.sdkToken }, instanceType: 'user' })
  t.equal((await get(`/devices/${contributed.deviceId}`)).body.instance_type, 'user')
  t.equal(hub.capacity('onnx', 'aws').slots, 1, 'still only the enrolled aws device')
})

t.test('enrollment tokens: created (shown once), listed without the secret, limited, expiring, revoked with their devices', async (t) => {
  const { connect, admin, url } = await listening(t)
  // bad bodies and unknown ids, with the error envelope
  t.match(await admin('POST', '/admin/enrollment-tokens', {}), { status: 400, body: { error: { code: 'VALIDATION_ERROR', message: /label/ } } })
  t.match(await admin('POST', '/admin/enrollment-tokens', { label: 'x', instance_type: 'gpu' }), { status: 400, body: { error: { code: 'VALIDATION_ERROR', message: /instance_type/ } } })
  t.match(await admin('POST', '/admin/enrollment-tokens', { label: 'x', max_devices: 0 }), { status: 400, body: { error: { code: 'VALIDATION_ERROR', message: /max_devices/ } } })
  t.match(await admin('POST', '/admin/enrollment-tokens', { label: 'x', expires_at: 'tomorrow' }), { status: 400, body: { error: { code: 'VALIDATION_ERROR', message: /expires_at/ } } })
  t.match(await admin('POST', '/admin/enrollment-tokens', { label: 'x', expires_at: '2001-01-01T00:00:00Z' }), { status: 400, body: { error: { code: 'VALIDATION_ERROR', message: /expires_at: must be in the future/ } } })
  t.match(await admin('DELETE', '/admin/enrollment-tokens/enr_nope'), { status: 404, body: { error: { code: 'NOT_FOUND' } } })
  const anonymous = await fetch(`${url}/api/v1/admin/enrollment-tokens`)
  t.equal(anonymous.status, 401)

  // given a token for one device
  const created = await admin('POST', '/admin/enrollment-tokens', { label: "Bob's lab", max_devices: 1 })
  t.equal(created.status, 201)
  t.match(created.body, { id: /^enr_/, label: "Bob's lab", instance_type: 'user', max_devices: 1, expires_at: null, enrollment_token: /^dcp_e_/ })
  const token = created.body.enrollment_token as string
  const first = await connect()
  await first.register({ enrollmentToken: token })
  const second = await connect()
  t.match(await second.refused({ enrollmentToken: token }), { code: CLOSE.FORBIDDEN, reason: /used up \(max_devices 1\)/ })
  const list = await admin('GET', '/admin/enrollment-tokens')
  t.match(list.body, { total: 1, enrollment_tokens: [{ id: created.body.id, label: "Bob's lab", prefix: token.slice(0, 12), instance_type: 'user', devices: 1, max_devices: 1, revoked: false }] })
  t.notOk(list.text.includes(token.slice(12)), 'the list never holds the secret')
  t.notOk(list.text.includes('hash'), 'nor its hash')

  // an expiring token works until its time
  const soon = await admin('POST', '/admin/enrollment-tokens', { label: 'short', expires_at: new Date(Date.now() + 800).toISOString() })
  const early = await connect()
  await early.register({ enrollmentToken: soon.body.enrollment_token })
  await new Promise((r) => setTimeout(r, 900))
  const late = await connect()
  t.match(await late.refused({ enrollmentToken: soon.body.enrollment_token }), { code: CLOSE.FORBIDDEN, reason: 'the enrollment token expired' })
  // an expired token's devices still come back (it only stops new enrollments)
  early.kill()
  const earlyBack = await connect()
  t.match(await earlyBack.register({ as: { deviceId: early.deviceId, sdkToken: early.sdkToken } }), { device_id: early.deviceId })

  // when the token is revoked, its device is disconnected at once and cannot come back; its SDK token stops working
  const before = await fetch(`${url}/api/v1/sdk/package`, { headers: { 'x-sdk-token': first.sdkToken } })
  await before.arrayBuffer()
  t.equal(before.status, 200, 'the SDK token works before')
  t.equal((await admin('DELETE', `/admin/enrollment-tokens/${created.body.id}`)).status, 204)
  t.match(await first.waitClosed(2000), { code: CLOSE.FORBIDDEN, reason: /revoked/ })
  const sdk = await fetch(`${url}/api/v1/sdk/package`, { headers: { 'x-sdk-token': first.sdkToken } })
  t.equal(sdk.status, 401)
  t.match(await sdk.json(), { error: { code: 'AUTH_INVALID', message: /revoked/ } })
  const returning = await connect()
  t.match(await returning.refused({ as: { deviceId: first.deviceId, sdkToken: first.sdkToken } }), { code: CLOSE.FORBIDDEN, reason: /enrollment token of this device was revoked/ })
  const again = await connect()
  t.match(await again.refused({ enrollmentToken: token }), { code: CLOSE.FORBIDDEN, reason: 'the enrollment token was revoked' })
  t.match((await admin('GET', '/admin/enrollment-tokens')).body.enrollment_tokens[0], { revoked: true, revoked_at: /Z$/ })
  t.equal((await admin('DELETE', `/admin/enrollment-tokens/${created.body.id}`)).status, 204, 'revoking again changes nothing')
})

t.test('production with no enrollment secret refuses devices without an enrollment token, with the reason', async (t) => {
  const { connect, enrollmentToken } = await listening(t, { production: true })
  const open = await connect()
  t.match(await open.refused(), { code: CLOSE.FORBIDDEN, reason: /enrollment closed: this production hub needs an enrollment_token/ })
  const tokened = await connect()
  t.match(await tokened.register({ enrollmentToken: (await enrollmentToken({ instance_type: 'user' })).token }), { type: 'registered' })
})

t.test('the enrollment secret enrolls user devices only', async (t) => {
  const { connect } = await listening(t, { enrollmentSecret: 'let-me-in-please' })
  const aws = await connect()
  t.match(await aws.refused({ instanceType: 'aws', enrollmentSecret: 'let-me-in-please' }), { code: CLOSE.FORBIDDEN, reason: /aws refused/ })
  const user = await connect()
  t.match(await user.register({ enrollmentSecret: 'let-me-in-please' }), { type: 'registered' })
})
