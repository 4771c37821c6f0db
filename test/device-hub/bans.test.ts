import t, { type Test } from 'tap'
import { taskStream } from '../../src/domain/task.js'
import { CLOSE } from '../../src/protocol/frames.js'
import { ADMIN_KEY, listeningApp } from '../helpers/app.js'
import { SimDevice } from '../helpers/device.js'

let n = 0
const task = () => ({
  task_id: `task_b${++n}_${Math.random().toString(36).slice(2, 8)}`,
  customer_id: 'cust_test',
  job_id: 'job_test',
  model: { id: 'model_test', format: 'onnx' as const, checksum: 'sha256:00' },
  inputs: [{ data: [1, 2, 3], shape: [1, 3] }],
  prefer_gpu: false,
})

async function setup(t: Test) {
  const context = await listeningApp(t, {}, { heartbeatIntervalMs: 60_000, leaseTimeoutMs: 60_000 })
  const { url, alice, connect } = context
  const device = async (options: Parameters<SimDevice['register']>[0] = {}) => {
    const d = await connect()
    await d.register(options)
    return d
  }
  const admin = async (method: 'POST' | 'DELETE', path: string, payload?: object) => {
    const response = await context.app.inject({ method, url: `/api/v1${path}`, headers: { 'x-admin-key': ADMIN_KEY }, ...(payload ? { payload } : {}) })
    return { status: response.statusCode, body: response.json() }
  }
  const get = async (path: string) => (await context.app.inject({ url: `/api/v1${path}`, headers: { 'x-api-key': alice.key } })).json()
  const types = async (taskId: string) => (await context.store.readStream(taskStream(taskId))).map((e) => e.type)
  return { ...context, url, connect, device, admin, get, types }
}

t.test('a banned device is cut off at once: its tasks return without using attempts, its SDK token and reconnects are refused, until unbanned', async (t) => {
  const { scheduler, device, connect, admin, get, types, url } = await setup(t)
  // given a device holding two tasks (one running, one prefetched)
  const bad = await device({ maxTasks: 1 })
  const specs = [task(), task()]
  for (const spec of specs) await scheduler.submit(spec, { customerId: spec.customer_id })
  await bad.next((f) => f.type === 'task')
  await bad.next((f) => f.type === 'task')

  // when an operator bans it
  t.match(await admin('POST', `/admin/devices/dev_nope/ban`, { reason: 'x' }), { status: 404, body: { error: { code: 'NOT_FOUND' } } })
  t.match(await admin('POST', `/admin/devices/${bad.deviceId}/ban`, {}), { status: 400, body: { error: { code: 'VALIDATION_ERROR', message: /reason/ } } })
  const banned = await admin('POST', `/admin/devices/${bad.deviceId}/ban`, { reason: 'wrong outputs' })
  t.match(banned, { status: 200, body: { id: bad.deviceId, banned: { reason: 'wrong outputs', at: /Z$/ } } })

  // then it is disconnected at once, and both tasks are back in the queue with no attempt used
  t.match(await bad.waitClosed(2000), { code: CLOSE.FORBIDDEN, reason: 'device banned: wrong outputs' })
  for (const spec of specs) t.same(await types(spec.task_id), ['TaskQueued', 'TaskLeased', 'TaskLeaseReturned'], 'returned, no TaskAttemptFailed')
  const good = await device({ maxTasks: 2 })
  const moved = [await good.next((f) => f.type === 'task'), await good.next((f) => f.type === 'task')]
  t.same(moved.map((f) => f.task_id).sort(), specs.map((s) => s.task_id).sort(), 'another device takes them')
  t.match(await get(`/devices/${bad.deviceId}`), { status: 'offline', banned: { reason: 'wrong outputs' } })
  // its SDK token is refused, and it cannot come back
  const download = await fetch(`${url}/api/v1/sdk/package`, { headers: { 'x-sdk-token': bad.sdkToken } })
  t.equal(download.status, 403)
  t.match(await download.json(), { error: { code: 'FORBIDDEN', message: /banned/ } })
  const back = await connect()
  t.match(await back.refused({ as: { deviceId: bad.deviceId, sdkToken: bad.sdkToken } }), { code: CLOSE.FORBIDDEN, reason: 'device banned: wrong outputs' })

  // when the ban is lifted, it may come back
  t.match(await admin('DELETE', `/admin/devices/${bad.deviceId}/ban`), { status: 200, body: { id: bad.deviceId, banned: null } })
  const pardoned = await connect()
  t.match(await pardoned.register({ as: { deviceId: bad.deviceId, sdkToken: bad.sdkToken } }), { device_id: bad.deviceId })
  const pkg = await fetch(`${url}/api/v1/sdk/package`, { headers: { 'x-sdk-token': bad.sdkToken } })
  await pkg.arrayBuffer()
  t.equal(pkg.status, 200, 'its SDK token works again')
})

t.test('a quarantined device gets no tasks while connected, nor after coming back, until released', async (t) => {
  const { scheduler, hub, device, connect, admin, get } = await setup(t)
  const suspect = await device()
  t.equal(await hub.isQuarantined(suspect.deviceId), false)
  await hub.quarantine(suspect.deviceId, 'results failed validation')
  t.equal(await hub.isQuarantined(suspect.deviceId), true)
  t.match(await get(`/devices/${suspect.deviceId}`), { status: 'idle', quarantined: { reason: 'results failed validation', at: /Z$/ } })
  const spec = task()
  await scheduler.submit(spec, { customerId: spec.customer_id })
  await new Promise((r) => setTimeout(r, 300))
  t.notOk(suspect.frames.some((f) => f.type === 'task'), 'no task while quarantined')
  t.equal(hub.utilization().used, 0)

  // it comes back (a new socket): still quarantined
  suspect.kill()
  const back = await connect()
  await back.register({ as: { deviceId: suspect.deviceId, sdkToken: suspect.sdkToken } })
  t.equal(await hub.isQuarantined(suspect.deviceId), true)
  await new Promise((r) => setTimeout(r, 300))
  t.notOk(back.frames.some((f) => f.type === 'task'), 'no task after coming back')

  // released: the queued task goes to it
  t.match(await admin('POST', `/admin/devices/${suspect.deviceId}/release`), { status: 200, body: { id: suspect.deviceId, quarantined: null } })
  t.match(await back.next((f) => f.type === 'task', 5000), { task_id: spec.task_id })
  t.match(await get(`/devices/${suspect.deviceId}`), { quarantined: null })
  t.equal(await hub.isQuarantined(suspect.deviceId), false)
  t.match(await admin('POST', '/admin/devices/dev_nope/release'), { status: 404 })
})
