import t from 'tap'
import { deviceStream } from '../../src/domain/device.js'
import { testApp } from '../helpers/app.js'
import { eventually, SimDevice } from '../helpers/device.js'

const ANY_TRAINING = { min_devices: 1, max_devices: null, prefer_gpu: false, sdk_types: null, min_sdk_version: null }

for (const returning of [false, true]) {
  const what = returning ? 'ConnectDevice' : 'RegisterDevice'
  t.test(`a socket that closes while its ${what} is written is not registered: the disconnect is recorded, no slot, no training`, async (t) => {
    const context = await testApp(t, { rateLimit: { max: 100_000, windowMs: 60_000 } }, { heartbeatIntervalMs: 60_000 }) // no watchdog in the test: the hub must see the close itself
    const { store, hub, training } = context
    const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
    const alice = await context.customer()
    let as: { deviceId: string; sdkToken: string } | undefined
    if (returning) {
      const first = await SimDevice.connect(url)
      await first.register({ canTrain: true })
      as = { deviceId: first.deviceId!, sdkToken: first.sdkToken! }
      first.kill()
      await eventually(async () => (await store.readStream(deviceStream(as!.deviceId))).at(-1)?.type === 'DeviceDisconnected' || undefined, 5000, 'the first connection ended')
    }

    const device = await SimDevice.connect(url)
    // the append that lets it in is slow (a busy database): the socket is gone before it lands
    const append = store.append.bind(store)
    let recorded!: (deviceId: string) => void
    const registration = new Promise<string>((resolve) => (recorded = resolve))
    let dropped = false
    store.append = async (streamId, events, options) => {
      if (dropped || !events.some((e) => e.type === 'DeviceRegistered' || e.type === 'DeviceConnected')) return append(streamId, events, options)
      dropped = true
      device.kill()
      await new Promise((r) => setTimeout(r, 300)) // its close is handled meanwhile
      const result = await append(streamId, events, options)
      recorded(streamId.replace(/^device-/, ''))
      return result
    }
    t.teardown(() => {
      store.append = append
    })
    device.sendRegister({ canTrain: true, ...(as ? { as } : {}) })
    const deviceId = await registration
    if (as) t.equal(deviceId, as.deviceId, 'it came back as itself')
    const last = await eventually(async () => {
      const events = await store.readStream(deviceStream(deviceId))
      return events.at(-1)?.type === 'DeviceDisconnected' && events.at(-2)?.type === 'DeviceConnected' ? events.at(-1) : undefined
    }, 5000, 'the disconnect recorded after the connection')
    t.match(last?.data, { device_id: deviceId, reason: 'socket closed' })
    t.notOk(hub.isConnected(deviceId), 'not a connected device')
    t.equal(hub.capacity('onnx').slots, 0, 'no slot for the scheduler')
    t.equal(training.eligibleDevices(ANY_TRAINING), 0, 'not offered to training')
    const response = await fetch(`${url}/api/v1/devices/${deviceId}`, { headers: { 'x-api-key': alice.key } })
    t.equal(((await response.json()) as { status: string }).status, 'offline')
  })
}

t.test('a registration that fails after the device was recorded connected records its disconnect and closes the socket', async (t) => {
  const context = await testApp(t, { rateLimit: { max: 100_000, windowMs: 60_000 } }, { heartbeatIntervalMs: 60_000 })
  const { store, hub, projections } = context
  const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
  // the read models do not catch up in time for the new device's token
  const waitFor = projections.waitFor.bind(projections)
  let failures = 1
  projections.waitFor = async (position, timeoutMs) => {
    if (failures-- > 0) throw new Error('the read models are behind')
    return waitFor(position, timeoutMs)
  }
  t.teardown(() => {
    projections.waitFor = waitFor
  })
  const device = await SimDevice.connect(url)
  const closed = await device.refused({ canTrain: true })
  t.match(closed, { code: 1011, reason: /registration failed/ })
  const registered = (await store.readAll()).filter((e) => e.type === 'DeviceRegistered')
  t.equal(registered.length, 1)
  const deviceId = registered[0]!.streamId.replace(/^device-/, '')
  const last = await eventually(async () => {
    const events = await store.readStream(deviceStream(deviceId))
    return events.at(-1)?.type === 'DeviceDisconnected' ? events.at(-1) : undefined
  }, 5000, 'the disconnect recorded')
  t.match(last?.data, { reason: 'registration failed: the read models are behind' })
  t.notOk(hub.isConnected(deviceId))
  // it comes again, and is let in
  const again = await SimDevice.connect(url)
  t.teardown(() => again.kill())
  t.match(await again.register({ canTrain: true }), { type: 'registered' })
})
