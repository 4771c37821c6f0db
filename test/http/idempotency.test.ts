import t from 'tap'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import { buildApp } from '../../src/http/app.js'
import { Projections } from '../../src/projections/projections.js'
import { INTERNAL_TOKEN, multipart, testApp } from '../helpers/app.js'
import { answeringDevice as answering, eventually, SimDevice } from '../helpers/device.js'
import { allEvents } from '../helpers/events.js'
import { denseOnnxModel, mlpOnnxModel } from '../helpers/onnx.js'
import { MLP, trainingBody } from '../helpers/training.js'

const HOUR = 60 * 60 * 1000

// given a running server whose clock the test can move, two customers and a model
const clock = { offset: 0 }
const context = await testApp(t, { rateLimit: { max: 100_000, windowMs: 60_000 }, now: () => new Date(Date.now() + clock.offset) }, { heartbeatIntervalMs: 10_000 }) // the test devices send no heartbeats: they stay connected for the whole file
const { store, database } = context
const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
const alice = await context.customer()
const bob = await context.customer()

interface Answer { status: number; text: string; body: any; replayed: string | null }
async function answer(response: Response): Promise<Answer> {
  const text = await response.text()
  return { status: response.status, text, body: JSON.parse(text), replayed: response.headers.get('idempotent-replayed') }
}
/** A JSON POST, with an Idempotency-Key when `key` is given. */
async function post(route: string, payload: unknown, key?: string, headers: Record<string, string> = {}, apiKey = alice.key): Promise<Answer> {
  const response = await fetch(`${url}/api/v1${route}`, {
    method: 'POST',
    headers: { 'x-api-key': apiKey, 'content-type': 'application/json', ...(key !== undefined ? { 'idempotency-key': key } : {}), ...headers },
    body: JSON.stringify(payload),
  })
  return answer(response)
}
/** A multipart upload (each call its own boundary, as a client's retry would have). */
async function upload(route: string, fields: Record<string, string>, file: { field?: string; name: string; content: Buffer }, key?: string, apiKey = alice.key): Promise<Answer> {
  const form = multipart(fields, file)
  const response = await fetch(`${url}/api/v1${route}`, { method: 'POST', headers: { ...form.headers, 'x-api-key': apiKey, ...(key ? { 'idempotency-key': key } : {}) }, body: form.payload })
  return answer(response)
}
const api = async (route: string) => answer(await fetch(`${url}/api/v1${route}`, { headers: { 'x-api-key': alice.key } }))
const requested = async (customerId = alice.id) => (await allEvents(store)).filter((e) => e.type === 'InferenceRequested' && e.metadata.customerId === customerId).length

const model = await upload('/models', { name: 'classifier' }, { name: 'classifier.onnx', content: denseOnnxModel({ inputs: 10, outputs: 2 }) })
const batch = { model_id: model.body.id, inputs: [1, 2, 3].map((n) => ({ data: Array.from({ length: 10 }, (_, i) => i * n), shape: [1, 10] })) }

const answeringDevice = () => answering(url)

t.test('a retried batch is one job, billed once; a request that failed before creating anything may be retried', async (t) => {
  // no device yet: the first try fails with nothing created, and its key is free again
  const refused = await post('/inference/batch', batch, 'batch-key-1')
  t.equal(refused.status, 503)
  t.equal(refused.body.error.code, 'NO_DEVICES')
  await answeringDevice()
  const first = await post('/inference/batch', batch, 'batch-key-1')
  t.equal(first.status, 202, first.text)
  t.equal(first.replayed, null, 'the first answer is not a replay')
  const retry = await post('/inference/batch', batch, 'batch-key-1')
  t.equal(retry.status, 202)
  t.equal(retry.text, first.text, 'the same answer, byte for byte: the same job_id and project')
  t.equal(retry.replayed, 'true')
  t.equal(await requested(), 1, 'one InferenceRequested in the log')
  await eventually(async () => (await api(`/inference/${first.body.job_id}`)).body.status === 'completed', 20_000, 'the batch to complete')
  const again = await post('/inference/batch', batch, 'batch-key-1')
  t.equal(again.text, first.text, 'after completion too')
  t.equal((await api('/usage')).body.inputs, 3, 'its 3 inputs are billed once')
  t.equal(await requested(), 1)
})

t.test('10 concurrent duplicates create one job', async (t) => {
  const before = await requested()
  const answers = await Promise.all(Array.from({ length: 10 }, () => post('/inference/batch', batch, 'batch-key-2')))
  t.same(answers.map((a) => a.status), Array(10).fill(202))
  t.equal(new Set(answers.map((a) => a.body.job_id)).size, 1, 'one job id')
  t.equal(answers.filter((a) => a.replayed === 'true').length, 9, 'nine replays of the one that ran')
  t.equal(await requested(), before + 1, 'one job in the log')
})

t.test('the same key for another request is 422 IDEMPOTENCY_MISMATCH; another customer’s same key is their own', async (t) => {
  const other = await post('/inference/batch', { ...batch, inputs: batch.inputs.slice(0, 2) }, 'batch-key-2')
  t.equal(other.status, 422)
  t.equal(other.body.error.code, 'IDEMPOTENCY_MISMATCH')
  const elsewhere = await post('/projects', { name: 'p' }, 'batch-key-2')
  t.equal(elsewhere.status, 422)
  t.match(elsewhere.body.error.message, /POST \/api\/v1\/inference\/batch/)
  const first = (await post('/inference/batch', batch, 'batch-key-2')).body.job_id
  // bob has his own model: the same key and (but for the model) body
  const bobModel = await upload('/models', {}, { name: 'm.onnx', content: denseOnnxModel({ inputs: 10, outputs: 2 }) }, undefined, bob.key)
  const bobs = await post('/inference/batch', { ...batch, model_id: bobModel.body.id }, 'batch-key-2', {}, bob.key)
  t.equal(bobs.status, 202, bobs.text)
  t.equal(bobs.replayed, null)
  t.not(bobs.body.job_id, first)
  t.equal(await requested(bob.id), 1)
})

t.test('a synchronous inference replays its result: no second job', async (t) => {
  const before = await requested()
  const body = { model_id: model.body.id, input: batch.inputs[0] }
  const first = await post('/inference', body, 'sync-key')
  t.equal(first.status, 200, first.text)
  t.equal(first.body.status, 'completed')
  const retry = await post('/inference', body, 'sync-key')
  t.equal(retry.text, first.text, 'the same job, result, device and latency')
  t.equal(retry.replayed, 'true')
  t.equal(await requested(), before + 1)
  t.equal((await post('/inference?async=true', body, 'sync-key')).body.error.code, 'IDEMPOTENCY_MISMATCH', 'async is another request')
  t.equal((await post('/inference', body, 'sync-key', { 'x-async': 'true' })).body.error.code, 'IDEMPOTENCY_MISMATCH', 'X-Async too')
  const queued = await post('/inference', { ...body, async: true }, 'async-key')
  t.equal(queued.status, 202)
  t.equal((await post('/inference', { ...body, async: true }, 'async-key')).body.job_id, queued.body.job_id)
})

t.test('a synchronous inference that timed out replays its 504 and job_id; a duplicate sent while the first runs waits for its answer', async (t) => {
  // a cloud device that answers after 300 ms (the requests ask for aws, so only it takes them)
  const slow = await SimDevice.connect(url)
  await slow.register({ instanceType: 'aws', enrollmentToken: (await context.enrollmentToken({ instance_type: 'aws' })).token, sdkUuid: 'sdk-nodejs-slow01' })
  slow.socket.on('message', (raw) => {
    const frame = JSON.parse(raw.toString())
    if (frame.type !== 'task') return
    setTimeout(() => slow.send({ type: 'task_result', task_id: frame.task_id, lease_id: frame.lease_id, status: 'completed', output: { data: [0.5, 0.5], shape: [1, 2] }, metrics: { cpu_ms: 1, gpu_ms: 0, bytes_in: 40, bytes_out: 8 } }), 300)
  })
  const before = await requested()
  const impatient = { model_id: model.body.id, input: batch.inputs[1], options: { instance_type: 'aws', timeout: 50 } }
  const timedOut = await post('/inference', impatient, 'timeout-key')
  t.equal(timedOut.status, 504, timedOut.text)
  t.match(timedOut.body.error, { code: 'TIMEOUT', job_id: /^infer_/ })
  const again = await post('/inference', impatient, 'timeout-key')
  t.equal(again.text, timedOut.text, 'the job it created is named again, not run again')
  t.equal(again.replayed, 'true')
  t.equal(await requested(), before + 1)

  const patient = { ...impatient, options: { instance_type: 'aws', timeout: 10_000 } }
  const [a, b] = await Promise.all([post('/inference', patient, 'wait-key'), post('/inference', patient, 'wait-key')])
  t.equal(a!.status, 200, a!.text)
  t.equal(b!.text, a!.text, 'the duplicate got the first answer')
  t.same([a!.replayed, b!.replayed].sort(), ['true', null].sort())
  t.equal(await requested(), before + 2)
  slow.kill()
})

t.test('a malformed key is a 400', async (t) => {
  for (const key of ['', 'has space', 'x'.repeat(256), 'naïve']) {
    const r = await post('/projects', { name: 'p' }, key)
    t.equal(r.status, 400, JSON.stringify(key))
    t.equal(r.body.error.code, 'VALIDATION_ERROR')
    t.match(r.body.error.message, /Idempotency-Key/)
  }
  t.equal((await post('/projects', { name: 'p' }, 'x'.repeat(255))).status, 201)
})

t.test('models, projects, training and datasets replay their create with the same id', async (t) => {
  const mlp = mlpOnnxModel({ ...MLP, seed: 7 })
  const models = [await upload('/models', { name: 'mlp' }, { name: 'mlp.onnx', content: mlp }, 'model-key'), await upload('/models', { name: 'mlp' }, { name: 'mlp.onnx', content: mlp }, 'model-key')]
  t.equal(models[0]!.status, 201, models[0]!.text)
  t.equal(models[1]!.text, models[0]!.text)
  t.equal(models[1]!.replayed, 'true')
  t.equal((await api('/models')).body.models.filter((m: any) => m.name === 'mlp').length, 1, 'one model')
  const otherFile = await upload('/models', { name: 'mlp' }, { name: 'mlp.onnx', content: mlpOnnxModel({ ...MLP, seed: 8 }) }, 'model-key')
  t.equal(otherFile.status, 422, 'another file is another request')

  const projects = [await post('/projects', { name: 'tracked', type: 'batch' }, 'project-key'), await post('/projects', { type: 'batch', name: 'tracked' }, 'project-key')]
  t.equal(projects[0]!.status, 201)
  t.equal(projects[1]!.body.project_id, projects[0]!.body.project_id, 'keys in another order are the same body')
  t.equal(projects[1]!.text, projects[0]!.text)

  const csv = Buffer.from(['f0,f1,f2,f3,f4,f5,f6,f7,label', ...Array.from({ length: 20 }, (_, i) => `${Array.from({ length: 8 }, (_, j) => (i * j) % 5).join(',')},${i % 4}`)].join('\n'))
  const datasets = [await upload('/datasets', { name: 'd' }, { field: 'file', name: 'd.csv', content: csv }, 'dataset-key'), await upload('/datasets', { name: 'd' }, { field: 'file', name: 'd.csv', content: csv }, 'dataset-key')]
  t.equal(datasets[0]!.status, 201, datasets[0]!.text)
  t.equal(datasets[1]!.text, datasets[0]!.text)
  t.equal((await api('/datasets')).body.total, 1)

  const trainer = await SimDevice.connect(url)
  await trainer.register({ canTrain: true, sdkUuid: 'sdk-nodejs-trainer' })
  const body = trainingBody(models[0]!.body.id, { training: { epochs: 1 } })
  const jobs = [await post('/training', body, 'training-key'), await post('/training', body, 'training-key')]
  t.equal(jobs[0]!.status, 202, jobs[0]!.text)
  t.equal(jobs[1]!.body.job_id, jobs[0]!.body.job_id)
  t.equal(jobs[1]!.replayed, 'true')
  t.equal((await api('/training')).body.total, 1, 'one training job')
  trainer.kill()
})

t.test('after a restart (a new app and store on the same database) the answers replay', async (t) => {
  const restartedStore = new PostgresEventStore(database.pool)
  const projections = new Projections({ db: database.db, store: restartedStore, retryMs: 50 })
  projections.start()
  const restarted = await buildApp({ store: restartedStore, projections, db: database.db, blobs: context.blobs, hub: context.hub, scheduler: context.scheduler, training: context.training, internalToken: INTERNAL_TOKEN, logLevel: 'silent' })
  t.teardown(async () => {
    await restarted.close()
    await projections.stop()
  })
  const before = await requested()
  const first = (await post('/inference/batch', batch, 'batch-key-1')).text
  const replay = await restarted.inject({ method: 'POST', url: '/api/v1/inference/batch', headers: { 'x-api-key': alice.key, 'idempotency-key': 'batch-key-1' }, payload: batch })
  t.equal(replay.statusCode, 202)
  t.equal(replay.body, first)
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.equal(await requested(), before)
})

t.test('a key older than 24 hours is new again', async (t) => {
  const first = await post('/projects', { name: 'daily' }, 'daily-key')
  clock.offset = 23 * HOUR
  t.equal((await post('/projects', { name: 'daily' }, 'daily-key')).text, first.text, 'replayed within the day')
  clock.offset = 24 * HOUR + 60_000
  const fresh = await post('/projects', { name: 'daily' }, 'daily-key')
  t.equal(fresh.status, 201)
  t.equal(fresh.replayed, null)
  t.match(fresh.body.project_id, /^proj_/)
  t.not(fresh.body.project_id, first.body.project_id, 'a new project')
  t.equal((await post('/projects', { name: 'daily' }, 'daily-key')).body.project_id, fresh.body.project_id, 'and the new answer stands for the next day')
  clock.offset = 0
})

t.test('the OpenAPI document names the header on the creates, and only there', async (t) => {
  const doc = (await api('/openapi.json')).body
  const takesKey = (path: string, method: string) => (doc.paths[path][method].parameters ?? []).some((p: { in: string; name: string }) => p.in === 'header' && p.name === 'Idempotency-Key')
  for (const path of ['/api/v1/inference', '/api/v1/inference/batch', '/api/v1/models', '/api/v1/projects', '/api/v1/training', '/api/v1/datasets']) t.ok(takesKey(path, 'post'), path)
  t.notOk(takesKey('/api/v1/projects/{id}/complete', 'post'))
  t.notOk(takesKey('/api/v1/models', 'get'))
  t.match(doc.paths['/api/v1/inference/batch'].post.responses['4XX'].description, /422 IDEMPOTENCY_MISMATCH/)
})
