import t from 'tap'
import { benchmarkStream } from '../../src/domain/benchmark.js'
import { datasetStream } from '../../src/domain/dataset.js'
import { inferenceStream } from '../../src/domain/inference-job.js'
import { modelStream } from '../../src/domain/model.js'
import { projectStream } from '../../src/domain/project.js'
import { trainingStream } from '../../src/domain/training-job.js'
import { multipart, testApp } from '../helpers/app.js'
import { eventually, SimDevice } from '../helpers/device.js'
import { mlpOnnxModel } from '../helpers/onnx.js'

/**
 * Tenancy, route by route: customer B owns one real resource of every kind (a model, a sync, an async
 * and a batch inference job, a project, a training job, a dataset, a quick and a step-load benchmark);
 * customer A calls every route whose path names a resource, with every method and a valid body, and
 * with B's real ids. Every call answers 404, and B reads every resource back unchanged; then B makes the
 * same calls and they work, so A's 404s were the tenancy check and not a state or a body that no one
 * could use.
 */

/** Routes whose path parameter names no tenant's resource, and why. */
const NOT_A_TENANTS_RESOURCE: Record<string, string> = {
  'GET /api/v1/devices/:id': 'devices are the shared fleet, not a customer\'s',
  'GET /api/v1/devices/:id/logs': 'devices are the shared fleet, not a customer\'s',
  'GET /api/v1/efficiency/chart/:type': ':type names a chart',
}

t.test('every route that names a resource refuses another tenant with 404 and changes nothing', async (t) => {
  const { app, store, customer, enrollmentToken } = await testApp(t, { rateLimit: { max: 100_000, windowMs: 60_000 }, minPerfDurationS: 1 }, { leaseTimeoutMs: 60_000, heartbeatIntervalMs: 60_000 })
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  const alice = await customer('Alice')
  const bob = await customer('Bob')
  const as = (who: { key: string }) => async (method: string, route: string, payload?: unknown) => {
    const response = await app.inject({ method: method as 'GET', url: `/api/v1${route}`, headers: { 'x-api-key': who.key }, ...(payload !== undefined ? { payload: payload as object } : {}) })
    return { status: response.statusCode, body: response.body ? response.json() : undefined }
  }
  const asBob = as(bob)
  const asAlice = as(alice)

  // a device that answers inference tasks while `answering`, and holds them (heartbeating its leases) after
  let answering = true
  const runner = await SimDevice.connect(url)
  t.teardown(() => runner.kill())
  await runner.register({ formats: ['onnx'], maxTasks: 4 })
  const held: string[] = []
  runner.socket.on('message', (raw) => {
    const frame = JSON.parse(raw.toString())
    if (frame.type !== 'task') return
    if (!answering) return void held.push(frame.lease_id)
    const rows = frame.inputs?.length ?? 1
    runner.send({ type: 'task_result', task_id: frame.task_id, lease_id: frame.lease_id, status: 'completed', output: { data: Array(rows * 4).fill(0.25), shape: [rows, 4] }, metrics: { cpu_ms: 1, gpu_ms: 0, bytes_in: 1, bytes_out: 1 } })
  })
  // a device that can train, so a training job is admitted; the job wants two, so it waits, queued
  const trainer = await SimDevice.connect(url)
  t.teardown(() => trainer.kill())
  await trainer.register({ formats: ['onnx'], canTrain: true, maxTasks: 1, instanceType: 'aws', enrollmentToken: (await enrollmentToken({ instance_type: 'aws' })).token })

  // 1. Bob's resources, one of each kind
  const upload = multipart({ name: 'bobs-mlp' }, { name: 'mlp.onnx', content: mlpOnnxModel({ inputs: 8, hidden: 16, outputs: 4, seed: 7 }) })
  const modelResponse = await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...upload.headers, 'x-api-key': bob.key }, payload: upload.payload })
  t.equal(modelResponse.statusCode, 201)
  const model = modelResponse.json().id as string
  const csv = ['a,b,c,d,e,f,g,h,label', ...Array.from({ length: 20 }, (_, i) => `${[...Array(8)].map((_, j) => (i * j) % 7).join(',')},${i % 4}`)].join('\n')
  const dataUpload = multipart({ name: 'bobs-data', format: 'csv' }, { field: 'file', name: 'data.csv', content: Buffer.from(csv) })
  const datasetResponse = await app.inject({ method: 'POST', url: '/api/v1/datasets', headers: { ...dataUpload.headers, 'x-api-key': bob.key }, payload: dataUpload.payload })
  t.equal(datasetResponse.statusCode, 201, datasetResponse.body)
  const dataset = datasetResponse.json().id as string
  const project = await asBob('POST', '/projects', { name: 'bobs-project', type: 'batch' })
  t.equal(project.status, 201)
  const idle = await asBob('POST', '/projects', { name: 'bobs-idle-project', type: 'realtime' })
  t.equal(idle.status, 201)
  const input = { data: [1, 2, 3, 4, 5, 6, 7, 8], shape: [1, 8] }
  const sync = await asBob('POST', '/inference', { model_id: model, input })
  t.equal(sync.status, 200, `a sync job, answered: ${JSON.stringify(sync.body)}`)
  const quick = await asBob('POST', '/dashboard/benchmark', { mode: 'inference', requests: 2, concurrency: 1 })
  t.equal(quick.status, 202)
  // a customer runs one benchmark at a time
  await eventually(async () => (await asBob('GET', `/dashboard/benchmark/${quick.body.benchmark_id}`)).body.status !== 'running', 30_000, 'the quick benchmark')
  const perf = await asBob('POST', '/dashboard/benchmark/perf', { duration: 1, rps_steps: [2], max_concurrency: 1, instance_type: 'user' })
  t.equal(perf.status, 202)
  for (const id of [quick.body.benchmark_id, perf.body.benchmark_id]) {
    await eventually(async () => (await asBob('GET', `/dashboard/benchmark/${id}`)).body.status !== 'running', 30_000, `benchmark ${id}`)
  }
  answering = false // from here on, Bob's jobs stay running: there is something to cancel
  const queued = await asBob('POST', '/inference', { model_id: model, input, async: true, project_id: project.body.project_id })
  t.equal(queued.status, 202)
  const batch = await asBob('POST', '/inference/batch', { model_id: model, inputs: [input, input, input], project_id: project.body.project_id })
  t.equal(batch.status, 202)
  const training = await asBob('POST', '/training', {
    model_id: model,
    data_config: { type: 'dataset', dataset_id: dataset, batch_size: 4 },
    training_config: { epochs: 1 },
    resource_config: { min_devices: 2 },
  })
  t.equal(training.status, 202, JSON.stringify(training.body))
  await eventually(async () => held.length >= 2 || undefined, 10_000, 'the running jobs\' tasks held on the device')

  const ids = {
    model,
    dataset,
    project: project.body.project_id as string,
    idle: idle.body.project_id as string,
    sync: sync.body.job_id as string,
    queued: queued.body.job_id as string,
    batch: batch.body.job_id as string,
    training: training.body.job_id as string,
    quick: quick.body.benchmark_id as string,
    perf: perf.body.benchmark_id as string,
  }

  // 2. The matrix: every route with a resource in its path, each with Bob's ids (a route may be tried with several)
  type Call = { method: string; path: string; body?: unknown; ok: number[] }
  const schema = { labels: ['a', 'b', 'c', 'd'] }
  const matrix: Record<string, Call[]> = {
    'GET /api/v1/models/:id': [{ method: 'GET', path: `/models/${ids.model}`, ok: [200] }],
    'PATCH /api/v1/models/:id/schema': [{ method: 'PATCH', path: `/models/${ids.model}/schema`, body: schema, ok: [200] }],
    'GET /api/v1/inference/:jobId': [ids.sync, ids.queued, ids.batch].map((id) => ({ method: 'GET', path: `/inference/${id}`, ok: [200] })),
    'DELETE /api/v1/inference/:jobId': [ids.queued, ids.batch].map((id) => ({ method: 'DELETE', path: `/inference/${id}`, ok: [200] })),
    'GET /api/v1/projects/:id': [ids.project, ids.idle].map((id) => ({ method: 'GET', path: `/projects/${id}`, ok: [200] })),
    'GET /api/v1/projects/:id/analytics': [{ method: 'GET', path: `/projects/${ids.project}/analytics`, ok: [200] }],
    'GET /api/v1/usage/projects/:id': [{ method: 'GET', path: `/usage/projects/${ids.project}`, ok: [200] }],
    'GET /api/v1/dashboard/projects/:id/stream': [], // an SSE stream: Alice's call is below, Bob's would not end
    'POST /api/v1/projects/:id/complete': [{ method: 'POST', path: `/projects/${ids.idle}/complete`, ok: [200] }],
    'POST /api/v1/projects/:id/cancel': [{ method: 'POST', path: `/projects/${ids.project}/cancel`, ok: [200] }],
    'GET /api/v1/training/:jobId': [{ method: 'GET', path: `/training/${ids.training}`, ok: [200] }],
    'GET /api/v1/training/:jobId/rounds': [{ method: 'GET', path: `/training/${ids.training}/rounds`, ok: [200] }],
    'GET /api/v1/efficiency/job/:jobId': [{ method: 'GET', path: `/efficiency/job/${ids.training}`, ok: [200] }],
    'POST /api/v1/training/:jobId/pause': [{ method: 'POST', path: `/training/${ids.training}/pause`, ok: [200] }],
    'POST /api/v1/training/:jobId/resume': [{ method: 'POST', path: `/training/${ids.training}/resume`, ok: [200] }],
    'DELETE /api/v1/training/:jobId': [{ method: 'DELETE', path: `/training/${ids.training}`, ok: [200] }],
    'GET /api/v1/datasets/:id': [{ method: 'GET', path: `/datasets/${ids.dataset}`, ok: [200] }],
    'DELETE /api/v1/datasets/:id': [{ method: 'DELETE', path: `/datasets/${ids.dataset}`, ok: [200, 204] }],
    'GET /api/v1/dashboard/benchmark/:id': [ids.quick, ids.perf].map((id) => ({ method: 'GET', path: `/dashboard/benchmark/${id}`, ok: [200] })),
    'GET /api/v1/dashboard/benchmark/perf/:id': [{ method: 'GET', path: `/dashboard/benchmark/perf/${ids.perf}`, ok: [200] }],
    // deleting the model goes last for Bob: the jobs above use it
    'DELETE /api/v1/models/:id': [{ method: 'DELETE', path: `/models/${ids.model}`, ok: [200, 204] }],
  }
  // 3. A route that names a resource and is in no list fails here: a new route gets a tenancy check by being added above
  await app.ready()
  const named = app.routeTable.filter((r) => r.auth === 'api_key' && /\/:/.test(r.url)).map((r) => `${r.method} ${r.url}`)
  t.ok(named.length >= 20, `${named.length} routes name a resource`)
  for (const route of named) t.ok(route in matrix || route in NOT_A_TENANTS_RESOURCE, `${route} is in the tenancy matrix`)

  // what Bob reads back, and every event on Bob's streams, before Alice tries anything
  const streams = [modelStream(ids.model), datasetStream(ids.dataset), projectStream(ids.project), projectStream(ids.idle), trainingStream(ids.training), benchmarkStream(ids.quick), benchmarkStream(ids.perf), ...[ids.sync, ids.queued, ids.batch].map(inferenceStream)]
  const reads = Object.values(matrix).flat().filter((c) => c.method === 'GET').map((c) => c.path)
  const snapshot = async () => ({
    views: await Promise.all(reads.map(async (path) => [path, (await asBob('GET', path)).body])),
    events: await Promise.all(streams.map(async (s) => [s, (await store.readStream(s)).map((e) => e.type)])),
  })
  const before = await snapshot()
  const aliceEvents = async () => (await store.readAll()).filter((e) => e.metadata.customerId === alice.id).length

  // 4. Alice, with Bob's ids: 404 every time, never a 400 (the bodies are valid) nor a 2xx
  for (const calls of Object.values(matrix)) {
    for (const call of calls) {
      const response = await asAlice(call.method, call.path, call.body)
      t.equal(response.status, 404, `${call.method} ${call.path} as another tenant: ${JSON.stringify(response.body)}`)
      t.equal(response.body?.error?.code, 'NOT_FOUND', `${call.method} ${call.path}: NOT_FOUND`)
    }
  }
  // the stream over a real socket: a stream wrongly opened would never end, so read its status and hang up
  const hangUp = new AbortController()
  const stream = await fetch(`${url}/api/v1/dashboard/projects/${ids.project}/stream`, { headers: { 'x-api-key': alice.key }, signal: hangUp.signal })
  t.equal(stream.status, 404, 'the project stream as another tenant')
  t.equal(stream.status === 404 ? ((await stream.json()) as any).error.code : stream.headers.get('content-type'), 'NOT_FOUND')
  hangUp.abort()
  // bodies that name Bob's resources: his model, his project, his dataset
  const bodies: [string, string, unknown, string][] = [
    ['POST', '/inference', { model_id: ids.model, input }, 'NO_MODEL'],
    ['POST', '/inference', { model_id: ids.model, input, async: true }, 'NO_MODEL'],
    ['POST', '/inference/batch', { model_id: ids.model, inputs: [input] }, 'NO_MODEL'],
    ['POST', '/training', { model_id: ids.model, data_config: { type: 'dataset', dataset_id: ids.dataset, batch_size: 4 }, training_config: { epochs: 1 } }, 'NO_MODEL'],
    ['POST', '/projects', { name: 'mine', type: 'batch', model_id: ids.model }, 'NO_MODEL'],
  ]
  for (const [method, path, body, code] of bodies) {
    const response = await asAlice(method, path, body)
    t.equal(response.status, 404, `${method} ${path} naming Bob's resources: ${JSON.stringify(response.body)}`)
    t.equal(response.body?.error?.code, code)
  }
  // Alice's own model, with Bob's project and dataset
  const hers = multipart({ name: 'alices-mlp' }, { name: 'mlp.onnx', content: mlpOnnxModel({ inputs: 8, hidden: 16, outputs: 4, seed: 8 }) })
  const herModel = (await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...hers.headers, 'x-api-key': alice.key }, payload: hers.payload })).json().id as string
  const eventsOfAlice = await aliceEvents()
  for (const [method, path, body] of [
    ['POST', '/inference', { model_id: herModel, input, async: true, project_id: ids.project }],
    ['POST', '/inference/batch', { model_id: herModel, inputs: [input], project_id: ids.project }],
    ['POST', '/training', { model_id: herModel, data_config: { type: 'dataset', dataset_id: ids.dataset, batch_size: 4 }, training_config: { epochs: 1 } }],
  ] as const) {
    const response = await asAlice(method, path, body)
    t.equal(response.status, 404, `${method} ${path} with her model and Bob's ${'project_id' in body ? 'project' : 'dataset'}: ${JSON.stringify(response.body)}`)
    t.equal(response.body?.error?.code, 'NOT_FOUND')
  }
  t.equal(await aliceEvents(), eventsOfAlice, 'Alice recorded nothing with Bob\'s ids')

  // 5. Bob reads everything back unchanged: no event on his streams, the same views
  t.same(await snapshot(), before, 'Bob\'s resources are as they were')

  // 6. Bob's own calls work: Alice's 404s were not a state or a body that no one could use
  for (const calls of Object.values(matrix)) {
    for (const call of calls) {
      const response = await asBob(call.method, call.path, call.body)
      t.ok(call.ok.includes(response.status), `${call.method} ${call.path} as its owner: ${response.status} ${JSON.stringify(response.body ?? null).slice(0, 200)}`)
    }
  }
})
