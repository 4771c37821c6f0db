import t, { type Test } from 'tap'
import { MAX_FRAME_BYTES } from '../../src/protocol/frames.js'
import { testApp } from '../helpers/app.js'
import { eventually, SimDevice } from '../helpers/device.js'

async function listening(t: Test, heartbeatIntervalMs = 500) {
  const context = await testApp(t, { rateLimit: { max: 100_000, windowMs: 60_000 } }, { heartbeatIntervalMs })
  const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
  const alice = await context.customer()
  const get = async (path: string) => {
    const response = await fetch(`${url}/api/v1${path}`, { headers: { 'x-api-key': alice.key } })
    return { status: response.status, body: (await response.json()) as any }
  }
  return { ...context, url, get }
}

t.test('a device registers, heartbeats, and shows in the read model; its SDK token is a credential', async (t) => {
  const { url, get, enrollmentToken } = await listening(t)
  const device = await SimDevice.connect(url)
  t.teardown(() => device.kill())
  const registered = await device.register({ instanceType: 'aws', enrollmentToken: (await enrollmentToken()).token })
  t.match(registered, { type: 'registered', protocol: 1, device_id: /^dev_/, sdk_token: /^dcp_s_/, heartbeat_interval_ms: 500 })
  device.heartbeat([], 0.4)
  // it keeps heartbeating like a device, so a slow (loaded) run does not see it time out
  const beat = setInterval(() => device.heartbeat([], 0.4), 200)
  t.teardown(() => clearInterval(beat))
  const shown = await eventually(async () => {
    const r = await get(`/devices/${device.deviceId}`)
    return r.status === 200 && r.body.metrics.heartbeats >= 1 ? r.body : undefined
  })
  t.match(shown, { id: device.deviceId, status: 'idle', platform: 'nodejs', instance_type: 'aws', capabilities: { formats: ['onnx'] }, metrics: { load: 0.4, power_watts: 12.5 } })
  t.equal((await get('/devices?status=idle')).body.total, 1)
  t.equal((await get('/devices?status=offline')).body.total, 0)
  t.match((await get('/devices/stats')).body, { total: 1, idle: 1, by_platform: { nodejs: 1 }, connections: 1 })
  t.equal((await get('/devices?status=sleeping')).status, 400)
  t.equal((await get('/devices/dev_nope')).status, 404)
  // the token works for SDK downloads (the package), the API key does not
  const pkg = await fetch(`${url}/api/v1/sdk/package`, { headers: { 'x-sdk-token': device.sdkToken } })
  t.equal(pkg.status, 200)
  t.equal(pkg.headers.get('content-type'), 'application/gzip')
  t.ok((await pkg.arrayBuffer()).byteLength > 1000)
  t.equal((await fetch(`${url}/api/v1/sdk/package`, { headers: { 'x-sdk-token': 'dcp_s_wrong' } })).status, 401)
})

t.test('missed heartbeats mark a device offline; it comes back with the same id; a wrong token is refused', async (t) => {
  const { url, get } = await listening(t)
  const device = await SimDevice.connect(url)
  await device.register()
  const id = device.deviceId
  // no heartbeats: three intervals (500 ms each) later the hub gives up on it
  const closed = await device.waitClosed(5000)
  t.equal(closed.code, 4408)
  await eventually(async () => (await get(`/devices/${id}`)).body.status === 'offline', 5000, 'offline')
  t.equal((await get(`/devices/${id}`)).body.disconnect_reason, 'missed heartbeats')

  const back = await SimDevice.connect(url)
  t.teardown(() => back.kill())
  const again = await back.register({ as: { deviceId: id, sdkToken: device.sdkToken } })
  t.equal(again.device_id, id, 'same id')
  t.notOk(again.sdk_token, 'no new token for a returning device')
  back.heartbeat()
  await eventually(async () => (await get(`/devices/${id}`)).body.status === 'idle', 5000, 'back online')

  const impostor = await SimDevice.connect(url)
  impostor.send({ type: 'register', protocol: 1, platform: 'nodejs', sdk_version: '1', sdk_uuid: 'x', instance_type: 'user', hardware: { cpu_model: 'x', cpu_cores: 1, memory_mb: 1 }, capabilities: { formats: ['onnx'] }, device_id: id, sdk_token: 'dcp_s_stolen' })
  t.equal((await impostor.waitClosed()).code, 4401)
  t.equal((await get('/devices/stats')).body.total, 1, 'no extra device')
})

t.test('a device that reconnects while its disconnect is being recorded stays connected', async (t) => {
  const { url, get, store } = await listening(t, 60_000)
  const device = await SimDevice.connect(url)
  await device.register()
  const id = device.deviceId
  // the disconnect's append is slow (a busy database): the device is back before it lands
  const append = store.append.bind(store)
  let slowed = 0
  let settled = 0
  store.append = async (streamId, events, options) => {
    if (streamId === `device-${id}` && events.some((e) => e.type === 'DeviceDisconnected')) {
      slowed++
      await new Promise((r) => setTimeout(r, 600))
      return append(streamId, events, options).finally(() => settled++)
    }
    return append(streamId, events, options)
  }
  t.teardown(() => {
    store.append = append
  })
  device.kill()
  await eventually(async () => slowed > 0 || undefined, 5000, 'the disconnect is being recorded')
  const back = await SimDevice.connect(url)
  t.teardown(() => back.kill())
  await back.register({ as: { deviceId: id, sdkToken: device.sdkToken } })
  back.heartbeat()
  // every slow disconnect append has settled (written or refused as a conflict): nothing of it is left to land
  await eventually(async () => (settled > 0 && settled === slowed) || undefined, 10_000, 'the slow disconnect to settle')
  const types = (await store.readStream(`device-${id}`)).map((e) => e.type)
  t.equal(types.at(-1), 'DeviceConnected', `the reconnect is the last word (${types.join(', ')})`)
  t.equal((await get(`/devices/${id}`)).body.status, 'idle', 'and the device reads as connected')
})

t.test('a device that heartbeats but answers no ping is dropped; one that answers stays', async (t) => {
  const { url, get } = await listening(t)
  const deaf = await SimDevice.connect(url, { autoPong: false })
  const fine = await SimDevice.connect(url)
  t.teardown(() => (deaf.kill(), fine.kill()))
  await deaf.register()
  await fine.register()
  const beat = setInterval(() => (deaf.heartbeat(), fine.heartbeat()), 200)
  t.teardown(() => clearInterval(beat))
  // three intervals (500 ms each) without a pong: the hub drops the TCP connection, no close frame
  const closed = await deaf.waitClosed(5000)
  t.equal(closed.code, 1006)
  await eventually(async () => (await get(`/devices/${deaf.deviceId}`)).body.disconnect_reason === 'no answer to ping', 5000, 'offline')
  t.equal(fine.closed, undefined, 'the device that answers pings is still connected')
  t.equal((await get(`/devices/${fine.deviceId}`)).body.status, 'idle')
})

t.test('a hub held up for longer than three intervals does not drop the devices it could not hear meanwhile', async (t) => {
  const { url, get } = await listening(t)
  const device = await SimDevice.connect(url)
  t.teardown(() => device.kill())
  await device.register()
  const beat = setInterval(() => device.heartbeat(), 200)
  t.teardown(() => clearInterval(beat))
  let pings = 0
  device.socket.on('ping', () => pings++)
  await eventually(async () => pings >= 2 || undefined, 10_000, 'the hub\'s watch to ping the device')
  // Block this process (the hub's) for 2 s inside a timer: the hub's watch tick runs in the same timers
  // phase right after, before any socket is read. The heartbeats are late because the hub was, not the device.
  await new Promise<void>((resolve) =>
    setTimeout(() => {
      const until = Date.now() + 2000
      while (Date.now() < until);
      resolve()
    }, 0),
  )
  // the watch's ticks after the block either drop the device or ping it: two pings, and it was not dropped
  const before = pings
  await eventually(async () => pings >= before + 2 || device.closed || undefined, 10_000, 'the watch\'s ticks after the block')
  t.equal(device.closed, undefined, 'still connected')
  t.equal((await get(`/devices/${device.deviceId}`)).body.status, 'idle')
})

t.test('bad frames get an error frame or a close, never a crash', async (t) => {
  // a long heartbeat interval: the watchdog (missed heartbeats, unanswered pings) must not close these sockets first
  const { url, get } = await listening(t, 10_000)
  const device = await SimDevice.connect(url)
  device.send('this is not json')
  t.match(await device.next((f) => f.type === 'error'), { code: 'INVALID_FRAME', message: /invalid frame/ })
  device.send({ type: 'heartbeat', load: 0.1, memory_used_mb: 1, power_watts: 1 })
  t.match(await device.next((f) => f.type === 'error'), { code: 'INVALID_FRAME', message: /register before/ })
  await device.register()
  device.send({ type: 'heartbeat', load: 7 })
  t.match(await device.next((f) => f.type === 'error'), { code: 'INVALID_FRAME', message: /load/ })
  device.send({ type: 'heartbeat', load: 0.1, memory_used_mb: 1, power_watts: 1, leases: ['lease\u0000x'] })
  t.match(await device.next((f) => f.type === 'error'), { code: 'INVALID_FRAME', message: 'invalid frame: frame.leases.0: must not contain the NUL character (\\u0000)' })
  device.send({ type: 'task_result', task_id: 'task_x', lease_id: 'lease_x', status: 'completed', output: { data: [1], shape: [1] }, metrics: { cpu_ms: 1, gpu_ms: 0, bytes_in: 1, bytes_out: 1 } })
  t.match(await device.next((f) => f.type === 'error'), { code: 'STALE_LEASE' })
  device.socket.send(Buffer.from([1, 2, 3]), { binary: true })
  t.match(await device.next((f) => f.type === 'error'), { code: 'INVALID_FRAME' })
  for (let i = 0; i < 10; i++) device.send({ type: 'nonsense', i })
  t.equal((await device.waitClosed()).code, 4402, 'too many malformed frames close the socket')

  const oversized = JSON.stringify({ type: 'heartbeat', pad: 'x'.repeat(MAX_FRAME_BYTES + 10) })
  const huge = await SimDevice.connect(url)
  await huge.register()
  huge.send(oversized)
  t.equal((await huge.waitClosed()).code, 1009, 'an oversized frame closes with 1009')

  const fine = await SimDevice.connect(url)
  t.teardown(() => fine.kill())
  await fine.register()
  fine.heartbeat()
  t.equal((await get('/health')).status, 200, 'the server is still up')
  await eventually(async () => (await get(`/devices/${fine.deviceId}`)).status === 200, 5000, 'the good device listed')
})

t.test('log pull round trip, and a device that never answers', async (t) => {
  const { url, get } = await listening(t)
  const device = await SimDevice.connect(url)
  t.teardown(() => device.kill())
  await device.register()
  await eventually(async () => (await get(`/devices/${device.deviceId}`)).status === 200, 5000, 'listed')
  // the admin route: a customer sees only lines naming its own work (test/http/device-logs.test.ts), and this one names none
  const { ADMIN_KEY } = await import('../helpers/app.js')
  const pull = fetch(`${url}/api/v1/admin/devices/${device.deviceId}/logs?lines=2&level=warn&timeout=5000`, { headers: { 'x-admin-key': ADMIN_KEY } }).then(async (r) => ({ status: r.status, body: (await r.json()) as any }))
  const request = await device.next((f) => f.type === 'logs_request')
  t.match(request, { lines: 2, level: 'warn' })
  // log lines are passed on, never stored: even a NUL character goes through
  device.send({ type: 'logs', request_id: request.request_id, lines: [{ ts: '2026-01-01T00:00:00Z', level: 'warn', message: 'disk almost full\u0000' }] })
  const pulled = await pull
  t.equal(pulled.status, 200)
  t.same(pulled.body.lines, [{ ts: '2026-01-01T00:00:00Z', level: 'warn', message: 'disk almost full\u0000' }])

  const silent = await get(`/devices/${device.deviceId}/logs?timeout=300`)
  t.equal(silent.status, 504)
  t.equal(silent.body.error.code, 'TIMEOUT')
  device.kill()
  await eventually(async () => (await get(`/devices/${device.deviceId}`)).body.status === 'offline', 5000, 'offline')
  const offline = await get(`/devices/${device.deviceId}/logs?timeout=300`)
  t.equal(offline.status, 409)
  t.equal(offline.body.error.code, 'DEVICE_OFFLINE')
})

t.test('1,000 simulated devices register and heartbeat; the read model shows them all', async (t) => {
  const { url, get, database } = await listening(t, 60_000)
  const devices: SimDevice[] = []
  t.teardown(() => devices.forEach((d) => d.kill()))
  for (let batch = 0; batch < 10; batch++) {
    const connected = await Promise.all(Array.from({ length: 100 }, () => SimDevice.connect(url)))
    await Promise.all(connected.map((d) => d.register()))
    devices.push(...connected)
  }
  for (const d of devices) d.heartbeat()
  const stats = await eventually(async () => {
    const s = (await get('/devices/stats')).body
    return s.idle === 1000 ? s : undefined
  }, 60_000, 'all 1000 idle')
  t.equal(stats.total, 1000)
  t.equal(stats.connections, 1000)
  t.equal(new Set(devices.map((d) => d.deviceId)).size, 1000, 'distinct ids')
  const listed = await eventually(async () => {
    const r = await get('/devices?limit=1000')
    return r.body.devices.every((d: { metrics: { heartbeats: number } }) => d.metrics.heartbeats >= 1) ? r : undefined
  }, 30_000, 'every heartbeat in the read model')
  t.equal(listed.body.devices.length, 1000)
  const events = await database.pool.query(`select count(*)::int as n from events where type = 'HeartbeatReceived'`)
  t.equal(events.rows[0].n, 1000, 'each heartbeat is an event')
})

t.test('with an enrollment secret, only devices that know it may register', async (t) => {
  const context = await testApp(t, {}, { enrollmentSecret: 'let-me-in-please' })
  const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
  const stranger = await SimDevice.connect(url)
  stranger.send({ type: 'register', protocol: 1, platform: 'nodejs', sdk_version: '1', sdk_uuid: 'x', instance_type: 'user', hardware: { cpu_model: 'x', cpu_cores: 1, memory_mb: 1 }, capabilities: { formats: ['onnx'] } })
  t.equal((await stranger.waitClosed()).code, 4401)
  const wrong = await SimDevice.connect(url)
  wrong.send({ type: 'register', protocol: 1, platform: 'nodejs', sdk_version: '1', sdk_uuid: 'x', instance_type: 'user', hardware: { cpu_model: 'x', cpu_cores: 1, memory_mb: 1 }, capabilities: { formats: ['onnx'] }, enrollment_secret: 'guess' })
  t.equal((await wrong.waitClosed()).code, 4401)
  const member = await SimDevice.connect(url)
  t.teardown(() => member.kill())
  t.match(await member.register({ enrollmentSecret: 'let-me-in-please' }), { type: 'registered', device_id: /^dev_/ })
})

t.test('a device may download only the models it holds a task on', async (t) => {
  const { url, scheduler, customer, app } = await (async () => {
    const context = await testApp(t, {}, { heartbeatIntervalMs: 60_000 })
    return { ...context, url: await context.app.listen({ port: 0, host: '127.0.0.1' }) }
  })()
  const alice = await customer()
  const { multipart } = await import('../helpers/app.js')
  const { denseOnnxModel } = await import('../helpers/onnx.js')
  const bytes = denseOnnxModel()
  const body = multipart({}, { name: 'm.onnx', content: bytes })
  const model = (await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': alice.key }, payload: body.payload })).json()
  const holder = await SimDevice.connect(url)
  t.teardown(() => holder.kill())
  await holder.register()
  const download = (token: string) => fetch(`${url}/api/v1/sdk/models/${model.id}`, { headers: { 'x-sdk-token': token } })
  t.equal((await download(holder.sdkToken)).status, 403, 'no task on it yet')
  await scheduler.submit({ task_id: 'task_dl1', customer_id: alice.id, job_id: 'job_dl', model: { id: model.id, format: 'onnx', checksum: model.checksum }, inputs: [{ data: [0], shape: [1, 1] }], prefer_gpu: false }, { customerId: alice.id })
  await holder.next((f) => f.type === 'task')
  const response = await download(holder.sdkToken)
  t.equal(response.status, 200)
  t.equal(response.headers.get('x-checksum'), model.checksum)
  t.ok(Buffer.from(await response.arrayBuffer()).equals(bytes), 'the file, byte for byte')
  t.equal((await fetch(`${url}/api/v1/sdk/models/${model.id}`, { headers: { 'x-api-key': alice.key } })).status, 401, 'an API key is not an SDK token')
})

t.test('after a restart, devices the read model shows connected are marked offline until they come back', async (t) => {
  const { url, get, hub, projections, store, database } = await listening(t, 60_000)
  const device = await SimDevice.connect(url)
  await device.register()
  await eventually(async () => (await get(`/devices/${device.deviceId}`)).body.status === 'idle', 5000, 'idle')
  await hub.close() // a shutdown records no disconnects (thousands of them would hold it up)
  await device.waitClosed()
  await projections.waitFor(await store.headPosition())
  t.equal((await get(`/devices/${device.deviceId}`)).body.status, 'idle', 'still shown connected')
  const { connectedDevices } = await import('../../src/projections/devices.js')
  const shown = await connectedDevices(database.db)
  t.same(shown, [device.deviceId])
  await hub.markAllOffline(shown)
  await eventually(async () => (await get(`/devices/${device.deviceId}`)).body.status === 'offline', 5000, 'offline')
  t.equal((await get(`/devices/${device.deviceId}`)).body.disconnect_reason, 'server restarted')
})
