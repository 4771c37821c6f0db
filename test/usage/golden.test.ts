import { readFileSync, writeFileSync } from 'node:fs'
import { sql } from 'kysely'
import t, { type Test } from 'tap'
import { customerDecider } from '../../src/domain/customer.js'
import type { Decider, DomainEvent } from '../../src/domain/decider.js'
import { deviceDecider, HeartbeatReceived } from '../../src/domain/device.js'
import { inferenceDecider } from '../../src/domain/inference-job.js'
import { modelDecider } from '../../src/domain/model.js'
import { projectDecider } from '../../src/domain/project.js'
import { inputCount, taskDecider } from '../../src/domain/task.js'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import type { Database } from '../../src/postgres/database.js'
import { allProjections, Projections, type ProjectionStatus } from '../../src/projections/projections.js'
import { auditUsage } from '../../src/projections/usage-audit.js'
import { freshDatabase } from '../helpers/database.js'
import type { GoldenEvent } from '../helpers/golden.js'

/**
 * Golden streams: a history recorded from a real run (scripts/record-golden.ts), some of it in the shapes
 * events had before tasks carried several inputs and outcomes carried billing dimensions. Replayed through
 * today's deciders and every projection, it must still give what it gave when recorded: an event schema
 * change that breaks old history fails here. GOLDEN_RECORD=1 writes the expected file instead (recording).
 */
const FIXTURE = new URL('../fixtures/golden/usage-v1.jsonl', import.meta.url)
const EXPECTED = new URL('../fixtures/golden/usage-v1.expected.json', import.meta.url)
const RECORD = process.env.GOLDEN_RECORD === '1'


const golden: GoldenEvent[] = readFileSync(FIXTURE, 'utf8').split('\n').filter(Boolean).map((line) => JSON.parse(line))
const expected = RECORD ? undefined : JSON.parse(readFileSync(EXPECTED, 'utf8'))

interface Kind {
  initial(): unknown
  /** Parses one recorded event (upcasting old shapes) and folds it in. */
  step(state: unknown, event: { type: string; data: unknown; schemaVersion: number }): unknown
  /** What of the folded state the fixture records. */
  summary(state: unknown): unknown
}

function kind<C, E extends DomainEvent, S>(decider: Decider<C, E, S>, summary: (state: S) => unknown): Kind {
  return { initial: decider.initialState, step: (state, event) => decider.evolve(state as S, decider.parse(event)), summary: (state) => summary(state as S) }
}

/** Each stream kind (by stream id prefix) and its decider. */
const KINDS: Record<string, Kind> = {
  'customer-': kind(customerDecider, (s) => ({ name: s.name, keys: [...s.keys.values()].map((revoked) => (revoked ? 'revoked' : 'active')) })),
  'model-': kind(modelDecider, (s) => ({ name: s.model?.name, labels: s.model?.labels, deleted: s.deleted })),
  'device-': kind(deviceDecider, (s) => ({ registered: s.registered, connected: s.connected })),
  'project-': kind(projectDecider, (s) => s.status),
  'inference-': kind(inferenceDecider, (s) => ({ tasks: s.request?.tasks, cancelled: s.cancelled })),
  'task-': kind(taskDecider, (s) => ({ status: s.status, attempts: s.attempts, inputs: s.spec && inputCount(s.spec), project: s.spec?.project_id })),
}

/** Folds every stream of the fixture through today's `parse` and `evolve`; heartbeats are only parsed. */
function foldStreams(): Record<string, unknown> {
  const states = new Map<string, { kind: Kind; state: unknown }>()
  let heartbeats = 0
  for (const e of golden) {
    if (e.stream_id.startsWith('heartbeats-')) {
      HeartbeatReceived.parse({ type: e.type, data: e.data })
      heartbeats++
      continue
    }
    const prefix = Object.keys(KINDS).find((p) => e.stream_id.startsWith(p))
    if (!prefix) throw new Error(`stream ${e.stream_id}: a kind this test does not know; add its decider to KINDS`)
    const current = states.get(e.stream_id) ?? { kind: KINDS[prefix]!, state: KINDS[prefix]!.initial() }
    try {
      current.state = current.kind.step(current.state, { type: e.type, data: e.data, schemaVersion: e.metadata.schemaVersion ?? 1 })
    } catch (error) {
      throw new Error(`${e.type} at ${e.stream_id}@${e.revision} no longer parses or folds: ${(error as Error).message}`, { cause: error })
    }
    states.set(e.stream_id, current)
  }
  return { heartbeats, ...Object.fromEntries([...states].map(([stream, s]) => [stream, s.kind.summary(s.state)])) }
}

/** The fixture's events appended in log order, each with its id and the revision it had. */
async function load(database: Database): Promise<PostgresEventStore> {
  const store = new PostgresEventStore(database.pool)
  for (const e of golden) {
    await store.append(e.stream_id, [{ id: e.event_id, type: e.type, data: e.data, metadata: e.metadata }], { expectedRevision: e.revision === 0 ? 'no_stream' : e.revision - 1 })
  }
  return store
}

/** Runs every projection until each has applied the whole log, or fails on the first projection error. */
async function project(t: Test, database: Database, store: PostgresEventStore): Promise<ProjectionStatus[]> {
  const projections = new Projections({ db: database.db, store, retryMs: 50 })
  t.teardown(() => projections.stop())
  projections.start()
  const deadline = Date.now() + 30_000
  for (;;) {
    const status = await projections.status()
    const failed = status.filter((s) => s.lastError !== undefined || s.state === 'failed')
    if (failed.length > 0) throw new Error(`projections failed on the golden history: ${failed.map((s) => `${s.name}: ${s.lastError}`).join('; ')}`)
    if (status.every((s) => s.state === 'live' && s.lag === 0)) return status
    if (Date.now() > deadline) throw new Error(`projections did not catch up: ${JSON.stringify(status)}`)
    await new Promise((r) => setTimeout(r, 50))
  }
}

/** Rows as JSON would carry them: dates as ISO strings, bigints (strings from pg) as numbers where named. */
function plain(rows: Record<string, unknown>[], numbers: readonly string[] = []): Record<string, unknown>[] {
  return rows.map((row) => Object.fromEntries(Object.entries(row).map(([k, v]) => [k, v instanceof Date ? v.toISOString() : numbers.includes(k) ? Number(v) : v])))
}

/** What the read models say after the replay: the usage audit, usage rows, and the other read models. */
async function readModels(database: Database, store: PostgresEventStore) {
  const { db } = database
  const audit = await auditUsage({ db, store })
  const measures = ['tasks', 'cpu_tasks', 'gpu_tasks', 'inputs', 'cpu_us', 'gpu_us', 'bytes_in', 'bytes_out']
  const usageRows = await sql<Record<string, unknown>>`select * from rm_usage.usage_hourly order by customer_id, project_id, hour, sdk_uuid, instance_type, outcome`.execute(db)
  const q = async (query: ReturnType<typeof sql>) => plain((await query.execute(db)).rows as Record<string, unknown>[])
  const counts: Record<string, number> = {}
  for (const projection of allProjections) {
    for (const table of projection.tables) {
      const { rows } = await sql<{ n: string }>`select count(*) as n from ${sql.table(`rm_${projection.name}.${table.name}`)}`.execute(db)
      counts[`${projection.name}.${table.name}`] = Number(rows[0]!.n)
    }
  }
  return {
    usage: { ok: audit.ok, digest: audit.digest, liveDigest: audit.liveDigest, totals: audit.totals, rows: plain(usageRows.rows, measures) },
    inference_jobs: await q(sql`select * from rm_inference.inference_jobs order by requested_at, job_id`),
    inference_results: await q(sql`select task_id, job_id, first_idx, count, status, outputs, error, device_id, finished_at from rm_inference.inference_results order by job_id, first_idx`),
    projects: await q(sql`select * from rm_projects.projects order by created_at, project_id`),
    tasks: await q(sql`select task_id, status, attempts, device_id, error from rm_tasks.tasks order by task_id`),
    row_counts: counts,
  }
}

t.test('the golden history holds events in the old shapes the upcasters exist for', async (t) => {
  const count = (f: (e: GoldenEvent) => boolean) => golden.filter(f).length
  t.ok(count((e) => e.type === 'InferenceRequested' && 'task_ids' in e.data && !('tasks' in e.data)) > 0, 'InferenceRequested with task_ids')
  t.ok(count((e) => e.type === 'TaskQueued' && 'input' in e.data && !('inputs' in e.data)) > 0, 'TaskQueued with input')
  t.ok(count((e) => e.type === 'TaskQueued' && (e.data.inputs as unknown[] | undefined)?.length! > 1) > 0, 'and with several inputs')
  t.ok(count((e) => e.type === 'TaskCompleted' && 'output' in e.data && !('outputs' in e.data)) > 0, 'TaskCompleted with output')
  t.ok(count((e) => e.type === 'TaskLeased' && !('sdk_uuid' in e.data)) > 0, 'TaskLeased without sdk_uuid')
  for (const type of ['TaskCompleted', 'TaskAttemptFailed']) {
    const old = count((e) => e.type === type && !('project_id' in e.data || 'sdk_uuid' in e.data || 'instance_type' in e.data || 'inputs' in e.data))
    t.ok(old > 0, `${type} without project_id, sdk_uuid, instance_type, inputs`)
  }
  for (const type of ['TaskFailed', 'TaskCancelled', 'InferenceCancelled', 'ProjectCompleted', 'ApiKeyRevoked', 'ModelSchemaUpdated', 'DeviceDisconnected', 'HeartbeatReceived']) {
    t.ok(count((e) => e.type === type) > 0, `a ${type}`)
  }
  t.ok(golden.every((e) => typeof e.metadata.schemaVersion === 'number'), 'every event records its schema version')
})

t.test("every recorded stream parses and folds through today's deciders to the state it had", async (t) => {
  const states = foldStreams()
  if (RECORD) return
  t.same(states, expected.states)
})

t.test('the golden history replays through every projection to the recorded read models', async (t) => {
  const database = await freshDatabase(t)
  const store = await load(database)
  t.teardown(() => store.close())
  const status = await project(t, database, store)
  t.same(status.map((s) => s.name).sort(), allProjections.map((p) => p.name).sort(), 'every projection ran')
  t.ok(status.every((s) => s.lastError === undefined), 'none failed')
  const got = await readModels(database, store)
  t.equal(got.usage.ok, true, 'the audit finds the live usage equal to its replay')
  t.equal(got.usage.digest, got.usage.liveDigest)
  if (RECORD) {
    writeFileSync(EXPECTED, `${JSON.stringify({ fixture: 'usage-v1.jsonl', events: golden.length, states: foldStreams(), ...got }, null, 2)}\n`)
    return
  }
  t.equal(golden.length, expected.events)
  t.same(got.usage.totals, expected.usage.totals, 'usage totals per customer and hour')
  t.equal(got.usage.digest, expected.usage.digest, 'usage digest')
  t.same(got.usage.rows, expected.usage.rows, 'usage rows')
  t.same(got.inference_jobs, expected.inference_jobs, 'inference jobs')
  t.same(got.inference_results, expected.inference_results, 'inference results')
  t.same(got.projects, expected.projects, 'projects')
  t.same(got.tasks, expected.tasks, 'tasks')
  t.same(got.row_counts, expected.row_counts, 'rows in every read model')
})

t.test('the usage totals are the sums over the recorded outcomes, computed here from the raw events', async (t) => {
  if (RECORD) return
  // independent of the projection: completions and failed attempts straight from the fixture's JSON
  const byCustomer = new Map<string, { tasks: number; cpu_us: number; inputs: number; failed: number }>()
  const jobs = new Map<string, string>()
  for (const e of golden) if (e.type === 'TaskQueued') jobs.set(e.data.task_id as string, e.data.customer_id as string)
  for (const e of golden) {
    if (e.type !== 'TaskCompleted' && e.type !== 'TaskAttemptFailed') continue
    const customer = e.data.customer_id as string
    t.equal(customer, jobs.get(e.data.task_id as string), 'an outcome names its task\'s customer')
    const sum = byCustomer.get(customer) ?? { tasks: 0, cpu_us: 0, inputs: 0, failed: 0 }
    if (e.type === 'TaskAttemptFailed') sum.failed++
    else {
      sum.tasks++
      sum.cpu_us += Math.round((e.data.metrics as { cpu_ms: number }).cpu_ms * 1000)
      sum.inputs += (e.data.inputs as number | undefined) ?? 1
    }
    byCustomer.set(customer, sum)
  }
  const totals = new Map<string, { tasks: number; cpu_us: number; inputs: number; failed: number }>()
  for (const r of expected.usage.totals as { customer_id: string; tasks: number; cpu_ms: number; inputs: number; failed_attempts: number }[]) {
    const sum = totals.get(r.customer_id) ?? { tasks: 0, cpu_us: 0, inputs: 0, failed: 0 }
    totals.set(r.customer_id, { tasks: sum.tasks + r.tasks, cpu_us: sum.cpu_us + Math.round(r.cpu_ms * 1000), inputs: sum.inputs + r.inputs, failed: sum.failed + r.failed_attempts })
  }
  t.same(Object.fromEntries(totals), Object.fromEntries(byCustomer))
})
