/** A project's live figures as a few ANSI-coloured lines for a terminal (`format=text`, `dcp watch`). */
export function renderProjectText(stats: {
  project_id: string
  name: string
  status: string
  submitted: number
  completed: number
  failed: number
  pending: number
  percent_complete: number
  inputs_per_s: number
  latency_ms: { p50: number | null; p95: number | null; p99: number | null }
  at: string
}): string {
  const bold = (s: string) => `\u001b[1m${s}\u001b[0m`
  const colour = (code: number, s: string) => `\u001b[${code}m${s}\u001b[0m`
  const status = stats.status === 'active' ? colour(32, stats.status) : stats.status === 'completed' ? colour(36, stats.status) : colour(33, stats.status)
  const width = 30
  const filled = Math.round((Math.min(100, stats.percent_complete) / 100) * width)
  const bar = `${colour(32, '█'.repeat(filled))}${'░'.repeat(width - filled)}`
  const ms = (v: number | null) => (v === null ? '-' : `${v} ms`)
  return [
    `${bold(stats.name)} (${stats.project_id})  ${status}  ${stats.at}`,
    `${bar} ${stats.percent_complete}%  completed ${stats.completed}  failed ${stats.failed > 0 ? colour(31, String(stats.failed)) : '0'}  pending ${stats.pending}`,
    `throughput ${stats.inputs_per_s} inputs/s   latency p50 ${ms(stats.latency_ms.p50)}  p95 ${ms(stats.latency_ms.p95)}  p99 ${ms(stats.latency_ms.p99)}`,
  ].join('\n')
}
