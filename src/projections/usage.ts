import { type Kysely, sql } from 'kysely'
import { taskDecider } from '../domain/task.js'
import { RoundData } from '../domain/training-job.js'
import type { RecordedEvent } from '../event-store/port.js'
import { liveSchema, type Projection } from './projection.js'

const USAGE_KEY = ['customer_id', 'project_id', 'hour', 'sdk_uuid', 'instance_type', 'outcome'] as const
const MEASURES = ['tasks', 'cpu_tasks', 'gpu_tasks', 'inputs', 'cpu_us', 'gpu_us', 'bytes_in', 'bytes_out'] as const

/**
 * Usage for billing, from task outcomes and training rounds: per customer, project, UTC hour, SDK UUID,
 * instance type and outcome (`completed`: a task's one completion; `failed`: an attempt that failed,
 * re-queued or not; `training`: a device's part of an aggregated training round, its samples as inputs), the
 * task count (CPU and GPU tasks apart), inputs, CPU and GPU time measured on the device, and bytes in and
 * out. Times are kept in whole microseconds so that sums are exact: the same log gives the same rows
 * whatever the batch size or order of application. A task completes once (fencing), so a result sent twice
 * or redelivered is billed once; the checkpoint moves in the same transaction as the rows.
 */
export const usageProjection: Projection = {
  name: 'usage',
  version: 2,
  filter: { types: ['TaskCompleted', 'TaskAttemptFailed', 'TrainingRoundCompleted'] },
  tables: [{ name: 'usage_hourly', primaryKey: USAGE_KEY }],

  async createTables(db) {
    await db.schema
      .createTable('usage_hourly')
      .addColumn('customer_id', 'text', (c) => c.notNull())
      /** '' when the work belongs to no project. */
      .addColumn('project_id', 'text', (c) => c.notNull())
      /** UTC hour, `YYYY-MM-DDTHH`. */
      .addColumn('hour', 'text', (c) => c.notNull())
      /** '' when the event predates the SDK UUID being recorded. */
      .addColumn('sdk_uuid', 'text', (c) => c.notNull())
      .addColumn('instance_type', 'text', (c) => c.notNull())
      .addColumn('outcome', 'text', (c) => c.notNull())
      .addColumn('tasks', 'bigint', (c) => c.notNull())
      .addColumn('cpu_tasks', 'bigint', (c) => c.notNull())
      .addColumn('gpu_tasks', 'bigint', (c) => c.notNull())
      .addColumn('inputs', 'bigint', (c) => c.notNull())
      .addColumn('cpu_us', 'bigint', (c) => c.notNull())
      .addColumn('gpu_us', 'bigint', (c) => c.notNull())
      .addColumn('bytes_in', 'bigint', (c) => c.notNull())
      .addColumn('bytes_out', 'bigint', (c) => c.notNull())
      .addPrimaryKeyConstraint('usage_hourly_pk', USAGE_KEY as never)
      .execute()
    await db.schema.createIndex('usage_by_hour').on('usage_hourly').columns(['hour']).execute()
  },

  async apply(trx, events) {
    const rows = new Map<string, UsageRow>()
    for (const recorded of events) addUsage(rows, recorded)
    const values = [...rows.values()]
    // One statement per 5,000 rows, the columns as arrays (unnest): far cheaper to build and to plan than
    // one parameter per value.
    for (let i = 0; i < values.length; i += 5000) {
      const chunk = values.slice(i, i + 5000)
      const column = (name: keyof UsageRow) => chunk.map((row) => row[name])
      await sql`
        insert into usage_hourly (${sql.join([...USAGE_KEY, ...MEASURES].map((c) => sql.ref(c)))})
        select * from unnest(
          ${sql.join(USAGE_KEY.map((c) => sql`${column(c)}::text[]`))},
          ${sql.join(MEASURES.map((m) => sql`${column(m)}::bigint[]`))})
        on conflict (${sql.join(USAGE_KEY.map((c) => sql.ref(c)))}) do update set
          ${sql.join(MEASURES.map((m) => sql`${sql.ref(m)} = usage_hourly.${sql.ref(m)} + excluded.${sql.ref(m)}`))}`.execute(trx)
    }
  },
}

interface UsageRow {
  customer_id: string
  project_id: string
  hour: string
  sdk_uuid: string
  instance_type: string
  outcome: 'completed' | 'failed' | 'training'
  tasks: number
  cpu_tasks: number
  gpu_tasks: number
  inputs: number
  cpu_us: number
  gpu_us: number
  bytes_in: number
  bytes_out: number
}

/** The UTC hour of an ISO time, `YYYY-MM-DDTHH`. */
export const hourOf = (iso: string) => new Date(iso).toISOString().slice(0, 13)

function addUsage(rows: Map<string, UsageRow>, recorded: RecordedEvent): void {
  if (recorded.type === 'TrainingRoundCompleted') return addTraining(rows, recorded)
  const event = taskDecider.parse({ type: recorded.type, data: recorded.data, schemaVersion: recorded.metadata.schemaVersion ?? 1 })
  if (event.type !== 'TaskCompleted' && event.type !== 'TaskAttemptFailed') return
  const d = event.data
  const at = event.type === 'TaskCompleted' ? event.data.completed_at : event.data.failed_at
  const metrics = event.data.metrics ?? { cpu_ms: 0, gpu_ms: 0, bytes_in: 0, bytes_out: 0 }
  const key = {
    customer_id: d.customer_id,
    project_id: d.project_id ?? '',
    hour: hourOf(at),
    sdk_uuid: d.sdk_uuid ?? '',
    instance_type: d.instance_type ?? 'unknown',
    outcome: event.type === 'TaskCompleted' ? ('completed' as const) : ('failed' as const),
  }
  const row = rowOf(rows, key)
  const gpu = metrics.gpu_ms > 0
  row.tasks += 1
  row.cpu_tasks += gpu ? 0 : 1
  row.gpu_tasks += gpu ? 1 : 0
  row.inputs += d.inputs
  row.cpu_us += Math.round(metrics.cpu_ms * 1000)
  row.gpu_us += Math.round(metrics.gpu_ms * 1000)
  row.bytes_in += metrics.bytes_in
  row.bytes_out += metrics.bytes_out
}

/** Training is billed per device and round: its compute time, and the samples it trained on as inputs. */
function addTraining(rows: Map<string, UsageRow>, recorded: RecordedEvent): void {
  const round = RoundData.parse(recorded.data)
  for (const c of round.contributions) {
    const row = rowOf(rows, { customer_id: round.customer_id, project_id: '', hour: hourOf(round.at), sdk_uuid: c.sdk_uuid, instance_type: c.instance_type, outcome: 'training' })
    row.inputs += c.samples
    row.cpu_us += Math.round(c.cpu_ms * 1000)
    row.gpu_us += Math.round(c.gpu_ms * 1000)
  }
}

function rowOf(rows: Map<string, UsageRow>, key: Pick<UsageRow, (typeof USAGE_KEY)[number]>): UsageRow {
  const id = JSON.stringify(Object.values(key))
  let row = rows.get(id)
  if (!row) {
    row = { ...key, tasks: 0, cpu_tasks: 0, gpu_tasks: 0, inputs: 0, cpu_us: 0, gpu_us: 0, bytes_in: 0, bytes_out: 0 }
    rows.set(id, row)
  }
  return row
}

const schema = liveSchema(usageProjection.name)

export interface UsageFilter {
  customerId?: string | undefined
  projectId?: string | undefined
  /** Inclusive hours, `YYYY-MM-DDTHH`. */
  fromHour?: string | undefined
  toHour?: string | undefined
  outcome?: 'completed' | 'failed' | 'training' | undefined
}

/** Sums of usage, for the rows matching the filter, grouped by the columns given. */
export async function sumUsage<G extends 'customer_id' | 'project_id' | 'hour' | 'sdk_uuid' | 'instance_type' | 'outcome'>(
  db: Kysely<any>,
  filter: UsageFilter,
  groupBy: readonly G[],
  page?: { limit: number; offset: number },
): Promise<(Record<G, string> & Record<(typeof MEASURES)[number], number>)[]> {
  let query = db.withSchema(schema).selectFrom('usage_hourly')
  if (filter.customerId !== undefined) query = query.where('customer_id', '=', filter.customerId)
  if (filter.projectId !== undefined) query = query.where('project_id', '=', filter.projectId)
  if (filter.fromHour !== undefined) query = query.where('hour', '>=', filter.fromHour)
  if (filter.toHour !== undefined) query = query.where('hour', '<=', filter.toHour)
  if (filter.outcome !== undefined) query = query.where('outcome', '=', filter.outcome)
  let grouped = query.select([...groupBy.map((g) => sql.ref(g).as(g)), ...MEASURES.map((m) => sql<string>`sum(${sql.ref(m)})`.as(m))])
  if (groupBy.length > 0) grouped = grouped.groupBy([...groupBy] as never).orderBy([...groupBy] as never)
  if (page) grouped = grouped.limit(page.limit).offset(page.offset)
  const rows = await grouped.execute()
  return rows
    .filter((r) => r.tasks !== null)
    .map((r) => ({ ...r, ...Object.fromEntries(MEASURES.map((m) => [m, Number(r[m])])) })) as never
}

/** How many groups `sumUsage` would return (for paging). */
export async function countUsageGroups(db: Kysely<any>, column: 'customer_id', filter: UsageFilter): Promise<number> {
  let query = db.withSchema(schema).selectFrom('usage_hourly').select(sql<string>`count(distinct ${sql.ref(column)})`.as('n'))
  if (filter.fromHour !== undefined) query = query.where('hour', '>=', filter.fromHour)
  if (filter.toHour !== undefined) query = query.where('hour', '<=', filter.toHour)
  return Number((await query.executeTakeFirst())?.n ?? 0)
}
