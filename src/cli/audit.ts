import { loadConfig } from '../config.js'
import { openPlatform } from '../platform.js'
import { knownProjection } from '../projections/projections.js'
import type { AuditReport } from '../projections/replay.js'
import { parse, UsageError } from './args.js'

/** `dcp audit <projection>`: exit 0 when the live read model equals a replay of the log, 1 otherwise. */
export async function auditCommand(args: string[]): Promise<number> {
  const { values, positionals } = parse(args, { json: { type: 'boolean' } })
  if (positionals.length !== 1) throw new UsageError('dcp audit needs exactly one projection name')
  knownProjection(positionals[0]!)
  const platform = await openPlatform(loadConfig())
  try {
    const report = await platform.projections.audit(positionals[0]!)
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
