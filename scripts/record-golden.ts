/**
 * `npx tsx scripts/record-golden.ts`: records test/fixtures/golden/usage-v1.jsonl and its expected results.
 *
 * 1. Runs a real scenario against today's code (the test wiring: the HTTP API, the scheduler, the device
 *    hub, simulated devices on real sockets): two customers, key issue and revoke, a model, a schema patch,
 *    named and automatic projects, single and batch jobs (tasks of several inputs), an attempt that fails
 *    and is re-queued, one lost with its device, a task that fails for good, a job cancelled while queued
 *    and one while leased, devices connecting, heartbeating and disconnecting.
 * 2. Dumps the log in its stored shape, one event a line.
 * 3. Rewrites the events of the first jobs (single inputs, no project) into the shapes written before tasks
 *    carried several inputs and outcomes carried billing dimensions (see the upcasters in task.ts and
 *    inference-job.ts): `task_ids`, `input`, `output`, no `project_id`/`output_shape`/`sdk_uuid`/
 *    `instance_type`/`inputs`; and moves that first stretch of the log (up to the last old job's event)
 *    ERA_SHIFT_MS earlier, as old history is, so that the usage spans more than one hour.
 * 4. Runs test/usage/golden.test.ts with GOLDEN_RECORD=1: it loads the rewritten log into a fresh
 *    database, runs every projection and writes what they give to usage-v1.expected.json (without it, the
 *    test compares them with that file).
 * Recording again gives other ids and times: the fixture is recorded once and then kept as history, so an
 * existing one is replaced only with `--force` (a new schema era gets a new file, e.g. usage-v2.jsonl).
 * Starts an embedded Postgres unless DATABASE_URL is set.
 */
import { spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { existsSync } from 'node:fs'
import { mkdir, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import type { Test } from 'tap'
import { START, type RecordedEvent } from '../src/event-store/port.js'
import { startEmbeddedPostgres } from '../src/postgres/embedded.js'
import { ADMIN_KEY, multipart, testApp } from '../test/helpers/app.js'
import { eventually, SimDevice } from '../test/helpers/device.js'
import { denseOnnxModel } from '../test/helpers/onnx.js'
import type { GoldenEvent } from '../test/helpers/golden.js'


const DIR = path.resolve('test/fixtures/golden')
const FIXTURE = path.join(DIR, 'usage-v1.jsonl')
/** How much earlier the old stretch of the log happened: 41 days and 3 hours. */
const ERA_SHIFT_MS = (41 * 24 + 3) * 3_600_000

const teardowns: (() => unknown)[] = []
/** testApp and freshDatabase want a tap Test only to register their teardowns. */
const t = { teardown: (f: () => unknown) => teardowns.unshift(f) } as unknown as Test

/** What a simulated device answers: fixed fractional metrics, a failure where the scenario wants one. */
function answer(device: SimDevice, options: { gpu: boolean; failFirst?: boolean }) {
  let n = 0
  let failed = !options.failFirst
  device.socket.on('message', (raw) => {
    const frame = JSON.parse(raw.toString())
    if (frame.type !== 'task') return
    const inputs: { data: number[] }[] = frame.inputs ?? [frame.input]
    const metrics = { cpu_ms: 12.345 + (n++ % 4) * 0.5 * inputs.length, gpu_ms: options.gpu ? 3.25 * inputs.length : 0, bytes_in: 40 * inputs.length, bytes_out: 8 * inputs.length }
    const base = { type: 'task_result', task_id: frame.task_id, lease_id: frame.lease_id, metrics }
    // a poison input (-1 first) fails on every device; the flaky device also fails its first task
    if (inputs.some((i) => i.data[0] === -1) || !failed) {
      failed = true
      setTimeout(() => device.send({ ...base, status: 'failed', error: inputs[0]!.data[0] === -1 ? 'model error: NaN in output' : 'device error: out of memory' }), 5)
      return
    }
    const outputs = inputs.map((i) => ({ data: [0.25 + i.data[0]! / 100, 0.75 - i.data[0]! / 100], shape: [1, 2] }))
    setTimeout(() => device.send({ ...base, status: 'completed', ...(frame.inputs ? { outputs } : { output: outputs[0] }) }), 5)
  })
}

const tensor = (seed: number) => ({ data: Array.from({ length: 10 }, (_, i) => Math.round(((i + 1) * (seed + 1)) / 10 * 100) / 100), shape: [1, 10] })

type Scenario = Awaited<ReturnType<typeof setup>>

async function record(): Promise<{ events: RecordedEvent[]; oldJobs: Set<string> }> {
  const scenario = await setup()
  const oldJobs = await oldEra(scenario)
  await today(scenario)
  await dropAndCancel(scenario)
  const { store, projections } = scenario.ctx
  await projections.waitFor(await store.headPosition())
  await eventually(async () => (await store.readAll(START, 100_000)).filter((e) => e.type === 'DeviceDisconnected').length === 4, 10_000, 'disconnects')
  return { events: await store.readAll(START, 100_000), oldJobs }
}

/** The app on a socket, two customers (a key issued and revoked), a model each, a flaky laptop and a GPU cloud instance. */
async function setup() {
  const ctx = await testApp(t, { rateLimit: { max: 100_000, windowMs: 60_000 } }, { heartbeatIntervalMs: 20_000, leaseTimeoutMs: 20_000 })
  const url = await ctx.app.listen({ port: 0, host: '127.0.0.1' })
  const call = async (key: string, method: string, route: string, payload?: unknown) => {
    const r = await ctx.app.inject({ method: method as 'GET', url: `/api/v1${route}`, headers: { 'x-api-key': key }, ...(payload !== undefined ? { payload: payload as object } : {}) })
    if (r.statusCode >= 300) throw new Error(`${method} ${route}: ${r.statusCode} ${r.body}`)
    return r.json()
  }
  const admin = (method: string, route: string) => ctx.app.inject({ method: method as 'POST', url: `/api/v1${route}`, headers: { 'x-admin-key': ADMIN_KEY } })
  const done = (key: string, jobId: string) => eventually(async () => ['completed', 'failed', 'cancelled'].includes((await call(key, 'GET', `/inference/${jobId}`)).status), 30_000, jobId)
  const upload = async (key: string, name: string) => {
    const body = multipart({ name }, { name: `${name}.onnx`, content: denseOnnxModel({ inputs: 10, outputs: 2 }) })
    const r = await ctx.app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...body.headers, 'x-api-key': key }, payload: body.payload })
    if (r.statusCode !== 201) throw new Error(`upload: ${r.statusCode} ${r.body}`)
    return r.json().id as string
  }
  const alice = await ctx.customer('Alice Analytics')
  const bob = await ctx.customer('Bob Robotics')
  const spare = (await admin('POST', `/admin/customers/${alice.id}/keys`)).json()
  await admin('DELETE', `/admin/customers/${alice.id}/keys/${spare.key_id}`)
  const aliceModel = await upload(alice.key, 'churn-classifier')
  const bobModel = await upload(bob.key, 'grasp-scorer')
  await call(alice.key, 'PATCH', `/models/${aliceModel}/schema`, { labels: ['stays', 'churns'] })
  const laptop = await SimDevice.connect(url)
  await laptop.register({ sdkUuid: 'sdk-nodejs-g01a7c', instanceType: 'user', maxTasks: 1, batchInputs: 4 })
  answer(laptop, { gpu: false, failFirst: true })
  const cloud = await SimDevice.connect(url)
  // a cloud device is one the platform enrolled as such, with an aws enrollment token
  await cloud.register({ sdkUuid: 'sdk-python-g02b9e', instanceType: 'aws', maxTasks: 1, batchInputs: 4, enrollmentToken: (await ctx.enrollmentToken({ instance_type: 'aws' })).token })
  answer(cloud, { gpu: true })
  laptop.heartbeat([], 0.1)
  cloud.heartbeat([], 0.3)
  return { ctx, url, call, done, alice: { ...alice, model: aliceModel }, bob: { ...bob, model: bobModel }, laptop, cloud }
}

/** The old era: single jobs, no project, one after the other (rewritten into the old shapes afterwards). */
async function oldEra({ call, done, alice, bob, laptop, cloud }: Scenario): Promise<Set<string>> {
  const oldJobs = new Set<string>()
  for (let i = 0; i < 10; i++) {
    const who = i % 3 === 2 ? bob : alice
    const job = await call(who.key, 'POST', '/inference?async=true', { model_id: who.model, input: tensor(i) })
    oldJobs.add(job.job_id)
    await done(who.key, job.job_id)
    if (i === 4) [laptop, cloud].forEach((d) => d.heartbeat([], 0.2))
  }
  return oldJobs
}

/** Today: projects (named, automatic, one completed by hand), batches of multi-input tasks, sync calls, a task that fails for good. */
async function today({ call, done, alice, bob, laptop, cloud }: Scenario): Promise<void> {
  const nightly = await call(alice.key, 'POST', '/projects', { name: 'nightly-scoring', type: 'batch', model_id: alice.model, total_tasks: 16 })
  const live = await call(alice.key, 'POST', '/projects', { name: 'live-feed', type: 'realtime' })
  const batch = (inputs: number, from: number) => Array.from({ length: inputs }, (_, i) => tensor(from + i))
  const scoring = await call(alice.key, 'POST', '/inference/batch', { model_id: alice.model, project_id: nightly.project_id, name: 'scoring 2026-03', inputs: batch(16, 10) })
  const backfill = await call(alice.key, 'POST', '/inference/batch', { model_id: alice.model, name: 'backfill', inputs: batch(64, 30) })
  for (let i = 0; i < 6; i++) await call(alice.key, 'POST', '/inference', { model_id: alice.model, project_id: live.project_id, input: tensor(100 + i) })
  const poison = await call(alice.key, 'POST', '/inference?async=true', { model_id: alice.model, project_id: live.project_id, input: { data: [-1, ...tensor(0).data.slice(1)], shape: [1, 10] } })
  for (const job of [scoring.job_id, backfill.job_id, poison.job_id]) await done(alice.key, job)
  await call(alice.key, 'POST', `/projects/${live.project_id}/complete`)
  ;[laptop, cloud].forEach((d) => d.heartbeat([], 0.4))
  for (let i = 0; i < 4; i++) await call(bob.key, 'POST', '/inference', { model_id: bob.model, input: tensor(120 + i) })
  const grasp = await call(bob.key, 'POST', '/inference/batch', { model_id: bob.model, name: 'grasp calibration', inputs: batch(20, 140) })
  await done(bob.key, grasp.job_id)
}

/**
 * A phone that drops mid-task (the attempt is lost and re-queued), then a device that never answers: the
 * re-queued task waits on it, a job queued behind it is cancelled, and so is the task it holds.
 */
async function dropAndCancel({ ctx, url, call, bob, laptop, cloud }: Scenario): Promise<void> {
  laptop.kill()
  cloud.kill()
  await eventually(async () => ctx.hub.connections === 0, 10_000, 'devices gone')
  const phone = await SimDevice.connect(url)
  await phone.register({ sdkUuid: 'sdk-nodejs-g04e81', instanceType: 'user', maxTasks: 1, batchInputs: 1 })
  const dropped = await call(bob.key, 'POST', '/inference?async=true', { model_id: bob.model, input: tensor(90) })
  await phone.next((f) => f.type === 'task')
  phone.kill()
  await eventually(async () => ctx.hub.connections === 0, 10_000, 'phone gone')
  const stuck = await SimDevice.connect(url)
  await stuck.register({ sdkUuid: 'sdk-windows-g03d2f', instanceType: 'user', maxTasks: 1, batchInputs: 1 })
  await stuck.next((f) => f.type === 'task')
  stuck.heartbeat([], 0.9)
  const held = await call(bob.key, 'POST', '/inference/batch', { model_id: bob.model, name: 'grasp sweep', inputs: [tensor(80), tensor(81), tensor(82)] })
  for (const job of [held.job_id, dropped.job_id]) {
    await call(bob.key, 'GET', `/inference/${job}`) // waits for the read model, which DELETE does not (yet)
    await call(bob.key, 'DELETE', `/inference/${job}`)
  }
  await stuck.next((f) => f.type === 'cancel_task')
  stuck.kill()
}

/** The stored shape of each event; the old jobs' events as they were written before the upcasters' changes. */
function oldShapes(events: RecordedEvent[], oldJobs: Set<string>): GoldenEvent[] {
  const jobOf = (e: RecordedEvent) => (e.streamId.startsWith('task-') ? e.streamId.slice('task-'.length).replace(/-\d+$/, '') : ((e.data as { job_id?: string }).job_id ?? ''))
  const lastOld = events.findLastIndex((e) => oldJobs.has(jobOf(e)))
  const rewritten = new Set<string>()
  const golden = events.map((e, i): GoldenEvent => {
    let data = { ...(e.data as Record<string, unknown>) }
    let metadata = e.metadata as GoldenEvent['metadata']
    if (oldJobs.has(jobOf(e))) {
      data = downgrade(e.type, data)
      rewritten.add(e.type)
    }
    if (i <= lastOld) {
      data = shiftTimes(data)
      metadata = shiftTimes(metadata)
    }
    return { stream_id: e.streamId, revision: e.revision, event_id: e.id, type: e.type, data, metadata }
  })
  for (const type of ['InferenceRequested', 'TaskQueued', 'TaskLeased', 'TaskCompleted', 'TaskAttemptFailed']) {
    if (!rewritten.has(type)) throw new Error(`the old era has no ${type} to rewrite: the scenario did not go as planned`)
  }
  return golden
}

/** An event's data as the deciders before multi-input tasks and usage metering wrote it. */
function downgrade(type: string, data: Record<string, unknown>): Record<string, unknown> {
  const drop = (...keys: string[]) => keys.forEach((k) => delete data[k])
  if (type === 'InferenceRequested') {
    data.task_ids = (data.tasks as { task_id: string }[]).map((x) => x.task_id)
    drop('tasks')
  } else if (type === 'TaskQueued') {
    data.input = (data.inputs as unknown[])[0]
    drop('inputs', 'project_id', 'output_shape')
  } else if (type === 'TaskLeased') {
    drop('sdk_uuid', 'instance_type')
  } else if (type === 'TaskCompleted' || type === 'TaskAttemptFailed') {
    if (type === 'TaskCompleted') data.output = (data.outputs as unknown[])[0]
    drop('outputs', 'project_id', 'sdk_uuid', 'instance_type', 'inputs')
  }
  return reorder(type, data)
}

const ISO = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/

/** Every ISO time at the top level (`*_at`, `at`, `occurredAt`) moved ERA_SHIFT_MS earlier. */
function shiftTimes<T extends Record<string, unknown>>(object: T): T {
  return Object.fromEntries(Object.entries(object).map(([k, v]) => [k, typeof v === 'string' && ISO.test(v) ? new Date(Date.parse(v) - ERA_SHIFT_MS).toISOString() : v])) as T
}

/** Keys in the order the old deciders wrote them (the replacement field where the new one was). */
function reorder(type: string, data: Record<string, unknown>): Record<string, unknown> {
  const at = Object.keys(data).find((k) => k.endsWith('_at'))
  if (!at || !['TaskQueued', 'TaskCompleted', 'InferenceRequested'].includes(type)) return data
  const { [at]: when, ...rest } = data
  return { ...rest, [at]: when }
}

if (existsSync(FIXTURE) && !process.argv.includes('--force')) {
  console.error(`${FIXTURE} exists: it is recorded history, which golden.test.ts replays. Pass --force to record it again.`)
  process.exit(2)
}
const dataDir = path.join(tmpdir(), `dcp-golden-pg-${process.pid}-${randomBytes(3).toString('hex')}`)
const server = process.env.DATABASE_URL ? undefined : await startEmbeddedPostgres(dataDir)
process.env.DATABASE_URL ??= server!.url

try {
  try {
    const recorded = await record()
    const golden = oldShapes(recorded.events, recorded.oldJobs)
    await mkdir(DIR, { recursive: true })
    await writeFile(FIXTURE, golden.map((e) => JSON.stringify(e)).join('\n') + '\n')
    console.log(`${golden.length} events -> ${FIXTURE}`)
  } finally {
    for (const f of teardowns) await f()
  }
  const tap = path.resolve('node_modules/tap/dist/esm/run.mjs')
  const run = spawnSync(process.execPath, [tap, 'test/usage/golden.test.ts'], { stdio: 'inherit', env: { ...process.env, GOLDEN_RECORD: '1' } })
  if (run.status !== 0) process.exitCode = 1
} finally {
  await server?.stop()
  await rm(dataDir, { recursive: true, force: true })
}
