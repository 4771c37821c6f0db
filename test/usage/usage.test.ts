import { spawn } from 'node:child_process'
import { sql } from 'kysely'
import t from 'tap'
import { costOf, DEFAULT_PRICES } from '../../src/domain/pricing.js'
import type { EventStore, RecordedEvent } from '../../src/event-store/port.js'
import { hourOf } from '../../src/projections/usage.js'
import { auditUsage } from '../../src/projections/usage-audit.js'
import { ADMIN_KEY, INTERNAL_TOKEN } from '../helpers/app.js'
import { SimDevice } from '../helpers/device.js'
import { allEvents } from '../helpers/events.js'
import { close, DCP_BIN, inferenceSetup, input, poll } from '../helpers/inference.js'
import { boundMetrics, splitMetrics } from '../../src/domain/metering.js'

/** A device that answers every task with fixed metrics (so the expected bill is known exactly). */
async function answeringDevice(url: string, options: { sdkUuid: string; instanceType: 'aws' | 'user'; gpu: boolean; enrollmentToken?: string }) {
  const device = await SimDevice.connect(url)
  await device.register({ sdkUuid: options.sdkUuid, instanceType: options.instanceType, maxTasks: 2, batchInputs: 8, ...(options.enrollmentToken ? { enrollmentToken: options.enrollmentToken } : {}) })
  let n = 0
  device.socket.on('message', (raw) => {
    const frame = JSON.parse(raw.toString())
    if (frame.type !== 'task') return
    const inputs = frame.inputs ?? [frame.input]
    const outputs = inputs.map(() => ({ data: [0.25, 0.75], shape: [1, 2] }))
    const metrics = { cpu_ms: 1.25 + (n++ % 3) * 0.5, gpu_ms: options.gpu ? 2.125 : 0, bytes_in: 40 * inputs.length, bytes_out: 8 * inputs.length }
    setTimeout(() => device.send({ type: 'task_result', task_id: frame.task_id, lease_id: frame.lease_id, status: 'completed', ...(frame.inputs ? { outputs } : { output: outputs[0] }), metrics }), 5)
  })
  return device
}

t.test('under concurrent load with a device killed mid-task, usage equals the sum over completed tasks, exactly; errors hold the lost attempts', async (t) => {
  const { api, model, url, store, customer, app, enrollmentToken } = await inferenceSetup(t)
  const victim = await SimDevice.connect(url) // takes tasks and never answers; killed below
  await victim.register({ sdkUuid: 'sdk-nodejs-victim', instanceType: 'user', maxTasks: 2, batchInputs: 8 })
  const project = (await api('POST', '/projects', { name: 'metered', type: 'batch' })).body.project_id
  const singles = Array.from({ length: 20 }, (_, i) => api('POST', '/inference?async=true', { model_id: model.id, input: { data: input(i), shape: [1, 10] }, ...(i % 2 ? { project_id: project } : {}) }))
  const batch = api('POST', '/inference/batch', { model_id: model.id, project_id: project, inputs: Array.from({ length: 40 }, (_, i) => ({ data: input(i), shape: [1, 10] })) })
  await victim.next((f) => f.type === 'task')
  const a = await answeringDevice(url, { sdkUuid: 'sdk-nodejs-aaaaaa', instanceType: 'aws', gpu: true, enrollmentToken: (await enrollmentToken({ instance_type: 'aws' })).token })
  const b = await answeringDevice(url, { sdkUuid: 'sdk-nodejs-bbbbbb', instanceType: 'user', gpu: false })
  t.teardown(() => [a, b, victim].forEach((d) => d.kill()))
  victim.kill()
  const jobs = [...(await Promise.all(singles)), await batch].map((r) => r.body.job_id as string)
  for (const job of jobs) await poll(api, job, (body) => body.status === 'completed', 30_000)

  const events = await allEvents(store)
  const completed = events.filter((e) => e.type === 'TaskCompleted').map((e) => e.data as any)
  const failed = events.filter((e) => e.type === 'TaskAttemptFailed').map((e) => e.data as any)
  t.ok(failed.some((f) => f.sdk_uuid === 'sdk-nodejs-victim'), `the victim's lost attempts were recorded (${failed.length} failed attempts in all)`)
  t.ok(failed.every((f) => f.requeued), 'every lost attempt was re-queued')
  const sum = (list: any[], f: (d: any) => number) => list.reduce((n, d) => n + f(d), 0)
  /** Milliseconds summed as usage sums them: in whole microseconds (merged tasks' shares are fractions of a ms). */
  const ms = (list: any[], f: (d: any) => number) => sum(list, (d) => Math.round(f(d) * 1000)) / 1000
  const usage = (await api('GET', '/usage')).body
  t.equal(usage.tasks.total, completed.length, 'every completed task billed once')
  t.equal(usage.inputs, 60, 'every input billed once')
  t.equal(usage.cpu_ms, ms(completed, (d) => d.metrics.cpu_ms), 'CPU time: the exact sum over completed tasks')
  t.equal(usage.gpu_ms, ms(completed, (d) => d.metrics.gpu_ms), 'GPU time too')
  t.equal(usage.tasks.gpu, completed.filter((d) => d.metrics.gpu_ms > 0).length)
  t.equal(usage.tasks.cpu, completed.filter((d) => d.metrics.gpu_ms === 0).length)
  t.equal(usage.bytes_in, sum(completed, (d) => d.metrics.bytes_in))
  t.equal(usage.bytes_out, sum(completed, (d) => d.metrics.bytes_out))
  t.equal(usage.failed_attempts.tasks, failed.length, 'lost attempts are counted in errors, not in usage')
  const byType = (type: string) => completed.filter((d) => d.instance_type === type)
  for (const type of ['aws', 'user']) {
    const list = byType(type)
    const cpu_us = sum(list, (d) => Math.round(d.metrics.cpu_ms * 1000))
    const gpu_us = sum(list, (d) => Math.round(d.metrics.gpu_ms * 1000))
    t.equal(usage.estimated_cost.by_instance_type[type], costOf(DEFAULT_PRICES, type, { cpu_us, gpu_us }), `${type} cost from the price table`)
  }
  t.equal(usage.estimated_cost.currency, 'USD')

  const projectUsage = (await api('GET', `/usage/projects/${project}`)).body
  const inProject = completed.filter((d) => d.project_id === project)
  t.equal(projectUsage.tasks.total, inProject.length)
  t.equal(projectUsage.inputs, 50, 'the batch and half the singles')
  t.equal(projectUsage.cpu_ms, ms(inProject, (d) => d.metrics.cpu_ms))

  const hour = hourOf(new Date().toISOString())
  const internal = async (path: string) => (await app.inject({ method: 'GET', url: `/api/v1/internal/${path}?from=${hour}`, headers: { 'x-internal-token': INTERNAL_TOKEN } })).json()
  const ok = await internal('uuid-usage')
  t.same(ok.data.map((r: { uuid: string }) => r.uuid).sort(), ['sdk-nodejs-aaaaaa', 'sdk-nodejs-bbbbbb'])
  for (const row of ok.data) {
    const mine = completed.filter((d) => d.sdk_uuid === row.uuid)
    t.match(row, { hour, cpu_ms: ms(mine, (d) => d.metrics.cpu_ms), gpu_ms: ms(mine, (d) => d.metrics.gpu_ms), cpu_tasks: mine.filter((d) => d.metrics.gpu_ms === 0).length, gpu_tasks: mine.filter((d) => d.metrics.gpu_ms > 0).length })
  }
  const errors = await internal('uuid-usage/errors')
  // a loaded machine can cost an answering device an attempt too (a late lease): compare with the events
  const lostBy = new Map<string, number>()
  for (const f of failed) lostBy.set(f.sdk_uuid, (lostBy.get(f.sdk_uuid) ?? 0) + 1)
  t.same(errors.data.map((r: { uuid: string; cpu_tasks: number; gpu_tasks: number }) => [r.uuid, r.cpu_tasks + r.gpu_tasks]), [...lostBy].sort(), 'the errors hold every lost attempt, by SDK UUID')

  const hourly = (await api('GET', '/usage/hourly?hours=3')).body
  t.equal(hourly.data.length, 3, 'empty hours included')
  t.equal(hourly.data.at(-1).hour, hour)
  t.equal(hourly.data.at(-1).tasks, completed.length)

  const bob = await customer('bob')
  const theirs = await fetch(`${url}/api/v1/usage`, { headers: { 'x-api-key': bob.key } })
  t.match(await theirs.json(), { tasks: { total: 0 }, cpu_ms: 0, failed_attempts: { tasks: 0 } }, "another customer's usage is not yours")
  t.equal((await fetch(`${url}/api/v1/usage/projects/${project}`, { headers: { 'x-api-key': bob.key } })).status, 404)
  const admin = (await app.inject({ method: 'GET', url: '/api/v1/admin/usage', headers: { 'x-admin-key': ADMIN_KEY } })).json()
  t.equal(admin.total, 1)
  t.match(admin.customers[0], { tasks: { total: completed.length } })
})

t.test('the audit: a replay equals the live read model; a tampered row is found and named; CLI and admin endpoint agree', async (t) => {
  const { api, model, url, database, app, projections, store } = await inferenceSetup(t)
  const device = await answeringDevice(url, { sdkUuid: 'sdk-nodejs-cccccc', instanceType: 'user', gpu: false })
  t.teardown(() => device.kill())
  const batch = await api('POST', '/inference/batch', { model_id: model.id, inputs: Array.from({ length: 16 }, (_, i) => ({ data: input(i), shape: [1, 10] })) })
  await poll(api, batch.body.job_id, (b) => b.status === 'completed', 30_000)
  const single = await api('POST', '/inference', { model_id: model.id, input: { data: input(1), shape: [1, 10] } })
  t.equal(single.status, 200)

  const clean = (await app.inject({ method: 'GET', url: '/api/v1/admin/audit/usage', headers: { 'x-admin-key': ADMIN_KEY } })).json()
  t.equal(clean.ok, true)
  t.equal(clean.digest, clean.liveDigest)
  t.match(clean.digest, /^[0-9a-f]{64}$/)
  t.equal(clean.totals.reduce((n: number, r: { tasks: number }) => n + r.tasks, 0), (await api('GET', '/usage')).body.tasks.total)

  // Same log, other batch sizes, every page delivered twice: byte-identical rows.
  const twice: EventStore = Object.create(store)
  let previous: RecordedEvent[] = []
  let redelivered = 0
  twice.readAll = async (from, limit) => {
    const page = await store.readAll(from, limit)
    const out = [...previous, ...page]
    redelivered += previous.length
    previous = page
    return out
  }
  twice.readFilteredPage = async (from, limit, filter) => {
    const page = await store.readFilteredPage(from, limit, filter)
    const out = { ...page, events: [...previous, ...page.events] }
    redelivered += previous.length
    previous = page.events
    return out
  }
  for (const [deps, what] of [[{ db: database.db, store, batchSize: 1 }, 'batch size 1'], [{ db: database.db, store, batchSize: 7 }, 'batch size 7'], [{ db: database.db, store: twice, batchSize: 5 }, 'every page redelivered']] as const) {
    const report = await auditUsage(deps)
    t.equal(report.digest, clean.digest, `${what}: same digest`)
  }
  t.ok(redelivered > 0, `${redelivered} events were delivered twice`)

  const customerId = clean.totals[0].customer_id
  await sql`update rm_usage.usage_hourly set cpu_us = cpu_us + 7 where customer_id = ${customerId} and tasks = (select max(tasks) from rm_usage.usage_hourly)`.execute(database.db)
  const tampered = (await app.inject({ method: 'GET', url: '/api/v1/admin/audit/usage', headers: { 'x-admin-key': ADMIN_KEY } })).json()
  t.equal(tampered.ok, false)
  t.equal(tampered.tables[0].differenceCount, 1)
  const diff = tampered.tables[0].differences[0]
  t.match(diff.key, { customer_id: customerId, sdk_uuid: 'sdk-nodejs-cccccc', outcome: 'completed' }, 'the audit names the row')
  t.equal(Number(diff.live.cpu_us) - Number(diff.replayed.cpu_us), 7)
  t.not(tampered.liveDigest, tampered.digest)
  t.equal(tampered.digest, clean.digest, 'the replay is what it was')
  const elsewhere = (await app.inject({ method: 'GET', url: '/api/v1/admin/audit/usage?customer=cust_other', headers: { 'x-admin-key': ADMIN_KEY } })).json()
  t.equal(elsewhere.ok, true, "another customer's rows are not affected")

  // The CLI prints the same report and exits 1.
  const child = spawn(process.execPath, [DCP_BIN, 'audit', 'usage', '--customer', customerId], { env: { ...process.env, DATABASE_URL: database.url }, stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  child.stdout.on('data', (d) => (output += d))
  child.stderr.on('data', (d) => (output += d))
  const code = await new Promise((resolve) => child.on('exit', resolve))
  t.equal(code, 1, output)
  t.match(output, /DIFFERENCES FOUND/)
  t.match(output, new RegExp(`customer_id="${customerId}"`))
  t.match(output, new RegExp(`digest \\(replayed rows\\): ${clean.digest}`))
  await projections.rebuild('usage')
  const healed = (await app.inject({ method: 'GET', url: '/api/v1/admin/audit/usage', headers: { 'x-admin-key': ADMIN_KEY } })).json()
  t.equal(healed.ok, true, 'a rebuild restores the truth')
})

t.test('usage endpoints validate their hours and windows', async (t) => {
  const { api, app } = await inferenceSetup(t)
  const hour = (offsetHours: number) => hourOf(new Date(Date.now() + offsetHours * 3_600_000).toISOString())
  const internal = (query: string, token = INTERNAL_TOKEN) => app.inject({ method: 'GET', url: `/api/v1/internal/uuid-usage${query}`, headers: { 'x-internal-token': token } })
  const cases: [string, RegExp][] = [
    ['', /querystring\.from/],
    ['?from=2026-03-15', /YYYY-MM-DDTHH/],
    ['?from=2026-13-01T00', /YYYY-MM-DDTHH/],
    ['?from=2026-02-30T00', /not a real hour/],
    [`?from=${hour(-72)}`, /outside the rolling 3-day window/],
    [`?from=${hour(-1)}&to=${hour(1)}`, /in the future/],
    [`?from=${hour(0)}&to=${hour(-2)}`, /is after to/],
  ]
  for (const [query, message] of cases) {
    const r = await internal(query)
    t.equal(r.statusCode, 400, query)
    t.match(r.json().error, { code: 'VALIDATION_ERROR', message }, query)
  }
  const edge = await internal(`?from=${hour(-71)}`)
  t.equal(edge.statusCode, 200, 'the earliest hour of the window is in it')
  t.same(edge.json(), { from: hour(-71), to: hour(0), data: [] }, 'only hours with activity')
  t.equal((await internal(`?from=${hour(0)}`, 'wrong')).statusCode, 401)
  t.equal((await app.inject({ method: 'GET', url: `/api/v1/internal/uuid-usage/errors?from=${hour(0)}` })).statusCode, 401)
  for (const query of ['?hours=0', '?hours=73', '?hours=abc']) {
    const r = await api('GET', `/usage/hourly${query}`)
    t.equal(r.status, 400, query)
  }
  t.equal((await api('GET', '/usage/hourly')).body.data.length, 24, 'default 24 hours')
  t.equal((await api('GET', '/usage?from=2026-01-02T00&to=2026-01-01T00')).status, 400)
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/admin/usage' })).statusCode, 401)
})

t.test('sync requests merged into device tasks on a real worker: each its own result; each job billed its share; per-project usage and the audit agree', async (t) => {
  const { api, model, store, database, app, direct } = await inferenceSetup(t, { workers: 1, prefetch: 1 })
  const projects = await Promise.all(['p-a', 'p-b'].map(async (name) => (await api('POST', '/projects', { name, type: 'batch' })).body.project_id as string))
  const answers = await Promise.all(Array.from({ length: 40 }, (_, i) => api('POST', '/inference', { model_id: model.id, input: { data: input(i), shape: [1, 10] }, project_id: projects[i % 2] })))
  for (const [i, answer] of answers.entries()) {
    t.equal(answer.status, 200)
    if (!close(answer.body.result.data, await direct(input(i)))) t.fail(`request ${i} got another input's result: ${answer.body.result.data}`)
  }
  const events = await allEvents(store)
  const leases = events.filter((e) => e.type === 'TaskLeased').map((e) => e.data as { lease_id: string; unit: { id: string; sizes: number[] } | null })
  const units = new Set(leases.map((l) => l.lease_id))
  t.ok(leases.some((l) => l.unit), `requests that waited together went as one device task (${leases.length} tasks in ${units.size} device tasks)`)

  // each completion bills its share of its device task (the whole bounded by what the server saw, split by inputs)
  const completed = events.filter((e) => e.type === 'TaskCompleted').map((e) => e.data as any)
  t.equal(completed.length, 40)
  for (const d of completed.filter((c) => c.merged)) {
    const whole = d.observed ? boundMetrics(d.merged.claimed, d.observed).metrics : d.merged.claimed
    t.same(d.metrics, splitMetrics(whole, d.merged.sizes, d.merged.index), `${d.task_id}: part ${d.merged.index} of ${d.merged.sizes.length}`)
  }
  const us = (list: any[]) => list.reduce((n, d) => n + Math.round(d.metrics.cpu_ms * 1000), 0)
  for (const project of projects) {
    const mine = completed.filter((d) => d.project_id === project)
    const usage = (await api('GET', `/usage/projects/${project}`)).body
    t.equal(usage.tasks.total, 20)
    t.equal(Math.round(usage.cpu_ms * 1000), us(mine), `${project}: the sum of its jobs' shares, to the microsecond`)
  }
  const audit = (await app.inject({ method: 'GET', url: '/api/v1/admin/audit/usage', headers: { 'x-admin-key': ADMIN_KEY } })).json()
  t.equal(audit.ok, true, 'the audit replays the same split')
  t.equal(audit.digest, (await auditUsage({ db: database.db, store, batchSize: 3 })).digest, 'in any batch size')
})
