import t from 'tap'
import { dcpIdsIn } from '../../src/http/device-logs.js'
import { ADMIN_KEY, multipart, testApp } from '../helpers/app.js'
import { eventually, SimDevice } from '../helpers/device.js'
import { denseOnnxModel } from '../helpers/onnx.js'

t.test('the ids a log line names', async (t) => {
  t.same(dcpIdsIn('task infer_ab12cd34-0 received (model model_zz99yy88, lease 5f0c)'), ['infer_ab12cd34', 'model_zz99yy88'], 'a task counts as its job')
  t.same(dcpIdsIn('training job train_k2k2k2k2: joining; dataset ds_q1w2e3r4 for proj_a1b2c3d4.'), ['train_k2k2k2k2', 'ds_q1w2e3r4', 'proj_a1b2c3d4'])
  t.same(dcpIdsIn('batch_1765000000000_abc123 and batch_x9x9x9x9-3'), ['batch_1765000000000_abc123', 'batch_x9x9x9x9'])
  t.same(dcpIdsIn('missing model_id; train_error sent; subbatch_abcdefgh'), [], 'words are not ids')
})

t.test('device logs: each customer sees only the lines about its own work; the admin sees every line', async (t) => {
  const { app, customer } = await testApp(t, { rateLimit: { max: 100_000, windowMs: 60_000 } })
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  const alice = await customer('alice')
  const bob = await customer('bob')
  const call = async (headers: Record<string, string>, method: string, path: string, payload?: unknown) => {
    const response = await fetch(`${url}/api/v1${path}`, { method, headers: { ...headers, ...(payload === undefined ? {} : { 'content-type': 'application/json' }) }, ...(payload === undefined ? {} : { body: JSON.stringify(payload) }) })
    return { status: response.status, body: (await response.json()) as any }
  }
  const upload = async (key: string) => {
    const body = multipart({}, { name: 'm.onnx', content: denseOnnxModel() })
    return (await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': key }, payload: body.payload })).json().id as string
  }

  // one device runs a task of each customer's
  const device = await SimDevice.connect(url)
  t.teardown(() => device.kill())
  await device.register({ maxTasks: 2 })
  device.heartbeat()
  const work = async (key: string) => {
    const model = await upload(key)
    const project = (await call({ 'x-api-key': key }, 'POST', '/projects', { name: 'p', type: 'batch' })).body.project_id as string
    const job = await call({ 'x-api-key': key }, 'POST', '/inference', { model_id: model, project_id: project, async: true, input: { data: Array(10).fill(0.5), shape: [1, 10] } })
    t.equal(job.status, 202, JSON.stringify(job.body))
    return { model, project, job: job.body.job_id as string }
  }
  const a = await work(alice.key)
  const b = await work(bob.key)
  const tasks = [await device.next((f) => f.type === 'task'), await device.next((f) => f.type === 'task')]
  const taskOf = (job: string) => tasks.find((f) => f.task_id.startsWith(job))!.task_id as string

  // what the Node SDK logs about them (src/sdk/worker.ts, src/sdk/models.ts), and device-level lines
  const line = (message: string, level = 'info') => ({ ts: '2026-12-07T00:00:00.000Z', level, message })
  const lines = [
    line('connecting to ws://hub'),
    line(`downloading model ${a.model} from ${url}/api/v1/sdk/models/${a.model}`),
    line(`task ${taskOf(a.job)} received (model ${a.model}, lease l1)`),
    line(`task ${taskOf(b.job)} received (model ${b.model}, lease l2)`),
    line(`task ${taskOf(b.job)} failed: bob's secret input shape`, 'warn'),
    line(`project ${a.project} and ${b.project} share this device`),
    line('hub error NOT_FOUND: something about another customer', 'error'),
    line(`task ${taskOf(a.job)} completed (cpu 1.00 ms)`),
    line('unknown job infer_zzzzzzzz-0 finished'),
  ]
  const pull = async (headers: Record<string, string>, path: string) => {
    const pulled = call(headers, 'GET', `${path}?lines=50&timeout=5000`)
    const request = await device.next((f) => f.type === 'logs_request')
    device.send({ type: 'logs', request_id: request.request_id, lines })
    const response = await pulled
    t.equal(response.status, 200, JSON.stringify(response.body))
    return (response.body.lines as { message: string }[]).map((l) => l.message)
  }

  await eventually(async () => (await call({ 'x-api-key': alice.key }, 'GET', `/devices/${device.deviceId}`)).status === 200, 5000, 'the device listed')
  const alices = await pull({ 'x-api-key': alice.key }, `/devices/${device.deviceId}/logs`)
  t.same(alices, [lines[1]!.message, lines[2]!.message, lines[7]!.message], "alice sees the lines about her model and task only")
  const bobs = await pull({ 'x-api-key': bob.key }, `/devices/${device.deviceId}/logs`)
  t.same(bobs, [lines[3]!.message, lines[4]!.message], 'bob sees his own, his error included')
  t.notOk(bobs.some((m) => m.includes(a.job) || m.includes(a.model)), "none of bob's lines name alice's work")
  const all = await pull({ 'x-admin-key': ADMIN_KEY }, `/admin/devices/${device.deviceId}/logs`)
  t.same(all, lines.map((l) => l.message), 'the admin sees every line')

  t.equal((await call({ 'x-api-key': alice.key }, 'GET', `/admin/devices/${device.deviceId}/logs`)).status, 401, 'an API key is not the admin key')
  t.equal((await call({ 'x-admin-key': ADMIN_KEY }, 'GET', '/admin/devices/dev_nope/logs')).status, 404)
})
