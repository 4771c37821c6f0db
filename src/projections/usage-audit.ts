import { type RawBuilder, sql, type Transaction } from 'kysely'
import { audit, type AuditReport, type ReplayDeps } from './replay.js'
import { usageBulkLoad, usageProjection } from './usage.js'

export interface UsageAuditOptions {
  /** Inclusive UTC hours, `YYYY-MM-DDTHH`. */
  from?: string | undefined
  to?: string | undefined
  customer?: string | undefined
  maxDifferences?: number
}

/**
 * One customer's usage in one hour, as `GET /usage` bills it: CPU and GPU time of completed tasks and of
 * training rounds (both billed), completed tasks and their inputs, training's part on its own, and failed
 * attempts (reported, not billed).
 */
export interface UsageTotal {
  customer_id: string
  hour: string
  tasks: number
  cpu_ms: number
  gpu_ms: number
  inputs: number
  training_samples: number
  training_cpu_ms: number
  training_gpu_ms: number
  failed_attempts: number
}

export interface UsageAuditReport extends AuditReport {
  filter: { from: string | null; to: string | null; customer: string | null }
  /** Totals per customer and hour, from the replay of the log (what the bill should say, training included). */
  totals: UsageTotal[]
  /**
   * SHA-256 of the replayed rows in the filter, in key order, as canonical JSON: two audits of the same log
   * give the same digest, whatever the batch size or how often events were delivered.
   */
  digest: string
  /** The same digest over the live rows; equal to `digest` exactly when no row differs. */
  liveDigest: string
}

const COLUMNS = ['customer_id', 'project_id', 'hour', 'sdk_uuid', 'instance_type', 'outcome', 'tasks', 'cpu_tasks', 'gpu_tasks', 'inputs', 'cpu_us', 'gpu_us', 'bytes_in', 'bytes_out'] as const

/**
 * The billing audit: replays the whole log into a shadow copy of the usage read model, compares it with the
 * live one row by row (within the filter), and reports the totals per customer and hour and a digest.
 */
export async function auditUsage(deps: ReplayDeps, options: UsageAuditOptions = {}): Promise<UsageAuditReport> {
  const where = (): RawBuilder<boolean> => {
    const parts: RawBuilder<unknown>[] = [sql`true`]
    if (options.from) parts.push(sql`t.hour >= ${options.from}`)
    if (options.to) parts.push(sql`t.hour <= ${options.to}`)
    if (options.customer) parts.push(sql`t.customer_id = ${options.customer}`)
    return sql<boolean>`${sql.join(parts, sql` and `)}`
  }
  const report = await audit(deps, usageProjection, {
    maxDifferences: options.maxDifferences ?? 100,
    where,
    bulkLoad: usageBulkLoad(),
    inspect: async (trx, schemas, compared) => {
      const replayed = await digest(trx, schemas.replayed, where())
      const replayedTotals = await totals(trx, schemas.replayed, where())
      // No row differs (compared as records, within the same filter): the live rows are the replayed rows,
      // byte for byte, and so is their digest; it is computed over the live rows only when they differ.
      const same = (await compared).every((table) => table.differenceCount === 0)
      return { totals: replayedTotals, digest: replayed, liveDigest: same ? replayed : await digest(trx, schemas.live, where()) }
    },
  })
  const { extra, ...rest } = report
  return { ...rest, filter: { from: options.from ?? null, to: options.to ?? null, customer: options.customer ?? null }, ...extra }
}

async function totals(trx: Transaction<any>, schema: string, where: RawBuilder<boolean>): Promise<UsageTotal[]> {
  const { rows } = await sql<Record<string, string>>`
    select customer_id, hour,
      sum(tasks) filter (where outcome = 'completed') as tasks,
      sum(cpu_us) filter (where outcome in ('completed', 'training')) as cpu_us,
      sum(gpu_us) filter (where outcome in ('completed', 'training')) as gpu_us,
      sum(inputs) filter (where outcome = 'completed') as inputs,
      sum(inputs) filter (where outcome = 'training') as training_samples,
      sum(cpu_us) filter (where outcome = 'training') as training_cpu_us,
      sum(gpu_us) filter (where outcome = 'training') as training_gpu_us,
      sum(tasks) filter (where outcome = 'failed') as failed
    from ${sql.table(`${schema}.usage_hourly`)} as t where ${where}
    group by customer_id, hour order by customer_id, hour`.execute(trx)
  return rows.map((r) => ({
    customer_id: r.customer_id!,
    hour: r.hour!,
    tasks: Number(r.tasks ?? 0),
    cpu_ms: Number(r.cpu_us ?? 0) / 1000,
    gpu_ms: Number(r.gpu_us ?? 0) / 1000,
    inputs: Number(r.inputs ?? 0),
    training_samples: Number(r.training_samples ?? 0),
    training_cpu_ms: Number(r.training_cpu_us ?? 0) / 1000,
    training_gpu_ms: Number(r.training_gpu_us ?? 0) / 1000,
    failed_attempts: Number(r.failed ?? 0),
  }))
}

/**
 * SHA-256 over the rows in key order, each a line `["customer_id","project_id",...]` (every column as a JSON
 * string) ending in a newline, computed in Postgres so the rows never leave it. The line is one
 * `array_to_json` of the columns as text: the same bytes as each column's `to_json(...::text)` joined with
 * commas, for a fraction of the work.
 */
async function digest(trx: Transaction<any>, schema: string, where: RawBuilder<boolean>): Promise<string> {
  const line = sql`array_to_json(array[${sql.join(COLUMNS.map((c) => sql`${sql.ref(`t.${c}`)}::text`))}])::text || chr(10)`
  const { rows } = await sql<{ digest: string }>`
    select encode(sha256(convert_to(coalesce(string_agg(${line}, '' order by t.customer_id, t.project_id, t.hour, t.sdk_uuid, t.instance_type, t.outcome), ''), 'UTF8')), 'hex') as digest
    from ${sql.table(`${schema}.usage_hourly`)} as t where ${where}`.execute(trx)
  return rows[0]!.digest
}

/** The report as text: what it compared, the totals, every difference, the digests. */
export function formatUsageReport(report: UsageAuditReport): string {
  const f = report.filter
  const scope = [f.from && `from ${f.from}`, f.to && `to ${f.to}`, f.customer && `customer ${f.customer}`].filter(Boolean).join(', ') || 'everything'
  const lines = [`usage audit at log position ${report.position} (${scope}): ${report.ok ? 'OK, the live read model equals the replay' : 'DIFFERENCES FOUND'}`, '', 'totals per customer and hour (from the replay):']
  lines.push(`  ${'customer'.padEnd(24)} ${'hour'.padEnd(13)} ${'tasks'.padStart(8)} ${'cpu_ms'.padStart(14)} ${'gpu_ms'.padStart(14)} ${'inputs'.padStart(10)} ${'failed'.padStart(7)}`)
  for (const t of report.totals) {
    lines.push(`  ${t.customer_id.padEnd(24)} ${t.hour.padEnd(13)} ${String(t.tasks).padStart(8)} ${t.cpu_ms.toFixed(3).padStart(14)} ${t.gpu_ms.toFixed(3).padStart(14)} ${String(t.inputs).padStart(10)} ${String(t.failed_attempts).padStart(7)}`)
    if (t.training_samples > 0 || t.training_cpu_ms > 0 || t.training_gpu_ms > 0) {
      lines.push(`  ${''.padEnd(24)} ${'of which training:'.padEnd(22)} ${t.training_cpu_ms.toFixed(3).padStart(14)} ${t.training_gpu_ms.toFixed(3).padStart(14)} ${String(t.training_samples).padStart(10)} samples`)
    }
  }
  if (report.totals.length === 0) lines.push('  (no usage)')
  for (const table of report.tables) {
    lines.push('', `${table.table}: ${table.liveRows} live rows, ${table.replayedRows} replayed rows, ${table.differenceCount} differences`)
    for (const d of table.differences) {
      lines.push(`  ${table.primaryKey.map((c) => `${c}=${JSON.stringify(d.key[c])}`).join(' ')}`)
      lines.push(`    live:     ${d.live ? JSON.stringify(d.live) : '(missing)'}`)
      lines.push(`    replayed: ${d.replayed ? JSON.stringify(d.replayed) : '(missing)'}`)
    }
    if (table.differenceCount > table.differences.length) lines.push(`  … and ${table.differenceCount - table.differences.length} more`)
  }
  lines.push('', `digest (replayed rows): ${report.digest}`, `digest (live rows):     ${report.liveDigest}`)
  return lines.join('\n')
}
