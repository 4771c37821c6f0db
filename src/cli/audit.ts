import { loadConfig } from '../config.js'
import { openPlatform } from '../platform.js'
import { knownProjection } from '../projections/projections.js'
import type { AuditReport } from '../projections/replay.js'
import { formatUsageReport } from '../projections/usage-audit.js'
import { parse, UsageError } from './args.js'

const HOUR = /^\d{4}-\d{2}-\d{2}T\d{2}$/

/**
 * `dcp audit <projection>`: exit 0 when the live read model equals a replay of the log, 1 otherwise.
 * `dcp audit usage` is the billing audit: with `--from`/`--to` (UTC hours) and `--customer` it compares and
 * totals only those rows, and prints the totals per customer and hour and a digest of the rows.
 */
export async function auditCommand(args: string[]): Promise<number> {
  const { values, positionals } = parse(args, { json: { type: 'boolean' }, from: { type: 'string' }, to: { type: 'string' }, customer: { type: 'string' } })
  if (positionals.length !== 1) throw new UsageError('dcp audit needs exactly one projection name')
  const name = positionals[0]!
  knownProjection(name)
  const usage = name === 'usage'
  if (!usage && (values.from || values.to || values.customer)) throw new UsageError('--from, --to and --customer apply to `dcp audit usage` only')
  for (const flag of ['from', 'to'] as const) {
    const value = values[flag]
    if (value !== undefined && !HOUR.test(String(value))) throw new UsageError(`--${flag} must be an hour as YYYY-MM-DDTHH (UTC), got ${JSON.stringify(value)}`)
  }
  const platform = await openPlatform(loadConfig(), { existing: true })
  try {
    if (usage) {
      const report = await platform.projections.auditUsage({ from: values.from as string | undefined, to: values.to as string | undefined, customer: values.customer as string | undefined })
      console.log(values.json ? JSON.stringify(report, null, 2) : formatUsageReport(report))
      return report.ok ? 0 : 1
    }
    const report = await platform.projections.audit(name)
    console.log(values.json ? JSON.stringify(report, null, 2) : formatReport(report))
    return report.ok ? 0 : 1
  } finally {
    await platform.close()
  }
}

export function formatReport(report: AuditReport): string {
  const lines = [`audit of ${report.projection} at position ${report.position}: ${report.ok ? 'OK, no differences' : 'DIFFERENCES FOUND'}`]
  for (const table of report.tables) {
    lines.push(`  ${table.table}: ${table.liveRows} live rows, ${table.replayedRows} replayed rows, ${table.differenceCount} differences`)
    for (const d of table.differences) {
      lines.push(`    ${table.primaryKey.map((c) => `${c}=${JSON.stringify(d.key[c])}`).join(' ')}`)
      lines.push(`      live:     ${d.live ? JSON.stringify(d.live) : '(missing)'}`)
      lines.push(`      replayed: ${d.replayed ? JSON.stringify(d.replayed) : '(missing)'}`)
    }
    if (table.differenceCount > table.differences.length) lines.push(`    … and ${table.differenceCount - table.differences.length} more`)
  }
  return lines.join('\n')
}
