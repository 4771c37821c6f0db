import { type Kysely, sql } from 'kysely'
import { taskDecider } from '../domain/task.js'
import { boundMetrics, splitMetrics } from '../domain/metering.js'
import { RoundData } from '../domain/training-job.js'
import type { Metrics } from '../protocol/frames.js'
import type { RecordedEvent } from '../event-store/port.js'
import { liveSchema, type Projection } from './projection.js'
import type { BulkLoad, InShadow } from './replay.js'

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
  // 3: validation's replicas (`replica`: a run that agreed, credited to its contributor, not billed) and
  // outvoted runs (`disputed`: counted under the contributor's errors); billed compute bounded by `observed`
  version: 3,
  filter: { types: ['TaskCompleted', 'TaskAttemptFailed', 'TaskValidated', 'TrainingRoundCompleted'] },
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
      .execute()
    await addPrimaryKey(db)
    await db.schema.createIndex('usage_by_hour').on('usage_hourly').columns(['hour']).execute()
  },

  async apply(trx, events) {
    const fold = new UsageFold()
    for (const recorded of events) fold.add(recorded)
    const rows = fold.rows()
    // One statement per 5,000 rows, the columns as arrays (unnest): far cheaper to build and to plan than
    // one parameter per value.
    for (let i = 0; i < rows.length; i += 5000) {
      await sql`
        insert into usage_hourly (${COLUMN_LIST})
        ${unnestRows(rows.slice(i, i + 5000))}
        on conflict (${sql.join(USAGE_KEY.map((c) => sql.ref(c)))}) do update set
          ${sql.join(MEASURES.map((m) => sql`${sql.ref(m)} = usage_hourly.${sql.ref(m)} + excluded.${sql.ref(m)}`))}`.execute(trx)
    }
  },
}

/**
 * `completed`: a task's one completion, billed to the customer; `failed`: an attempt that failed; `training`:
 * a device's part of a training round; `replica`: a validation run that agreed with the accepted result
 * (the contributor's work, not billed to the customer); `disputed`: a run outvoted by validation.
 */
export type UsageOutcome = 'completed' | 'failed' | 'training' | 'replica' | 'disputed'

interface UsageRow {
  customer_id: string
  project_id: string
  hour: string
  sdk_uuid: string
  instance_type: string
  outcome: UsageOutcome
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

/**
 * Usage folded in memory: one row per key, its measures summed. Kept compact, a key as its JSON and the
 * row's eight measures in one typed array, so that the hundreds of thousands of rows a bulk load holds cost
 * the garbage collector next to nothing (as objects, every row would be copied from young to old space).
 */
class UsageFold {
  private readonly index = new Map<string, number>()
  private measures = new Float64Array(MEASURES.length * 64)

  get size(): number {
    return this.index.size
  }

  add(recorded: RecordedEvent): void {
    if (recorded.type === 'TrainingRoundCompleted') return this.addTraining(recorded)
    const event = taskDecider.parse({ type: recorded.type, data: recorded.data, schemaVersion: recorded.metadata.schemaVersion ?? 1 })
    if (event.type === 'TaskValidated') {
      const d = event.data
      for (const run of d.runs) {
        if (run.verdict === 'accepted') continue // billed by the TaskCompleted that follows
        this.count(d.customer_id, d.project_id ?? '', hourOf(d.validated_at), run.sdk_uuid ?? '', run.instance_type ?? 'unknown', run.verdict === 'agreed' ? 'replica' : 'disputed', d.inputs, run.metrics)
      }
      return
    }
    if (event.type !== 'TaskCompleted' && event.type !== 'TaskAttemptFailed') return
    const d = event.data
    const at = event.type === 'TaskCompleted' ? event.data.completed_at : event.data.failed_at
    const claimed = event.data.metrics ?? { cpu_ms: 0, gpu_ms: 0, bytes_in: 0, bytes_out: 0 }
    // the bound replayed from what the server observed (the event's metrics are bounded already; an audit checks
    // it again); a part of a merged device task: the whole task's claim bounded, then split by inputs
    const bounded = (whole: Metrics) => (d.observed ? boundMetrics(whole, d.observed).metrics : whole)
    const metrics = d.merged ? splitMetrics(bounded(d.merged.claimed), d.merged.sizes, d.merged.index) : bounded(claimed)
    const outcome = event.type === 'TaskCompleted' ? 'completed' : 'failed'
    this.count(d.customer_id, d.project_id ?? '', hourOf(at), d.sdk_uuid ?? '', d.instance_type ?? 'unknown', outcome, d.inputs, metrics)
  }

  private count(customer: string, project: string, hour: string, sdkUuid: string, instanceType: string, outcome: UsageOutcome, inputs: number, metrics: Metrics): void {
    const row = this.row(customer, project, hour, sdkUuid, instanceType, outcome)
    const m = this.measures
    const gpu = metrics.gpu_ms > 0
    m[row + TASKS]! += 1
    m[row + CPU_TASKS]! += gpu ? 0 : 1
    m[row + GPU_TASKS]! += gpu ? 1 : 0
    m[row + INPUTS]! += inputs
    m[row + CPU_US]! += Math.round(metrics.cpu_ms * 1000)
    m[row + GPU_US]! += Math.round(metrics.gpu_ms * 1000)
    m[row + BYTES_IN]! += metrics.bytes_in
    m[row + BYTES_OUT]! += metrics.bytes_out
  }

  /** Training is billed per device and round: its compute time, and the samples it trained on as inputs. */
  private addTraining(recorded: RecordedEvent): void {
    const round = RoundData.parse(recorded.data)
    for (const c of round.contributions) {
      const row = this.row(round.customer_id, '', hourOf(round.at), c.sdk_uuid, c.instance_type, 'training')
      const m = this.measures
      m[row + INPUTS]! += c.samples
      m[row + CPU_US]! += Math.round(c.cpu_ms * 1000)
      m[row + GPU_US]! += Math.round(c.gpu_ms * 1000)
    }
  }

  /** Where a key's measures start, the row created with zero measures when new. */
  private row(customer_id: string, project_id: string, hour: string, sdk_uuid: string, instance_type: string, outcome: UsageOutcome): number {
    const id = JSON.stringify([customer_id, project_id, hour, sdk_uuid, instance_type, outcome])
    let at = this.index.get(id)
    if (at === undefined) {
      at = this.index.size * MEASURES.length
      if (at + MEASURES.length > this.measures.length) {
        const grown = new Float64Array(this.measures.length * 2)
        grown.set(this.measures)
        this.measures = grown
      }
      this.index.set(id, at)
    }
    return at
  }

  /**
   * The rows, in key order (near enough: by the JSON of the key), so that a table filled with them has
   * its rows in the order of its primary key.
   */
  rows(): UsageRow[] {
    const m = this.measures
    return [...this.index.keys()].sort().map((id) => {
      const [customer_id, project_id, hour, sdk_uuid, instance_type, outcome] = JSON.parse(id) as [string, string, string, string, string, UsageRow['outcome']]
      const at = this.index.get(id)!
      return {
        customer_id,
        project_id,
        hour,
        sdk_uuid,
        instance_type,
        outcome,
        tasks: m[at + TASKS]!,
        cpu_tasks: m[at + CPU_TASKS]!,
        gpu_tasks: m[at + GPU_TASKS]!,
        inputs: m[at + INPUTS]!,
        cpu_us: m[at + CPU_US]!,
        gpu_us: m[at + GPU_US]!,
        bytes_in: m[at + BYTES_IN]!,
        bytes_out: m[at + BYTES_OUT]!,
      }
    })
  }
}

/** Each measure's place in a row of `UsageFold.measures`. */
const [TASKS, CPU_TASKS, GPU_TASKS, INPUTS, CPU_US, GPU_US, BYTES_IN, BYTES_OUT] = MEASURES.map((_, i) => i) as [number, number, number, number, number, number, number, number]

const COLUMN_LIST = sql.join([...USAGE_KEY, ...MEASURES].map((c) => sql.ref(c)))

/**
 * `select * from unnest(...)` over the rows, one array per column, in the table's column order. Each
 * array goes as one Postgres array literal, written here in one pass (what node-postgres would write for
 * a JS array, every text element quoted with `\` and `"` escaped, at a fraction of the cost).
 */
function unnestRows(rows: UsageRow[]) {
  const texts = (name: (typeof USAGE_KEY)[number]) => {
    let literal = '{'
    for (let i = 0; i < rows.length; i++) {
      const value = rows[i]![name]
      const quoted = value.includes('\\') || value.includes('"') ? value.replace(/\\/g, '\\\\').replace(/"/g, '\\"') : value
      literal += i === 0 ? `"${quoted}"` : `,"${quoted}"`
    }
    return `${literal}}`
  }
  const numbers = (name: (typeof MEASURES)[number]) => `{${rows.map((row) => row[name]).join(',')}}`
  return sql`select * from unnest(
    ${sql.join(USAGE_KEY.map((c) => sql`${texts(c)}::text[]`))},
    ${sql.join(MEASURES.map((m) => sql`${numbers(m)}::bigint[]`))})`
}

/** The primary key of `usage_hourly` (added after its rows in a bulk load). */
async function addPrimaryKey(db: Kysely<any>): Promise<void> {
  await sql`alter table usage_hourly add constraint usage_hourly_pk primary key (${sql.join(USAGE_KEY.map((c) => sql.ref(c)))})`.execute(db)
}

/** Rows a bulk load holds in memory (some 250 bytes each) before it moves them to its staging table. */
const BULK_ROWS_IN_MEMORY = 1_000_000
/** Rows per insert statement in a bulk load, and such statements at once (each a transaction of its own). */
const BULK_INSERT_ROWS = 20_000
const BULK_INSERTS_AT_ONCE = 2

/**
 * The audit's way to fill its empty shadow copy from the log (see `BulkLoad`), one per audit: the pages
 * are folded in memory, as `apply` folds a batch, into one row per key (order does not matter: sums), and
 * written at the end, with plain inserts in key order, into `usage_hourly`, whose primary key is built
 * after its rows: far cheaper than an upsert per page into the indexed table. Past `limit` rows in
 * memory, the folded rows move to an unlogged staging table with no index, summed per key at the end.
 * Sums of integers either way: the same rows, byte for byte, as `apply` gives.
 */
export function usageBulkLoad(limit = BULK_ROWS_IN_MEMORY): BulkLoad {
  let fold = new UsageFold()
  let staged = false
  return {
    async begin(inShadow) {
      await inShadow(async (trx) => {
        // the shadow is thrown away after the audit: nothing in it needs the write-ahead log
        await sql`alter table usage_hourly drop constraint usage_hourly_pk`.execute(trx)
        await sql`drop index usage_by_hour`.execute(trx)
        await sql`alter table usage_hourly set unlogged`.execute(trx)
        await sql`create unlogged table usage_hourly_staging (like usage_hourly)`.execute(trx)
      })
    },
    async add(events, inShadow) {
      for (const recorded of events) fold.add(recorded)
      if (fold.size < limit) return
      const full = fold
      fold = new UsageFold()
      staged = true
      await insertRows(inShadow, 'usage_hourly_staging', full.rows())
    },
    async finish(inShadow) {
      const rest = fold.rows()
      fold = new UsageFold()
      await insertRows(inShadow, staged ? 'usage_hourly_staging' : 'usage_hourly', rest)
      await inShadow(async (trx) => {
        if (staged) {
          await sql`
            insert into usage_hourly (${COLUMN_LIST})
            select ${sql.join(USAGE_KEY.map((c) => sql.ref(c)))}, ${sql.join(MEASURES.map((m) => sql`sum(${sql.ref(m)})::bigint`))}
            from usage_hourly_staging
            group by ${sql.join(USAGE_KEY.map((c) => sql.ref(c)))}
            order by ${sql.join(USAGE_KEY.map((c) => sql.ref(c)))}`.execute(trx)
        }
        await sql`drop table usage_hourly_staging`.execute(trx)
        // the primary key, which `apply` upserts on; not the index by hour, which only the API's queries use
        await addPrimaryKey(trx)
      })
    },
  }
}

/**
 * Plain inserts of folded rows (into a table without keys, or keys it does not have yet), one statement
 * per `BULK_INSERT_ROWS`, `BULK_INSERTS_AT_ONCE` at once.
 */
async function insertRows(inShadow: InShadow, table: string, rows: UsageRow[]): Promise<void> {
  const chunks: UsageRow[][] = []
  for (let i = 0; i < rows.length; i += BULK_INSERT_ROWS) chunks.push(rows.slice(i, i + BULK_INSERT_ROWS))
  const inserter = async () => {
    for (let chunk = chunks.shift(); chunk; chunk = chunks.shift()) {
      const values = chunk
      await inShadow((trx) => sql`insert into ${sql.table(table)} (${COLUMN_LIST}) ${unnestRows(values)}`.execute(trx))
    }
  }
  await Promise.all(Array.from({ length: BULK_INSERTS_AT_ONCE }, inserter))
}

const schema = liveSchema(usageProjection.name)

export interface UsageFilter {
  customerId?: string | undefined
  projectId?: string | undefined
  /** Inclusive hours, `YYYY-MM-DDTHH`. */
  fromHour?: string | undefined
  toHour?: string | undefined
  outcome?: UsageOutcome | readonly UsageOutcome[] | undefined
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
  if (filter.outcome !== undefined) query = query.where('outcome', 'in', typeof filter.outcome === 'string' ? [filter.outcome] : [...filter.outcome])
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
