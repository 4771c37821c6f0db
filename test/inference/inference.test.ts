import t, { type Test } from 'tap'
import { eventually, SimDevice } from '../helpers/device.js'
import { close, inferenceSetup, input } from '../helpers/inference.js'
import { multipart } from '../helpers/app.js'
import { denseOnnxModel } from '../helpers/onnx.js'

async function setup(t: Test, options: { workers?: number; uploadSchema?: Record<string, unknown> } = {}) {
  return inferenceSetup(t, { workers: options.workers, modelFields: options.uploadSchema ? { input_schema: JSON.stringify(options.uploadSchema) } : {} })
}

t.test("the spec's Example 1: upload, then synchronous inference on a real worker equals onnxruntime", async (t) => {
  const { api, model, direct } = await setup(t, { workers: 2 })
  const data = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
  const response = await api('POST', '/inference', { model_id: model.id, input: { data, shape: [1, 10] } })
  t.equal(response.status, 200, JSON.stringify(response.body))
  t.match(response.body, { job_id: /^infer_/, status: 'completed', result: { shape: [1, 2] }, latency_ms: Number, device_id: /^dev_/ })
  t.ok(close(response.body.result.data, await direct(data)), 'same as a direct onnxruntime run')
  const job = await api('GET', `/inference/${response.body.job_id}`)
  t.match(job.body, { status: 'completed', result: { data: response.body.result.data } })
})

t.test('async: 202 with a poll URL, polled to completion (query, header and body all switch it on)', async (t) => {
  const { api, model, direct } = await setup(t, { workers: 1 })
  const ways: [Record<string, unknown>, string, Record<string, string>][] = [
    [{ async: true }, '', {}],
    [{}, '?async=true', {}],
    [{}, '', { 'x-async': 'true' }],
  ]
  for (const [extra, query, headers] of ways) {
    const data = input(Object.keys(headers).length + query.length)
    const queued = await api('POST', `/inference${query}`, { model_id: model.id, input: { data, shape: [1, 10] }, ...extra }, headers)
    t.equal(queued.status, 202, JSON.stringify(queued.body))
    t.match(queued.body, { status: 'queued', message: 'Inference job queued', poll_url: `/api/v1/inference/${queued.body.job_id}` })
    const done = await eventually(async () => {
      const r = await api('GET', `/inference/${queued.body.job_id}`)
      return r.body.status === 'completed' ? r.body : undefined
    }, 20_000, 'completion')
    t.ok(close(done.result.data, await direct(data)))
  }
})

t.test('batch: every result exactly once, in order, paginated', async (t) => {
  const { api, model, direct } = await setup(t, { workers: 2 })
  const inputs = Array.from({ length: 60 }, (_, i) => ({ data: input(i), shape: [1, 10] }))
  const queued = await api('POST', '/inference/batch', { model_id: model.id, inputs, name: 'sixty' })
  t.equal(queued.status, 202)
  t.match(queued.body, { job_id: /^batch_/, project_id: /^batch_\d+$/, status: 'queued', total_tasks: 60 })
  const done = await eventually(async () => {
    const r = await api('GET', `/inference/${queued.body.job_id}?limit=100`)
    return r.body.status === 'completed' ? r.body : undefined
  }, 60_000, 'batch completion')
  t.match(done.progress, { completed: 60, failed: 0, pending: 0, percent_complete: 100 })
  t.same(done.results.map((r: { index: number }) => r.index), [...Array(60).keys()])
  let same = 0
  for (const r of done.results) if (close(r.result.data, await direct(input(r.index)))) same++
  t.equal(same, 60, 'every result equals onnxruntime on its input')
  const page = await api('GET', `/inference/${queued.body.job_id}?limit=10&offset=50`)
  t.same(page.body.results.map((r: { index: number }) => r.index), [50, 51, 52, 53, 54, 55, 56, 57, 58, 59])
  const again = await api('DELETE', `/inference/${queued.body.job_id}`)
  t.equal(again.status, 409)
  t.equal(again.body.error.code, 'CANNOT_CANCEL')
})

t.test('bad requests: no devices, wrong shape, schema violation, unknown model, sync timeout, cancel', async (t) => {
  const { api, model, url, app, alice } = await setup(t, { uploadSchema: { type: 'object', properties: { data: { type: 'array', items: { type: 'number', minimum: 0 } } } } })
  const good = { model_id: model.id, input: { data: input(1), shape: [1, 10] } }
  const none = await api('POST', '/inference', good)
  t.equal(none.status, 503)
  t.equal(none.body.error.code, 'NO_DEVICES')
  const device = await SimDevice.connect(url) // a device that takes tasks and never answers
  t.teardown(() => device.kill())
  await device.register()
  const shape = await api('POST', '/inference', { model_id: model.id, input: { data: input(1), shape: [1, 5, 2] } })
  t.equal(shape.status, 400)
  t.match(shape.body.error.message, /input\.shape: \[1,5,2\] does not match the model's input shape \[-1,10\]/)
  const short = await api('POST', '/inference', { model_id: model.id, input: { data: [1, 2], shape: [1, 10] } })
  t.match(short.body.error.message, /input\.data: 2 values do not fill shape/)
  const negative = await api('POST', '/inference', { model_id: model.id, input: { data: [-1, ...input(1).slice(1)], shape: [1, 10] } })
  t.equal(negative.status, 400)
  t.match(negative.body.error.message, /input\.data\.0: must be >= 0/)
  const unknown = await api('POST', '/inference', { model_id: 'model_nope', input: good.input })
  t.equal(unknown.status, 404)
  t.equal(unknown.body.error.code, 'NO_MODEL')
  const missing = await api('POST', '/inference', { input: good.input })
  t.equal(missing.status, 400)
  t.match(missing.body.error.message, /body\.model_id/)

  const slow = await api('POST', '/inference', { ...good, options: { timeout: 300 } })
  t.equal(slow.status, 504)
  t.equal(slow.body.error.code, 'TIMEOUT')
  t.match(slow.body.error.message, /poll \/api\/v1\/inference\/infer_/)
  const jobId = /inference\/(infer_\w+)/.exec(slow.body.error.message)![1]!
  const leased = await device.next((f) => f.type === 'task')
  const cancelled = await api('DELETE', `/inference/${jobId}`)
  t.equal(cancelled.status, 200)
  t.match(await device.next((f) => f.type === 'cancel_task'), { task_id: leased.task_id, lease_id: leased.lease_id }, 'the device is told to drop it')
  t.match(cancelled.body, { job_id: jobId, status: 'cancelled', cancelled_tasks: 1 })
  await eventually(async () => (await api('GET', `/inference/${jobId}`)).body.status === 'cancelled', 5000, 'cancelled')
  const other = await (await testAppCustomer(app, alice.id)).status
  t.equal(other, 404, "another customer cannot see the job")
  async function testAppCustomer(app: import('fastify').FastifyInstance, _owner: string) {
    const { ADMIN_KEY } = await import('../helpers/app.js')
    const created = (await app.inject({ method: 'POST', url: '/api/v1/admin/customers', headers: { 'x-admin-key': ADMIN_KEY }, payload: { name: 'bob' } })).json()
    const response = await fetch(`${url}/api/v1/inference/${jobId}`, { headers: { 'x-api-key': created.api_key } })
    return { status: response.status }
  }
})

t.test("a result that does not fit the model's declared output fails the attempt, and in the end the request", async (t) => {
  const { api, model, url } = await setup(t)
  const device = await SimDevice.connect(url)
  t.teardown(() => device.kill())
  await device.register()
  let answered = 0
  device.socket.on('message', (raw) => {
    const frame = JSON.parse(raw.toString())
    if (frame.type !== 'task') return
    answered++
    // three values where the model declares two
    device.send({ type: 'task_result', task_id: frame.task_id, lease_id: frame.lease_id, status: 'completed', output: { data: [0.1, 0.2, 0.7], shape: [1, 3] }, metrics: { cpu_ms: 1, gpu_ms: 0, bytes_in: 40, bytes_out: 12 } })
  })
  const response = await api('POST', '/inference', { model_id: model.id, input: { data: input(1), shape: [1, 10] } })
  t.equal(response.status, 422)
  t.equal(response.body.error.code, 'INFERENCE_FAILED')
  t.match(response.body.error.message, /failed after 3 attempts; last: output 0: shape \[1,3\] does not match the model's declared output shape \[-1,2\]/)
  t.equal(answered, 3, 'each attempt was refused and the task re-queued')
})

t.test('the queue is bounded: past MAX_QUEUED_INPUTS new work is refused until it drains', async (t) => {
  // no prefetch: the device holds exactly the one task it runs, so what waits is in the scheduler's queue
  const { api, model, url } = await inferenceSetup(t, { prefetch: 1, overrides: { maxQueuedInputs: 3 } })
  const device = await SimDevice.connect(url) // takes one task and never answers
  t.teardown(() => device.kill())
  await device.register()
  const one = { model_id: model.id, input: { data: input(1), shape: [1, 10] } }
  t.equal((await api('POST', '/inference?async=true', one)).status, 202)
  await device.next((f) => f.type === 'task')
  const batch = await api('POST', '/inference/batch', { model_id: model.id, inputs: [1, 2, 3].map((i) => ({ data: input(i), shape: [1, 10] })) })
  t.equal(batch.status, 202, 'three inputs wait: the limit')
  const full = await api('POST', '/inference?async=true', one)
  t.equal(full.status, 503)
  t.equal(full.body.error.code, 'QUEUE_FULL')
  t.match(full.body.error.message, /3 inputs are waiting for a device and the queue holds at most 3/)
  t.equal((await api('DELETE', `/inference/${batch.body.job_id}`)).status, 200)
  t.equal((await api('POST', '/inference?async=true', one)).status, 202, 'accepted again once the queue drained')
})

t.test('the queue bound holds for requests that arrive together', async (t) => {
  const { api, model, url } = await inferenceSetup(t, { prefetch: 1, overrides: { maxQueuedInputs: 3 } })
  const device = await SimDevice.connect(url) // takes one task and never answers
  t.teardown(() => device.kill())
  await device.register()
  t.equal((await api('POST', '/inference?async=true', { model_id: model.id, input: { data: input(1), shape: [1, 10] } })).status, 202)
  await device.next((f) => f.type === 'task')
  // four batches of three at once: each fits the bound alone, only one fits it with the others
  const batch = { model_id: model.id, inputs: [1, 2, 3].map((i) => ({ data: input(i), shape: [1, 10] })) }
  const answers = await Promise.all(Array.from({ length: 4 }, () => api('POST', '/inference/batch', batch)))
  t.same(answers.map((a) => a.status).sort(), [202, 503, 503, 503], 'one accepted, three refused')
  t.ok(answers.filter((a) => a.status === 503).every((a) => a.body.error.code === 'QUEUE_FULL'))
})

t.test('the queue is bounded in bytes too, per customer and in all: one customer cannot fill it for the others', async (t) => {
  // 10 values a tensor, 4 bytes a value: 40 bytes an input. A customer may queue 120 bytes, all together 200.
  const { api, model, url, app, customer } = await inferenceSetup(t, { prefetch: 1, overrides: { maxQueuedBytesPerCustomer: 120, maxQueuedBytes: 200 } })
  const device = await SimDevice.connect(url) // takes one task and never answers
  t.teardown(() => device.kill())
  await device.register()
  const one = { model_id: model.id, input: { data: input(1), shape: [1, 10] } }
  t.equal((await api('POST', '/inference?async=true', one)).status, 202)
  await device.next((f) => f.type === 'task')
  const three = { model_id: model.id, inputs: [1, 2, 3].map((i) => ({ data: input(i), shape: [1, 10] })) }
  t.equal((await api('POST', '/inference/batch', three)).status, 202, '120 bytes wait: this customer\'s limit')
  const more = await api('POST', '/inference?async=true', one)
  t.equal(more.status, 503)
  t.match(more.body.error, { code: 'QUEUE_FULL', message: /120 B of your inputs are waiting for a device and a customer may queue at most 120 B/ })
  // another customer still has room (its own model: a customer sees only its own)
  const bob = await customer()
  const body = multipart({ name: 'bobs' }, { name: 'm.onnx', content: denseOnnxModel({ inputs: 10, outputs: 2 }) })
  const upload = await app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': bob.key }, payload: body.payload })
  const bobModel = upload.json().id
  const bobApi = (body: unknown) => fetch(`${url}/api/v1/inference/batch`, { method: 'POST', headers: { 'x-api-key': bob.key, 'content-type': 'application/json' }, body: JSON.stringify(body) })
  t.equal((await bobApi({ ...three, model_id: bobModel, inputs: three.inputs.slice(0, 2) })).status, 202, 'another customer queues within the total')
  t.equal((await bobApi({ ...three, model_id: bobModel, inputs: three.inputs.slice(0, 1) })).status, 503, 'past the total (200 bytes) nobody queues more')
})

t.test('a page of results is bounded in values: it ends early with next_offset, and the pages cover every input once', async (t) => {
  const { api, model } = await inferenceSetup(t, { workers: 1, overrides: { maxPageValues: 5 } })
  const inputs = Array.from({ length: 7 }, (_, i) => ({ data: input(i), shape: [1, 10] }))
  const batch = await api('POST', '/inference/batch', { model_id: model.id, inputs })
  await eventually(async () => (await api('GET', `/inference/${batch.body.job_id}?limit=1`)).body.status === 'completed', 30_000, 'the batch')
  const first = (await api('GET', `/inference/${batch.body.job_id}?limit=100`)).body
  t.equal(first.results.length, 2, 'two outputs of 2 values fit in 5; a third would not')
  t.equal(first.next_offset, 2)
  const seen: number[] = []
  for (let offset: number | undefined = 0; offset !== undefined; ) {
    const page: any = (await api('GET', `/inference/${batch.body.job_id}?limit=100&offset=${offset}`)).body
    seen.push(...page.results.map((r: { index: number }) => r.index))
    offset = page.next_offset
  }
  t.same(seen, [0, 1, 2, 3, 4, 5, 6], 'every input once, in order')
})

t.test('DELETE of one job of a merged device task: that job is cancelled and billed nothing; the others complete with their own results', async (t) => {
  const { api, model, url, direct } = await setup(t)
  const device = await SimDevice.connect(url)
  t.teardown(() => device.kill())
  await device.register({ maxTasks: 1, batchInputs: 64 })
  const frames = () => device.frames.filter((f) => f.type === 'task')
  const answer = async (frame: any) => {
    const inputs: { data: number[] }[] = frame.inputs ?? [frame.input]
    const outputs = await Promise.all(inputs.map(async (x) => ({ data: await direct(x.data), shape: [1, 2] })))
    device.send({ type: 'task_result', task_id: frame.task_id, lease_id: frame.lease_id, status: 'completed', ...(frame.inputs ? { outputs } : { output: outputs[0] }), metrics: { cpu_ms: 3, gpu_ms: 0, bytes_in: 0, bytes_out: 0 } })
  }
  const submit = async (seed: number) => (await api('POST', '/inference?async=true', { model_id: model.id, input: { data: input(seed), shape: [1, 10] } })).body.job_id as string
  // two on the device (the one it runs and one more), three queued behind them
  const jobs = [await submit(0), await submit(1)]
  await eventually(async () => frames().length === 2, 10_000, 'two tasks on the device')
  for (const seed of [2, 3, 4]) jobs.push(await submit(seed))
  await answer(frames()[0])
  const merged = await eventually(async () => frames().find((f) => f.inputs), 10_000, 'a merged device task')
  t.equal(merged.inputs.length, 3, 'the three queued ones together')

  const cancelled = await api('DELETE', `/inference/${jobs[3]}`)
  t.match(cancelled, { status: 200, body: { status: 'cancelled', cancelled_tasks: 1 } })
  await answer(frames()[1])
  await answer(merged)
  for (const [seed, job] of jobs.entries()) {
    if (seed === 3) continue
    const done = await eventually(async () => {
      const r = await api('GET', `/inference/${job}`)
      return r.body.status === 'completed' ? r.body : undefined
    }, 10_000, `job ${seed} completed`)
    t.ok(close(done.result.data, await direct(input(seed))), `job ${seed}: its own input's result`)
  }
  const gone = await api('GET', `/inference/${jobs[3]}`)
  t.equal(gone.body.status, 'cancelled')
  t.notOk('result' in gone.body, 'no result for the cancelled job')
  const usage = (await api('GET', '/usage')).body
  t.equal(usage.tasks.total, 4, 'four jobs billed, the cancelled one not')
  t.equal(usage.inputs, 4)
})
