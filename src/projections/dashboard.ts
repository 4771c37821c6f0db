import { type Kysely, sql } from 'kysely'
import { liveSchema } from './projection.js'
import { jobStatus } from './inference.js'
import { PROJECT_STATUS_SQL, type ProjectRow, type ProjectView, projectView } from './projects.js'
import type { INSTANCE_TYPES, PLATFORMS } from '../protocol/frames.js'
import type { PROJECT_TYPES } from '../domain/project.js'
import { trainingStatus } from '../domain/training-job.js'

/**
 * The dashboard's views, read from the existing read models (devices, inference, training, projects,
 * tasks): each aggregates in SQL and returns a bounded page, so none loads a whole table.
 */
const DEVICES = liveSchema('devices')
const INFERENCE = liveSchema('inference')
const TRAINING = liveSchema('training')
const PROJECTS = liveSchema('projects')
const TASKS = liveSchema('tasks')

const DEVICE_STATUS = sql<string>`case when not connected then 'offline' when running_tasks > 0 then 'busy' else 'idle' end`
const STATUSES = ['idle', 'busy', 'offline'] as const
type Platform = (typeof PLATFORMS)[number]
type InstanceType = (typeof INSTANCE_TYPES)[number]
type ProjectType = (typeof PROJECT_TYPES)[number]
/** The tasks read model's states of a task. */
type TaskStatus = 'queued' | 'leased' | 'completed' | 'failed' | 'cancelled'
type Counts = { total: number; idle: number; busy: number; offline: number }
const zero = (): Counts => ({ total: 0, idle: 0, busy: 0, offline: 0 })

/** The fleet by platform and by instance type (every platform listed), and a page of devices. */
export async function fleet(db: Kysely<any>, page: { limit: number; offset: number }) {
  const q = db.withSchema(DEVICES)
  const [groups, rows] = await Promise.all([
    q.selectFrom('devices').select(['platform', 'instance_type', DEVICE_STATUS.as('status'), sql<string>`count(*)`.as('n')]).groupBy(['platform', 'instance_type', sql`3`]).execute(),
    q.selectFrom('devices').selectAll().select(DEVICE_STATUS.as('status')).orderBy('connected', 'desc').orderBy('device_id').limit(page.limit).offset(page.offset).execute(),
  ])
  const byPlatform: Record<string, Counts> = { nodejs: zero(), python: zero(), windows: zero() }
  const byType: Record<string, Counts> = { aws: zero(), user: zero() }
  const total = zero()
  for (const g of groups) {
    const n = Number(g.n)
    const status = g.status as (typeof STATUSES)[number]
    for (const counts of [total, (byPlatform[g.platform] ??= zero()), (byType[g.instance_type] ??= zero())]) {
      counts.total += n
      counts[status] += n
    }
  }
  const devices = rows.map((r) => ({
    id: r.device_id as string,
    platform: r.platform as Platform,
    instance_type: r.instance_type as InstanceType,
    status: r.status as (typeof STATUSES)[number],
    load: r.load as number | null,
    power_watts: r.power_watts as number | null,
    running_tasks: r.running_tasks as number,
    gpu: Boolean(r.capabilities?.gpu),
    can_train: Boolean(r.capabilities?.can_train),
    last_seen_at: r.last_seen_at as string,
    banned: r.banned_at ? { reason: r.banned_reason as string, at: r.banned_at as string } : null,
    quarantined: r.quarantined_at ? { reason: r.quarantine_reason as string, at: r.quarantined_at as string } : null,
  }))
  return { total: total.total, counts: total, by_platform: byPlatform, by_instance_type: byType, devices }
}

/** Inference and training jobs of the last `days` days, most recently active first. */
export async function recentJobs(db: Kysely<any>, customerId: string, options: { type?: 'inference' | 'training' | undefined; since: string; limit: number; offset: number }) {
  const inference = sql`select job_id, 'inference' as type, model_id, project_id, requested_at as created_at, updated_at,
      total_tasks, completed, failed, cancelled, null::text as phase, 0 as devices, 0::bigint as batches_completed, 0 as total_batches
    from ${sql.table(`${INFERENCE}.inference_jobs`)} where customer_id = ${customerId} and updated_at >= ${options.since}`
  const training = sql`select job_id, 'training' as type, model_id, null::text as project_id, submitted_at as created_at, updated_at,
      0 as total_tasks, 0 as completed, 0 as failed, false as cancelled, phase, jsonb_array_length(devices) as devices, batches_completed,
      (spec->>'total_batches')::int as total_batches
    from ${sql.table(`${TRAINING}.training_jobs`)} where customer_id = ${customerId} and updated_at >= ${options.since}`
  const union = options.type === 'inference' ? inference : options.type === 'training' ? training : sql`${inference} union all ${training}`
  const [rows, count] = await Promise.all([
    sql<Record<string, any>>`select * from (${union}) jobs order by updated_at desc, job_id limit ${options.limit} offset ${options.offset}`.execute(db),
    sql<{ n: string }>`select count(*) as n from (${union}) jobs`.execute(db),
  ])
  const jobs = rows.rows.map((r) => {
    const training = r.type === 'training'
    const completed = training ? Number(r.batches_completed) : r.completed + r.failed
    const total = training ? r.total_batches : r.total_tasks
    return {
      job_id: r.job_id as string,
      type: r.type as 'inference' | 'training',
      status: training ? trainingStatus(r.phase, r.devices) : jobStatus(r as never),
      model_id: r.model_id as string,
      project_id: r.project_id as string | null,
      created_at: r.created_at as string,
      updated_at: r.updated_at as string,
      progress: { completed, total, percent: total > 0 ? Math.min(100, Math.round((completed / total) * 1000) / 10) : 0 },
    }
  })
  return { jobs, total: Number(count.rows[0]?.n ?? 0) }
}

/** The customer's most recent projects, active ones first. */
export async function recentProjects(db: Kysely<any>, customerId: string, limit: number) {
  const rows = (await db
    .withSchema(PROJECTS)
    .selectFrom('projects')
    .selectAll()
    .where('customer_id', '=', customerId)
    .orderBy(sql`case when ${PROJECT_STATUS_SQL} = 'active' then 0 else 1 end`)
    .orderBy('created_at', 'desc')
    .orderBy('project_id')
    .limit(limit)
    .execute()) as ProjectRow[]
  // the read model holds a project's type and state as text: PROJECT_TYPES, and active, completed or cancelled
  return rows.map((row) => projectView(row) as Omit<ProjectView, 'type' | 'status'> & { type: ProjectType; status: 'active' | 'completed' | 'cancelled' })
}

/** The customer's latest tasks, with their project, device, kind of device and latency where known. */
export async function recentTasks(db: Kysely<any>, customerId: string, options: { limit: number; projectId?: string | undefined }) {
  // every figure from the tasks read model: the projects one holds only the tasks of a project
  const project = options.projectId === undefined ? sql`` : sql`and t.project_id = ${options.projectId}`
  const rows = await sql<Record<string, any>>`
    select t.task_id, t.job_id, t.project_id, t.status, t.device_id, t.instance_type, t.inputs, t.attempts, t.queued_at,
      t.finished_at, t.latency_ms, t.updated_at
    from ${sql.table(`${TASKS}.tasks`)} t
    where t.customer_id = ${customerId} ${project}
    order by t.updated_at desc, t.task_id limit ${options.limit}`.execute(db)
  return rows.rows.map((r) => ({
    task_id: r.task_id as string,
    job_id: r.job_id as string,
    project_id: (r.project_id ?? null) as string | null,
    status: r.status as TaskStatus,
    device_id: (r.device_id ?? null) as string | null,
    instance_type: (r.instance_type ?? null) as string | null,
    inputs: (r.inputs ?? null) as number | null,
    attempts: r.attempts as number,
    queued_at: r.queued_at as string,
    finished_at: r.finished_at ? new Date(r.finished_at).toISOString() : null,
    latency_ms: r.latency_ms === null || r.latency_ms === undefined ? null : Math.round(r.latency_ms * 100) / 100,
  }))
}

/** Completed tasks and inputs per bucket of `bucketSize` seconds, the latest `buckets` of them. */
export async function taskThroughput(db: Kysely<any>, customerId: string, options: { projectId?: string | undefined; bucketSize: number; buckets: number; now: Date }) {
  const since = new Date(options.now.getTime() - options.bucketSize * options.buckets * 1000).toISOString()
  const project = options.projectId === undefined ? sql`` : sql`and t.project_id = ${options.projectId}`
  // every task of the customer's (the tasks read model), in a project or not; finished_at is ISO 8601 text
  const rows = await sql<{ t: number; completed: string; inputs: string }>`
    select floor(extract(epoch from t.finished_at::timestamptz) / ${options.bucketSize}) * ${options.bucketSize} as t, count(*) as completed, sum(t.inputs) as inputs
    from ${sql.table(`${TASKS}.tasks`)} t
    where t.customer_id = ${customerId} and t.status = 'completed' and t.finished_at >= ${since} ${project}
    group by 1 order by 1`.execute(db)
  return rows.rows.map((r) => ({ t: new Date(Number(r.t) * 1000).toISOString(), completed: Number(r.completed), inputs: Number(r.inputs), inputs_per_s: Math.round((Number(r.inputs) / options.bucketSize) * 1000) / 1000 }))
}

/** A project's figures for its live stream: counts, latency percentiles, and inputs per second over the last window. */
export async function projectLiveStats(db: Kysely<any>, project: ProjectRow, windowSeconds: number, now: Date) {
  const since = new Date(now.getTime() - windowSeconds * 1000)
  const stats = await sql<{ p50: number | null; p95: number | null; p99: number | null; recent: string | null }>`
    select percentile_cont(0.5) within group (order by latency_ms) as p50,
      percentile_cont(0.95) within group (order by latency_ms) as p95,
      percentile_cont(0.99) within group (order by latency_ms) as p99,
      sum(inputs) filter (where finished_at >= ${since}) as recent
    from ${sql.table(`${PROJECTS}.project_tasks`)} where project_id = ${project.project_id} and status = 'completed'`.execute(db)
  const s = stats.rows[0]
  const view = projectView(project)
  const ms = (v: number | null | undefined) => (v === null || v === undefined ? null : Math.round(v * 100) / 100)
  return {
    project_id: view.project_id,
    name: view.name,
    status: view.status,
    submitted: view.submitted_tasks,
    completed: view.completed_tasks,
    failed: view.failed_tasks,
    pending: view.pending_tasks,
    percent_complete: view.percent_complete,
    inputs_per_s: Math.round((Number(s?.recent ?? 0) / windowSeconds) * 1000) / 1000,
    latency_ms: { p50: ms(s?.p50), p95: ms(s?.p95), p99: ms(s?.p99) },
    at: now.toISOString(),
  }
}

/** Fleet figures from the devices read model: connected devices, mean load, power drawn now. */
export async function fleetNow(db: Kysely<any>) {
  const row = await db
    .withSchema(DEVICES)
    .selectFrom('devices')
    .select([
      sql<string>`count(*)`.as('total'),
      sql<string>`count(*) filter (where connected)`.as('connected'),
      sql<string>`count(*) filter (where connected and running_tasks > 0)`.as('busy'),
      sql<number | null>`avg(load) filter (where connected)`.as('load'),
      sql<number | null>`sum(power_watts) filter (where connected)`.as('power'),
      sql<string>`count(*) filter (where connected and (capabilities->>'gpu')::boolean)`.as('gpus'),
    ])
    .executeTakeFirst()
  return {
    total: Number(row?.total ?? 0),
    connected: Number(row?.connected ?? 0),
    busy: Number(row?.busy ?? 0),
    meanLoad: row?.load === null || row?.load === undefined ? null : Math.round(row.load * 1000) / 1000,
    powerWatts: Math.round(Number(row?.power ?? 0) * 10) / 10,
    gpuDevices: Number(row?.gpus ?? 0),
  }
}

/** Training jobs not finished, running (with devices) and queued (without). */
export async function trainingJobCounts(db: Kysely<any>) {
  const row = await db
    .withSchema(TRAINING)
    .selectFrom('training_jobs')
    .select([
      sql<string>`count(*) filter (where phase = 'active' and jsonb_array_length(devices) > 0)`.as('running'),
      sql<string>`count(*) filter (where phase = 'active' and jsonb_array_length(devices) = 0)`.as('queued'),
      sql<string>`count(*) filter (where phase = 'paused')`.as('paused'),
    ])
    .executeTakeFirst()
  return { running: Number(row?.running ?? 0), queued: Number(row?.queued ?? 0), paused: Number(row?.paused ?? 0) }
}
