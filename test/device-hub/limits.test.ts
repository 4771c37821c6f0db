import t from 'tap'
import { heartbeatStream } from '../../src/domain/device.js'
import { STORED_HEARTBEAT_SPACING } from '../../src/device-hub/limits.js'
import { CLOSE, HUB_LIMITS } from '../../src/protocol/frames.js'
import { listeningApp, testApp } from '../helpers/app.js'
import { SimDevice } from '../helpers/device.js'

const INTERVAL = 500

async function listening(t: Parameters<typeof testApp>[0]) {
  const context = await listeningApp(t, { rateLimit: { max: 100_000, windowMs: 60_000 } }, { heartbeatIntervalMs: INTERVAL })
  const { url, alice, connect } = context
  const device = async () => {
    const d = await connect()
    await d.register()
    return d
  }
  const stored = async (deviceId: string) => (await context.store.readStream(heartbeatStream(deviceId))).length
  return { ...context, url, alice, device, stored }
}

t.test('a heartbeat flood is dropped, not stored, and closes the socket; another customer is served meanwhile', async (t) => {
  const { url, alice, device, stored, hub } = await listening(t)
  const flooder = await device()
  const started = Date.now()
  for (let i = 0; i < 5000; i++) flooder.heartbeat()
  // meanwhile another customer's request
  const before = Date.now()
  const response = await fetch(`${url}/api/v1/devices/stats`, { headers: { 'x-api-key': alice.key } })
  t.equal(response.status, 200)
  await response.json()
  const served = Date.now() - before
  t.ok(served < 2000, `served in ${served} ms`)
  const closed = await flooder.waitClosed(5000)
  t.equal(closed.code, CLOSE.RATE_LIMITED)
  t.match(closed.reason, /too many heartbeats/)
  t.ok(hub.droppedHeartbeats >= HUB_LIMITS.droppedHeartbeatsBeforeClose, `counted: ${hub.droppedHeartbeats} dropped`)
  await new Promise((r) => setTimeout(r, 200)) // appends in flight land
  const elapsed = Date.now() - started
  const allowed = Math.ceil(elapsed / (STORED_HEARTBEAT_SPACING * INTERVAL)) + 1
  const events = await stored(flooder.deviceId)
  t.ok(events >= 1 && events <= allowed, `${events} heartbeats stored in ${elapsed} ms (at most ${allowed})`)
  t.notOk(hub.isConnected(flooder.deviceId))
})

t.test('heartbeats within the limit keep the device but are stored about once an interval', async (t) => {
  const { device, stored, hub } = await listening(t)
  const eager = await device()
  const started = Date.now()
  // four per interval, for three intervals: within the limit of five, every one accepted
  for (let i = 0; i < 12; i++) {
    eager.heartbeat()
    await new Promise((r) => setTimeout(r, INTERVAL / 4))
  }
  const elapsed = Date.now() - started
  await new Promise((r) => setTimeout(r, 100))
  t.ok(hub.isConnected(eager.deviceId))
  t.equal(eager.closed, undefined)
  const events = await stored(eager.deviceId)
  t.ok(events >= 2 && events <= Math.ceil(elapsed / (STORED_HEARTBEAT_SPACING * INTERVAL)) + 1, `${events} of 12 stored in ${elapsed} ms`)
})

t.test('a frame flood of any kind closes the socket', async (t) => {
  const { device } = await listening(t)
  const chatty = await device()
  // log frames answering no request: harmless one by one, not by the thousand
  for (let i = 0; i < HUB_LIMITS.maxFramesPerSecond + 200; i++) chatty.send({ type: 'logs', request_id: `r${i}`, lines: [] })
  t.match(await chatty.waitClosed(5000), { code: CLOSE.RATE_LIMITED, reason: /frames in a second/ })
})

t.test('before registering, a socket may send only small frames', async (t) => {
  const { url, device } = await listening(t)
  const stranger = await SimDevice.connect(url)
  t.teardown(() => stranger.kill())
  stranger.send(JSON.stringify({ type: 'register', padding: 'x'.repeat(HUB_LIMITS.maxUnregisteredFrameBytes) }))
  t.match(await stranger.waitClosed(2000), { code: 1009, reason: /before registration are limited to 65536 bytes/ })
  // a registered device may send a large frame (here a malformed one: an error frame, not a close)
  const registered = await device()
  registered.send(JSON.stringify({ type: 'heartbeat', padding: 'x'.repeat(2 * HUB_LIMITS.maxUnregisteredFrameBytes) }))
  registered.heartbeat()
  t.match(await registered.next((f) => f.type === 'error'), { code: 'INVALID_FRAME' })
  t.equal(registered.closed, undefined)
})
