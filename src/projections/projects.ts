import { type Kysely, sql } from 'kysely'
import { deviceDecider } from '../domain/device.js'
import { PROJECT_TYPES, projectDecider, projectEventTypes } from '../domain/project.js'
import { inputCount, taskDecider } from '../domain/task.js'
import { parseRecorded } from '../domain/decider.js'
import { liveSchema, type Projection } from './projection.js'
import { RowSet } from './rows.js'

/**
 * Projects and what ran in them: a row per project with its counts (in inputs), a row per task of a
 * project with its timing and the kind of device (`aws` or `user`) that ran it, from which the analytics
 * (latency percentiles, throughput over time) are computed. Every time comes from the events, so a rebuild
 * gives the same analytics.
 */
export const projectsProjection: Projection = {
  name: 'projects',
  // 2: a task's instance type is the one its attempt is billed by (TaskLeased, TaskCompleted), not the one
  // its device registered with (a device may connect again as another type)
  // 3: validation
  version: 3,
  filter: { types: [...projectEventTypes, 'DeviceRegistered', 'TaskQueued', 'TaskLeased', 'TaskCompleted', 'TaskFailed', 'TaskCancelled'] },
  tables: [
    { name: 'projects', primaryKey: ['project_id'] },
    { name: 'project_tasks', primaryKey: ['task_id'] },
    { name: 'device_instance_types', primaryKey: ['device_id'] },
  ],

  async createTables(db) {
    await db.schema
      .createTable('projects')
      .addColumn('project_id', 'text', (c) => c.primaryKey())
      .addColumn('customer_id', 'text', (c) => c.notNull())
      .addColumn('name', 'text', (c) => c.notNull())
      .addColumn('type', 'text', (c) => c.notNull())
      .addColumn('model_id', 'text')
      .addColumn('expected_tasks', 'integer')
      .addColumn('validation', 'text')
      /** active, completed or cancelled, as recorded (a batch project that finished its work reads as completed). */
      .addColumn('state', 'text', (c) => c.notNull())
      .addColumn('submitted', 'integer', (c) => c.notNull())
      .addColumn('completed', 'integer', (c) => c.notNull())
      .addColumn('failed', 'integer', (c) => c.notNull())
      .addColumn('cancelled', 'integer', (c) => c.notNull())
      .addColumn('created_at', 'timestamptz', (c) => c.notNull())
      .addColumn('updated_at', 'timestamptz', (c) => c.notNull())
      .addColumn('ended_at', 'timestamptz')
      .execute()
    await db.schema.createIndex('projects_by_customer').on('projects').columns(['customer_id', 'created_at']).execute()
    await db.schema
      .createTable('project_tasks')
      .addColumn('task_id', 'text', (c) => c.primaryKey())
      .addColumn('project_id', 'text', (c) => c.notNull())
      .addColumn('job_id', 'text', (c) => c.notNull())
      .addColumn('inputs', 'integer', (c) => c.notNull())
      .addColumn('status', 'text', (c) => c.notNull())
      .addColumn('device_id', 'text')
      .addColumn('instance_type', 'text')
      .addColumn('queued_at', 'timestamptz', (c) => c.notNull())
      .addColumn('finished_at', 'timestamptz')
      /** From queued to completed. */
      .addColumn('latency_ms', 'double precision')
      .execute()
    await db.schema.createIndex('project_tasks_by_project').on('project_tasks').columns(['project_id', 'status']).execute()
    await db.schema
      .createTable('device_instance_types')
      .addColumn('device_id', 'text', (c) => c.primaryKey())
      .addColumn('instance_type', 'text', (c) => c.notNull())
      .execute()
  },

  async apply(trx, events) {
    const parsed = events.map((recorded) => {
      if (recorded.type.startsWith('Project')) return parseRecorded(projectDecider, recorded)
      if (recorded.type === 'DeviceRegistered') return parseRecorded(deviceDecider, recorded)
      return parseRecorded(taskDecider, recorded)
    })
    const projects = new RowSet<ProjectRecord>('projects', 'project_id')
    const tasks = new RowSet<ProjectTaskRow>('project_tasks', 'task_id')
    const instanceTypes = new RowSet<{ device_id: string; instance_type: string }>('device_instance_types', 'device_id')
    const data = (e: (typeof parsed)[number]) => e.data as { task_id?: string; project_id?: string | null; device_id?: string }
    await tasks.load(trx, parsed.flatMap((e) => (e.type.startsWith('Task') ? [data(e).task_id!] : [])))
    await instanceTypes.load(trx, parsed.flatMap((e) => (e.type === 'TaskLeased' || e.type === 'TaskCompleted' ? [data(e).device_id!] : [])))
    await projects.load(trx, parsed.flatMap((e) => {
      const d = data(e)
      if (d.project_id) return [d.project_id]
      const task = d.task_id ? tasks.get(d.task_id) : undefined
      return task ? [task.project_id] : []
    }))
    const instanceTypeOf = (deviceId: string) => instanceTypes.get(deviceId)?.instance_type ?? null
    const count = (projectId: string, counter: 'submitted' | 'completed' | 'failed' | 'cancelled', n: number, at: string) => {
      const project = projects.get(projectId)
      if (!project) return
      const when = new Date(at)
      projects.update(projectId, { [counter]: project[counter] + n, updated_at: when > new Date(project.updated_at) ? when : project.updated_at })
    }
    /** Ends a project task once (only from queued) and counts its inputs on the project. */
    const finish = (taskId: string, status: 'completed' | 'failed' | 'cancelled', at: string, deviceId?: string, instanceType?: 'aws' | 'user' | null) => {
      const task = tasks.get(taskId)
      if (!task || task.status !== 'queued') return
      const values: Partial<ProjectTaskRow> = { status, finished_at: at }
      if (status === 'completed') values.latency_ms = Date.parse(at) - new Date(task.queued_at).getTime()
      // the type the attempt is billed by (recorded with it); the device's registration only for old events
      if (deviceId) Object.assign(values, { device_id: deviceId, instance_type: instanceType ?? task.instance_type ?? instanceTypeOf(deviceId) })
      tasks.update(taskId, values)
      count(task.project_id, status, task.inputs, at)
    }
    for (const event of parsed) {
      switch (event.type) {
        case 'ProjectCreated': {
          const d = event.data
          projects.insert({ project_id: d.project_id, customer_id: d.customer_id, name: d.name, type: d.project_type, model_id: d.model_id, expected_tasks: d.total_tasks, validation: d.validation, state: 'active', submitted: 0, completed: 0, failed: 0, cancelled: 0, created_at: d.created_at, updated_at: d.created_at, ended_at: null })
          break
        }
        case 'ProjectCompleted':
          projects.update(event.data.project_id, { state: 'completed', ended_at: event.data.completed_at, updated_at: event.data.completed_at })
          break
        case 'ProjectCancelled':
          projects.update(event.data.project_id, { state: 'cancelled', ended_at: event.data.cancelled_at, updated_at: event.data.cancelled_at })
          break
        case 'DeviceRegistered':
          instanceTypes.put({ device_id: event.data.device_id, instance_type: event.data.instance_type })
          break
        case 'TaskQueued': {
          const d = event.data
          if (!d.project_id) break
          const added = tasks.insert({ task_id: d.task_id, project_id: d.project_id, job_id: d.job_id, inputs: inputCount(d), status: 'queued', device_id: null, instance_type: null, queued_at: d.queued_at, finished_at: null, latency_ms: null })
          if (added) count(d.project_id, 'submitted', inputCount(d), d.queued_at)
          break
        }
        case 'TaskLeased':
          tasks.update(event.data.task_id, { device_id: event.data.device_id, instance_type: event.data.instance_type ?? instanceTypeOf(event.data.device_id) })
          break
        case 'TaskCompleted':
          finish(event.data.task_id, 'completed', event.data.completed_at, event.data.device_id, event.data.instance_type)
          break
        case 'TaskFailed':
          finish(event.data.task_id, 'failed', event.data.failed_at)
          break
        case 'TaskCancelled':
          finish(event.data.task_id, 'cancelled', event.data.cancelled_at)
          break
        default:
          break
      }
    }
    await instanceTypes.save(trx)
    await projects.save(trx)
    await tasks.save(trx)
  },
}

/** A projects row as the fold holds it: times as stored (Date) or as the events give them (ISO strings). */
type ProjectRecord = Omit<ProjectRow, 'created_at' | 'updated_at' | 'ended_at'> & Record<string, unknown> & { created_at: Date | string; updated_at: Date | string; ended_at: Date | string | null }

interface ProjectTaskRow extends Record<string, unknown> {
  task_id: string
  project_id: string
  job_id: string
  inputs: number
  status: string
  device_id: string | null
  instance_type: string | null
  queued_at: string | Date
  finished_at: string | Date | null
  /** From queued to completed. */
  latency_ms: number | null
}

const schema = liveSchema(projectsProjection.name)

export interface ProjectRow {
  project_id: string
  customer_id: string
  name: string
  type: (typeof PROJECT_TYPES)[number]
  model_id: string | null
  expected_tasks: number | null
  validation: 'none' | 'spot' | 'quorum' | null
  /** As recorded: a batch project that finished its work is still active here (`projectView` says completed). */
  state: ProjectStatus
  submitted: number
  completed: number
  failed: number
  cancelled: number
  created_at: Date
  updated_at: Date
  ended_at: Date | null
}

export type ProjectStatus = 'active' | 'completed' | 'cancelled'

/** What a client sees of a project (status: a batch project whose expected inputs all finished is completed). */
export function projectView(p: ProjectRow) {
  const total = p.expected_tasks ?? p.submitted
  const done = p.completed + p.failed
  const finished = p.type === 'batch' && p.submitted > 0 && done + p.cancelled >= Math.max(total, p.submitted)
  const status: ProjectStatus = p.state !== 'active' ? p.state : finished ? 'completed' : 'active'
  return {
    project_id: p.project_id,
    name: p.name,
    type: p.type,
    model_id: p.model_id,
    validation: p.validation ?? null,
    status,
    total_tasks: total,
    submitted_tasks: p.submitted,
    completed_tasks: p.completed,
    failed_tasks: p.failed,
    cancelled_tasks: p.cancelled,
    pending_tasks: Math.max(0, p.submitted - done - p.cancelled),
    percent_complete: total > 0 ? Math.round((done / total) * 1000) / 10 : 0,
    created_at: p.created_at.toISOString(),
    updated_at: p.updated_at.toISOString(),
    ...(p.ended_at ? { ended_at: p.ended_at.toISOString() } : {}),
  }
}
export type ProjectView = ReturnType<typeof projectView>

export async function findProject(db: Kysely<any>, customerId: string, projectId: string): Promise<ProjectRow | undefined> {
  return db.withSchema(schema).selectFrom('projects').selectAll().where('project_id', '=', projectId).where('customer_id', '=', customerId).executeTakeFirst() as Promise<ProjectRow | undefined>
}

/** The status `projectView` gives, in SQL (to filter on). */
export const PROJECT_STATUS_SQL = sql<string>`case when state <> 'active' then state
  when type = 'batch' and submitted > 0 and completed + failed + cancelled >= greatest(coalesce(expected_tasks, submitted), submitted) then 'completed'
  else 'active' end`

/** A page of the customer's projects, newest first, and how many match. */
export async function listProjects(db: Kysely<any>, customerId: string, page: { limit: number; offset: number }, filter: { status?: string | undefined; type?: string | undefined }) {
  let query = db.withSchema(schema).selectFrom('projects').where('customer_id', '=', customerId)
  if (filter.type) query = query.where('type', '=', filter.type)
  if (filter.status) query = query.where(PROJECT_STATUS_SQL, '=', filter.status)
  const counted = await query.select(sql<string>`count(*)`.as('n')).executeTakeFirst()
  const rows = (await query.selectAll().orderBy('created_at', 'desc').orderBy('project_id').limit(page.limit).offset(page.offset).execute()) as ProjectRow[]
  return { total: Number(counted?.n ?? 0), projects: rows.map(projectView) }
}

const PERCENTILES = [0.5, 0.9, 0.95, 0.99] as const

interface LatencyRow {
  instance_type: string | null
  /** 1 on rollup's grand-total row. */
  total: number
  tasks: string | number
  inputs: string | number
  mean: number | null
  min: number | null
  max: number | null
  pct: number[] | null
}

function latencyView(row: LatencyRow | undefined) {
  const round = (v: number | null | undefined) => (v == null ? null : Math.round(v * 100) / 100)
  return {
    count: Number(row?.tasks ?? 0),
    p50: round(row?.pct?.[0]),
    p90: round(row?.pct?.[1]),
    p95: round(row?.pct?.[2]),
    p99: round(row?.pct?.[3]),
    mean: round(row?.mean),
    min: round(row?.min),
    max: round(row?.max),
  }
}

/**
 * Latency percentiles of the project's completed tasks (queued to completed; a batch task carrying several
 * inputs counts once), throughput over time in buckets of `bucketSeconds` (default: the project's span over
 * 60, at least 1 s), and both split by instance type.
 */
export async function projectAnalytics(db: Kysely<any>, project: ProjectRow, bucketSeconds?: number) {
  const q = db.withSchema(schema)
  const latencies = (await q
    .selectFrom('project_tasks')
    .select([
      'instance_type',
      sql<number>`grouping(instance_type)`.as('total'),
      sql<number>`count(*)`.as('tasks'),
      sql<number>`sum(inputs)`.as('inputs'),
      sql<number>`avg(latency_ms)`.as('mean'),
      sql<number>`min(latency_ms)`.as('min'),
      sql<number>`max(latency_ms)`.as('max'),
      sql<number[]>`percentile_cont(array[${sql.join(PERCENTILES.map((p) => sql.lit(p)))}]::float8[]) within group (order by latency_ms)`.as('pct'),
    ])
    .where('project_id', '=', project.project_id)
    .where('status', '=', 'completed')
    .groupBy(sql`rollup(instance_type)`)
    .execute()) as LatencyRow[]
  const overall = latencies.find((r) => Number(r.total) === 1)
  const span = await q
    .selectFrom('project_tasks')
    .select([sql<Date | null>`min(finished_at)`.as('first'), sql<Date | null>`max(finished_at)`.as('last')])
    .where('project_id', '=', project.project_id)
    .where('status', '=', 'completed')
    .executeTakeFirst()
  const spanSeconds = span?.first && span.last ? (span.last.getTime() - span.first.getTime()) / 1000 : 0
  const bucket = bucketSeconds ?? Math.max(1, Math.ceil(spanSeconds / 60))
  const buckets = await q
    .selectFrom('project_tasks')
    .select([
      sql<number>`floor(extract(epoch from finished_at) / ${bucket}) * ${bucket}`.as('t'),
      'instance_type',
      sql<number>`count(*)`.as('tasks'),
      sql<number>`sum(inputs)`.as('inputs'),
    ])
    .where('project_id', '=', project.project_id)
    .where('status', '=', 'completed')
    .groupBy(['t', 'instance_type'])
    .orderBy('t')
    .execute()
  const series = (type?: string) => {
    const points = new Map<number, { tasks: number; inputs: number }>()
    for (const b of buckets) {
      if (type && (b.instance_type ?? 'unknown') !== type) continue
      const point = points.get(Number(b.t)) ?? { tasks: 0, inputs: 0 }
      point.tasks += Number(b.tasks)
      point.inputs += Number(b.inputs)
      points.set(Number(b.t), point)
    }
    return [...points].map(([t, p]) => ({ time: new Date(t * 1000).toISOString(), tasks: p.tasks, inputs: p.inputs, inputs_per_s: Math.round((p.inputs / bucket) * 1000) / 1000 }))
  }
  const perSecond = (inputs: number) => Math.round((inputs / Math.max(spanSeconds, bucket)) * 1000) / 1000
  const ofType = (type: 'aws' | 'user') => {
    const row = latencies.find((r) => Number(r.total) === 0 && r.instance_type === type)
    const inputs = Number(row?.inputs ?? 0)
    return { completed_tasks: Number(row?.tasks ?? 0), completed_inputs: inputs, latency_ms: latencyView(row), throughput: { inputs_per_s: perSecond(inputs), series: series(type) } }
  }
  const byType = { aws: ofType('aws'), user: ofType('user') }
  const inputs = Number(overall?.inputs ?? 0)
  return {
    project_id: project.project_id,
    status: projectView(project).status,
    total_tasks: projectView(project).total_tasks,
    completed_tasks: project.completed,
    failed_tasks: project.failed,
    latency_ms: latencyView(overall),
    throughput: { bucket_seconds: bucket, inputs_per_s: perSecond(inputs), series: series() },
    by_instance_type: byType,
  }
}
