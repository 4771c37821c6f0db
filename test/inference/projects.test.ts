import t from 'tap'
import { legacySlot, SimDevice } from '../helpers/device.js'
import { close, inferenceSetup, input, poll } from '../helpers/inference.js'

t.test("the spec's Example 2: a batch project, its progress and analytics", async (t) => {
  const { api, model, direct } = await inferenceSetup(t, { workers: 2, aws: [0] })
  const created = await api('POST', '/projects', { name: 'Image Classification Batch', type: 'batch', model_id: model.id, total_tasks: 100 })
  t.equal(created.status, 201, JSON.stringify(created.body))
  t.match(created.body, { project_id: /^proj_/, name: 'Image Classification Batch', type: 'batch', model_id: model.id, status: 'active', total_tasks: 100, completed_tasks: 0 })
  const projectId = created.body.project_id
  const inputs = Array.from({ length: 100 }, (_, i) => ({ data: input(i), shape: [1, 10] }))
  const queued = await api('POST', '/inference/batch', { model_id: model.id, project_id: projectId, inputs })
  t.equal(queued.status, 202)
  t.match(queued.body, { job_id: /^batch_/, project_id: projectId, status: 'queued', total_tasks: 100 })
  const done = await poll(api, queued.body.job_id, (b) => b.status === 'completed', 60_000, '?limit=1000')
  t.equal(done.results.length, 100)
  let same = 0
  for (const r of done.results) if (close(r.result.data, await direct(input(r.index)))) same++
  t.equal(same, 100, 'every result equals onnxruntime on its input')

  const project = await api('GET', `/projects/${projectId}`)
  t.match(project.body, { project_id: projectId, status: 'completed', total_tasks: 100, submitted_tasks: 100, completed_tasks: 100, failed_tasks: 0, pending_tasks: 0, percent_complete: 100 })
  t.ok(project.body.metrics.latency_ms.p50 > 0, 'details carry the latency figures')

  const analytics = await api('GET', `/projects/${projectId}/analytics`)
  t.equal(analytics.status, 200)
  const a = analytics.body
  t.match(a, { project_id: projectId, status: 'completed', completed_tasks: 100 })
  const l = a.latency_ms
  t.ok(l.count > 0 && l.min <= l.p50 && l.p50 <= l.p90 && l.p90 <= l.p95 && l.p95 <= l.p99 && l.p99 <= l.max, `ordered percentiles ${JSON.stringify(l)}`)
  t.equal(a.throughput.series.reduce((n: number, p: { inputs: number }) => n + p.inputs, 0), 100, 'the throughput series counts every input once')
  const aws = a.by_instance_type.aws
  const user = a.by_instance_type.user
  t.equal(aws.completed_inputs + user.completed_inputs, 100, 'split by instance type, every input counted once')
  t.equal(aws.latency_ms.count + user.latency_ms.count, l.count)
  const fine = await api('GET', `/projects/${projectId}/analytics?bucket_seconds=1`)
  t.equal(fine.body.throughput.bucket_seconds, 1)
  t.equal(fine.body.throughput.series.reduce((n: number, p: { inputs: number }) => n + p.inputs, 0), 100)
})

t.test("the spec's Example 4: a realtime project, sync inference, analytics, complete", async (t) => {
  const { api, model, direct, projections } = await inferenceSetup(t, { workers: 1 })
  const created = await api('POST', '/projects', { name: 'Production API', type: 'realtime', model_id: model.id })
  t.equal(created.status, 201)
  const projectId = created.body.project_id
  for (let i = 0; i < 20; i++) {
    const r = await api('POST', '/inference', { model_id: model.id, project_id: projectId, input: { data: input(i), shape: [1, 10] } })
    t.equal(r.status, 200, JSON.stringify(r.body))
    t.ok(close(r.body.result?.data ?? [], await direct(input(i))))
  }
  const analytics = (await api('GET', `/projects/${projectId}/analytics`)).body
  t.equal(analytics.latency_ms.count, 20)
  t.equal(analytics.by_instance_type.user.completed_inputs, 20)
  t.equal(analytics.by_instance_type.aws.completed_inputs, 0)
  t.equal(analytics.status, 'active', 'a realtime project stays active until completed')

  // A rebuild from the log gives the same analytics: every figure comes from the events.
  await projections.rebuild('projects')
  t.same((await api('GET', `/projects/${projectId}/analytics`)).body, analytics, 'rebuilt analytics are identical')

  const completed = await api('POST', `/projects/${projectId}/complete`)
  t.equal(completed.status, 200)
  t.match(completed.body, { status: 'completed', ended_at: String })
  const again = await api('POST', `/projects/${projectId}/complete`)
  t.equal(again.status, 200, 'completing twice is fine')
  const late = await api('POST', '/inference', { model_id: model.id, project_id: projectId, input: { data: input(1), shape: [1, 10] } })
  t.equal(late.status, 409)
  t.match(late.body.error, { code: 'CONFLICT', message: /completed; it takes no new work/ })
  const cancel = await api('POST', `/projects/${projectId}/cancel`)
  t.equal(cancel.status, 409)
  t.equal(cancel.body.error.code, 'CANNOT_CANCEL')
  const list = await api('GET', '/projects?status=completed')
  t.same(list.body.projects.map((p: { project_id: string }) => p.project_id), [projectId])
})

t.test('analytics count a task under the instance type it was billed by, also when its device came back as another type', async (t) => {
  const { api, model, url, scheduler, enrollmentToken } = await inferenceSetup(t)
  const first = await SimDevice.connect(url)
  await first.register({ instanceType: 'aws', enrollmentToken: (await enrollmentToken()).token })
  t.teardown(() => first.kill())
  // the same device, now contributed by a user (an older hub allowed it)
  legacySlot(scheduler, first.deviceId, 'user')
  const projectId = (await api('POST', '/projects', { type: 'realtime', model_id: model.id })).body.project_id
  const answered = api('POST', '/inference', { model_id: model.id, project_id: projectId, input: { data: input(1), shape: [1, 10] } })
  t.equal((await answered).status, 200)
  const analytics = (await api('GET', `/projects/${projectId}/analytics`)).body
  t.equal(analytics.by_instance_type.user.completed_inputs, 1, 'billed as user, counted as user')
  t.equal(analytics.by_instance_type.aws.completed_inputs, 0)
  t.equal((await api('GET', '/usage')).body.by_instance_type.user.tasks, 1, 'as usage bills it')
})

t.test('cancelling a project cancels its unfinished jobs', async (t) => {
  const { api, model, url } = await inferenceSetup(t)
  const device = await SimDevice.connect(url) // takes one task and never answers
  t.teardown(() => device.kill())
  await device.register()
  const projectId = (await api('POST', '/projects', { name: 'to cancel', type: 'batch' })).body.project_id
  const inputs = Array.from({ length: 5 }, (_, i) => ({ data: input(i), shape: [1, 10] }))
  const batch = await api('POST', '/inference/batch', { model_id: model.id, project_id: projectId, inputs })
  t.equal(batch.status, 202)
  const leased = await device.next((f) => f.type === 'task')
  const cancelled = await api('POST', `/projects/${projectId}/cancel`)
  t.equal(cancelled.status, 200)
  t.match(cancelled.body, { project_id: projectId, status: 'cancelled', cancelled_jobs: [batch.body.job_id], cancelled_tasks: 5 })
  t.match(await device.next((f) => f.type === 'cancel_task'), { task_id: leased.task_id })
  const job = await poll(api, batch.body.job_id, (b) => b.status === 'cancelled', 5000)
  t.equal(job.progress.completed, 0)
  const late = await api('POST', '/inference/batch', { model_id: model.id, project_id: projectId, inputs })
  t.equal(late.status, 409, 'a cancelled project takes no new work')
  t.equal((await api('POST', `/projects/${projectId}/cancel`)).status, 200, 'cancelling twice is fine')
})

t.test('a batch without a project gets one of its own; projects are private and validated', async (t) => {
  const { api, model, url, customer } = await inferenceSetup(t)
  const device = await SimDevice.connect(url)
  t.teardown(() => device.kill())
  await device.register()
  const batch = await api('POST', '/inference/batch', { model_id: model.id, name: 'nightly', inputs: [{ data: input(1), shape: [1, 10] }] })
  t.equal(batch.status, 202)
  const own = await api('GET', `/projects/${batch.body.project_id}`)
  t.match(own.body, { project_id: batch.body.project_id, name: 'nightly', type: 'batch', model_id: model.id, total_tasks: 1, submitted_tasks: 1 })

  // no field is required (the spec marks none): a project without a name is named after its type and time
  const unnamed = await api('POST', '/projects', { type: 'batch' })
  t.equal(unnamed.status, 201)
  t.match(unnamed.body, { type: 'batch', name: /^Batch project of \d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC$/ })
  t.match((await api('POST', '/projects', {})).body, { type: 'realtime', name: /^Realtime project of / }, 'an empty body is a realtime project')
  const bad = [
    [{ name: 'x', type: 'weekly' }, /body\.type/],
    [{ name: 'x', total_tasks: 0 }, /body\.total_tasks/],
    [{ name: ' ' }, /body\.name/],
  ] as const
  for (const [body, message] of bad) {
    const r = await api('POST', '/projects', body)
    t.equal(r.status, 400, JSON.stringify(body))
    t.match(r.body.error, { code: 'VALIDATION_ERROR', message })
  }
  const noModel = await api('POST', '/projects', { name: 'x', model_id: 'model_nope' })
  t.equal(noModel.status, 404)
  t.equal(noModel.body.error.code, 'NO_MODEL')
  const unknown = await api('POST', '/inference', { model_id: model.id, project_id: 'proj_nope', input: { data: input(1), shape: [1, 10] } })
  t.equal(unknown.status, 404)
  t.match(unknown.body.error.message, /project proj_nope not found/)
  t.equal((await api('GET', '/projects/proj_nope/analytics')).status, 404)
  t.equal((await api('GET', '/projects?limit=0')).status, 400)

  const bob = await customer('bob')
  const theirs = await fetch(`${url}/api/v1/projects/${batch.body.project_id}`, { headers: { 'x-api-key': bob.key } })
  t.equal(theirs.status, 404, "another customer's project is not found")
  const use = await fetch(`${url}/api/v1/inference`, { method: 'POST', headers: { 'x-api-key': bob.key, 'content-type': 'application/json' }, body: JSON.stringify({ model_id: model.id, project_id: batch.body.project_id, input: { data: input(1), shape: [1, 10] } }) })
  t.equal(use.status, 404)
  const list = (await (await fetch(`${url}/api/v1/projects`, { headers: { 'x-api-key': bob.key } })).json()) as { projects: unknown[]; total: number }
  t.same([list.projects, list.total], [[], 0])
})
