import { spawn } from 'node:child_process'
import t from 'tap'
import { sseEvents } from '../../src/cli/sse.js'
import { buildApp } from '../../src/http/app.js'
import { INTERNAL_TOKEN } from '../helpers/app.js'
import { DCP_BIN } from '../helpers/inference.js'
import { eventually } from '../helpers/device.js'
import { MLP, trainingBody, trainingSetup } from '../helpers/training.js'

const input = (i: number) => ({ data: Array.from({ length: MLP.inputs }, (_, j) => ((i + 1) * (j + 1)) % 7 / 7), shape: [1, MLP.inputs] })

/** Reads Server-Sent Events from a response until `stop` says so or the stream ends. */
async function readEvents(response: Response, stop: (events: { event: string; data: string; at: number }[]) => boolean) {
  const events: { event: string; data: string; at: number }[] = []
  for await (const { event, data } of sseEvents(response.body as unknown as AsyncIterable<Uint8Array>)) {
    events.push({ event, data, at: Date.now() })
    if (stop(events)) return { events, ended: false }
  }
  return { events, ended: true }
}

t.test('every dashboard view, from real inference and training runs', async (t) => {
  const { api, model, waitFor, workers, url, alice } = await trainingSetup(t, { devices: 2 })
  const project = (await api('POST', '/projects', { name: 'live', type: 'realtime', model_id: model.id })).body
  for (let i = 0; i < 6; i++) t.equal((await api('POST', '/inference', { model_id: model.id, project_id: project.project_id, input: input(i) })).status, 200)
  const single = await api('POST', '/inference', { model_id: model.id, input: input(9) })
  const trained = (await api('POST', '/training', trainingBody(model.id))).body.job_id
  await waitFor(trained, (job) => job.status === 'completed', 60_000)

  const devices = (await api('GET', '/dashboard/devices')).body
  t.equal(devices.total, 2)
  t.match(devices.by_platform, { nodejs: { total: 2, offline: 0 }, python: { total: 0 }, windows: { total: 0 } })
  t.equal(devices.by_instance_type.user.total, 2)
  t.same(devices.devices.map((d: any) => d.id).sort(), workers.map((w) => w.deviceId).sort())
  t.ok(devices.devices.every((d: any) => d.platform === 'nodejs' && d.can_train === true && d.training_job === null))

  const jobs = (await api('GET', '/dashboard/jobs')).body
  t.equal(jobs.total, 8, '7 inference jobs and 1 training job')
  t.ok(jobs.jobs.some((j: any) => j.job_id === single.body.job_id && j.type === 'inference' && j.status === 'completed'))
  const training = (await api('GET', '/dashboard/jobs?type=training')).body
  t.match(training, { total: 1, jobs: [{ job_id: trained, type: 'training', status: 'completed' }] })
  t.equal((await api('GET', '/dashboard/jobs?type=video')).status, 400)
  t.same((await api('GET', '/dashboard/jobs?limit=2&offset=1')).body.jobs.length, 2)

  const done = (await api('POST', '/projects', { name: 'done', type: 'batch' })).body
  await api('POST', `/projects/${done.project_id}/complete`)
  const projects = (await api('GET', '/dashboard/projects')).body.projects
  t.same(projects.map((p: any) => p.status), ['active', 'completed'], 'active projects first')
  t.equal(projects[0].completed_tasks, 6)

  const tasks = (await api('GET', '/dashboard/tasks?limit=3')).body.tasks
  t.equal(tasks.length, 3)
  const ofProject = (await api('GET', `/dashboard/tasks?project_id=${project.project_id}`)).body.tasks
  t.equal(ofProject.length, 6)
  t.ok(ofProject.every((task: any) => task.project_id === project.project_id && task.status === 'completed' && task.instance_type === 'user' && task.latency_ms > 0 && task.inputs === 1))
  t.equal((await api('GET', '/dashboard/tasks?limit=0')).status, 400)

  const throughput = (await api('GET', `/dashboard/tasks/throughput?bucket_size=60&project_id=${project.project_id}`)).body
  t.equal(throughput.bucket_size, 60)
  t.equal(throughput.buckets.reduce((n: number, b: any) => n + b.completed, 0), 6, 'every completed task in a bucket')
  const everyTask = (await api('GET', '/dashboard/tasks/throughput?bucket_size=60')).body
  t.equal(everyTask.buckets.reduce((n: number, b: any) => n + b.completed, 0), 7, 'without a project: the single inference outside any project counts too')
  t.equal((await api('GET', '/dashboard/tasks/throughput?bucket_size=0')).status, 400)

  const cluster = (await api('GET', '/cluster/utilization')).body
  t.match(cluster, { devices: { total: 2, connected: 2, training: 0 }, slots: { total: 2, used: 0 }, queue: { tasks: 0, inputs: 0 }, training_jobs: { running: 0, queued: 0 } })
  t.ok(cluster.power_watts > 0)

  const comparison = (await api('GET', '/dashboard/comparison')).body
  t.same(comparison.labels, ['aws', 'user'])
  t.ok(Object.keys(comparison.training).length > 0 && Object.keys(comparison.inference).length > 0)
  const efficiency = await api('GET', '/dashboard/efficiency')
  t.equal(efficiency.status, 200)
  t.ok(efficiency.body.summary && efficiency.body.tta && efficiency.body.scaling && efficiency.body.power)

  // the API key is required, as a header (never in the query; the stream takes a ticket there)
  t.equal((await fetch(`${url}/api/v1/dashboard/devices`)).status, 401)
  t.equal((await fetch(`${url}/api/v1/dashboard/devices?api_key=${alice.key}`)).status, 401)
})

t.test('the project stream: emits at its interval, in json or text, and ends when the project completes; dcp watch follows it', async (t) => {
  const { api, model, url, alice } = await trainingSetup(t, { devices: 1 })
  const project = (await api('POST', '/projects', { name: 'streamed', model_id: model.id })).body
  const stream = `${url}/api/v1/dashboard/projects/${project.project_id}/stream`

  const { ticket } = (await api('POST', '/dashboard/stream-tickets', { project_id: project.project_id })).body
  const json = await fetch(`${stream}?interval=300&ticket=${ticket}`)
  t.equal(json.status, 200)
  t.match(json.headers.get('content-type'), /text\/event-stream/)
  const sending = (async () => {
    for (let i = 0; i < 4; i++) await api('POST', '/inference', { model_id: model.id, project_id: project.project_id, input: input(i) })
  })()
  const first = await readEvents(json, (events) => events.length >= 4)
  await sending
  t.ok(first.events.every((e) => e.event === 'stats'))
  const stats = first.events.map((e) => JSON.parse(e.data))
  t.match(stats[0], { project_id: project.project_id, name: 'streamed', status: 'active', latency_ms: {}, at: String })
  // the server's own times (a loaded client may read two updates at once): it waits the interval between them
  const gaps = stats.slice(1).map((e, i) => Date.parse(e.at) - Date.parse(stats[i]!.at))
  t.ok(gaps.every((gap) => gap >= 290), `updates every 300 ms or more: ${gaps}`)

  const text = await fetch(`${stream}?format=text&interval=200`, { headers: { 'x-api-key': alice.key } })
  const textual = await readEvents(text, (events) => events.length >= 1)
  t.match(textual.events[0]!.data, /\u001b\[1mstreamed\u001b\[0m/)
  t.match(textual.events[0]!.data, /completed 4/)

  // dcp watch follows until the project completes, then exits 0
  const watch = spawn(process.execPath, [DCP_BIN, 'watch', project.project_id, '--server', url, '--api-key', alice.key, '--interval', '200'], { stdio: ['ignore', 'pipe', 'pipe'] })
  // its exit is awaited from now on: it may exit (the project completed) before the check below gets there
  const exited = new Promise((resolve) => watch.once('exit', resolve))
  let output = ''
  watch.stdout.on('data', (d) => (output += d))
  await eventually(async () => /streamed/.test(output), 20_000, 'dcp watch to print the project')

  let open = false
  const closing = fetch(`${stream}?interval=200`, { headers: { 'x-api-key': alice.key } }).then((r) => readEvents(r, () => ((open = true), false)))
  await eventually(async () => open, 10_000, 'the stream\'s first update')
  await api('POST', `/projects/${project.project_id}/complete`)
  const closed = await closing
  t.ok(closed.ended, 'the stream closes')
  t.equal(closed.events.at(-1)!.event, 'end')
  t.match(JSON.parse(closed.events.at(-1)!.data), { project_id: project.project_id, status: 'completed' })
  const code = await exited
  t.equal(code, 0, output)
  t.match(output, /completed/)

  t.equal((await fetch(`${stream}?interval=5`, { headers: { 'x-api-key': alice.key } })).status, 400)
  t.equal((await fetch(`${stream}?format=html`, { headers: { 'x-api-key': alice.key } })).status, 400)
  t.equal((await fetch(`${url}/api/v1/dashboard/projects/proj_nope/stream`, { headers: { 'x-api-key': alice.key } })).status, 404)
  t.equal((await fetch(`${stream}?api_key=wrong`)).status, 400, 'a key in the URL is refused')
})

t.test('benchmarks: a step-load run reports every step; quick inference and training runs report their results', async (t) => {
  const { api, store } = await trainingSetup(t, { devices: 2, app: { minPerfDurationS: 1 } })
  t.equal((await api('POST', '/dashboard/benchmark/perf', { duration: 0.5, rps_steps: [2] })).status, 400, 'shorter than the minimum')
  t.equal((await api('POST', '/dashboard/benchmark/perf', { duration: 3, rps_steps: [] })).status, 400)
  t.equal((await api('POST', '/dashboard/benchmark', { mode: 'quantum' })).status, 400)

  const perf = await api('POST', '/dashboard/benchmark/perf', { duration: 3, rps_steps: [2, 5, 10], max_concurrency: 2, instance_type: 'user' })
  t.equal(perf.status, 202, JSON.stringify(perf.body))
  const done = await eventually(async () => {
    const r = await api('GET', `/dashboard/benchmark/perf/${perf.body.benchmark_id}`)
    return r.body.status !== 'running' ? r.body : undefined
  }, 60_000, 'the perf benchmark')
  t.equal(done.status, 'completed', JSON.stringify(done))
  t.same(done.steps.map((s: any) => s.target_rps), [2, 5, 10])
  for (const step of done.steps) {
    t.ok(Math.abs(step.requests + step.skipped - step.target_rps) <= 1, `step ${step.index}: ${step.requests} sent + ${step.skipped} skipped for ${step.target_rps} rps over 1 s`)
    t.equal(step.errors, 0)
    t.equal(step.completed, step.requests)
    t.ok(step.latency_ms.p50 > 0 && step.latency_ms.p99 >= step.latency_ms.p50)
    t.ok(step.achieved_rps > 0)
  }
  t.equal(done.result.requests, done.steps.reduce((n: number, s: any) => n + s.requests, 0))
  const recorded = (await store.readStream(`benchmark-${perf.body.benchmark_id}`)).map((e) => e.type)
  t.same(recorded, ['BenchmarkStarted', 'BenchmarkStepCompleted', 'BenchmarkStepCompleted', 'BenchmarkStepCompleted', 'BenchmarkCompleted'])
  t.equal((await api('GET', `/projects/${perf.body.project_id}`)).body.completed_tasks, done.result.completed, 'its requests count in its project')

  const quick = await api('POST', '/dashboard/benchmark', { mode: 'inference', requests: 20, concurrency: 2 })
  t.equal(quick.status, 202)
  const inference = await eventually(async () => {
    const r = await api('GET', `/dashboard/benchmark/${quick.body.benchmark_id}`)
    return r.body.status !== 'running' ? r.body : undefined
  }, 60_000, 'the inference benchmark')
  t.match(inference, { status: 'completed', mode: 'inference', result: { requests: 20, completed: 20, errors: 0, devices: Number } })
  t.ok(inference.result.latency_ms.p50 > 0)
  t.equal((await api('GET', `/dashboard/benchmark/perf/${quick.body.benchmark_id}`)).status, 404, 'not a perf benchmark')

  const training = await api('POST', '/dashboard/benchmark', { mode: 'training', epochs: 3, batch_size: 32 })
  t.equal(training.status, 202)
  const trained = await eventually(async () => {
    const r = await api('GET', `/dashboard/benchmark/${training.body.benchmark_id}`)
    return r.body.status !== 'running' ? r.body : undefined
  }, 90_000, 'the training benchmark')
  t.equal(trained.status, 'completed', JSON.stringify(trained))
  // it learned: it stops at the 0.9 target, or after its 3 epochs well above where it began (the untrained
  // benchmark model scores about 0.54: a learning rate of 1e-9 ends its epochs there)
  t.ok(['target_accuracy', 'epochs'].includes(trained.result.end_reason), trained.result.end_reason)
  t.ok(trained.result.validation_accuracy >= (trained.result.end_reason === 'target_accuracy' ? 0.9 : 0.75), `validation accuracy ${trained.result.validation_accuracy}`)
  t.ok(trained.result.rounds > 0 && trained.result.samples > 0)
  t.equal((await api('GET', '/dashboard/benchmark/bench_nope')).status, 404)
})

t.test('benchmarks need devices; one left running by a crash ends as failed when the server starts again', async (t) => {
  const { api, store, projections, database, blobs, hub, scheduler, training } = await trainingSetup(t, { app: { minPerfDurationS: 1 } })
  t.equal((await api('POST', '/dashboard/benchmark', { mode: 'inference' })).body.error.code, 'NO_DEVICES')
  t.equal((await api('POST', '/dashboard/benchmark', { mode: 'training' })).body.error.code, 'NO_TRAINING_DEVICES')
  t.equal((await api('POST', '/dashboard/benchmark/perf', { duration: 2, instance_type: 'aws' })).body.error.code, 'NO_DEVICES')

  const customerId = (await api('GET', '/usage')).body.customer_id
  // as the runner records a step-load run's start: its settings with the benchmark model
  const config = { duration: 60, instance_type: 'all', rps_steps: [2], max_concurrency: 5, model_id: 'model_benchx' }
  const started = { benchmark_id: 'bench_crashed', customer_id: customerId, mode: 'perf', config, project_id: 'proj_x', started_at: new Date().toISOString() }
  const { position } = await store.append('benchmark-bench_crashed', [{ type: 'BenchmarkStarted', data: started, metadata: { schemaVersion: 1 } }])
  await projections.waitFor(position)
  t.equal((await api('GET', '/dashboard/benchmark/bench_crashed')).body.status, 'running')
  const restarted = await buildApp({ store, projections, db: database.db, blobs, hub, scheduler, training, internalToken: INTERNAL_TOKEN, logLevel: 'silent' })
  t.teardown(() => restarted.close())
  const after = await eventually(async () => {
    const r = await api('GET', '/dashboard/benchmark/bench_crashed')
    return r.body.status !== 'running' ? r.body : undefined
  }, 10_000, 'the interrupted benchmark to be recorded')
  t.match(after, { status: 'failed', error: /stopped while it ran/ })
})
