import { parse, UsageError } from './args.js'
import { sseEvents } from './sse.js'

/**
 * `dcp watch <project>`: follows a project's live stream (`/dashboard/projects/:id/stream?format=text`) in the
 * terminal, redrawing its figures at each update, until the project completes (exit 0). Exit 1 when the
 * server refuses (unknown project, bad key) or cannot be reached.
 */
export async function watchCommand(args: string[]): Promise<number> {
  const { values, positionals } = parse(args, {
    server: { type: 'string' },
    'api-key': { type: 'string' },
    interval: { type: 'string' },
  })
  if (positionals.length !== 1) throw new UsageError('dcp watch takes one project id')
  const server = (values.server ?? process.env.DCP_SERVER ?? 'http://localhost:3000').replace(/\/+$/, '')
  const key = values['api-key'] ?? process.env.DCP_API_KEY ?? 'test-api-key'
  const interval = values.interval === undefined ? 2000 : Number(values.interval)
  if (!Number.isInteger(interval) || interval < 100 || interval > 60_000) throw new UsageError(`--interval must be 100..60000 ms, got ${values.interval}`)
  const url = `${server}/api/v1/dashboard/projects/${encodeURIComponent(positionals[0]!)}/stream?format=text&interval=${interval}`
  let response: Response
  try {
    response = await fetch(url, { headers: { 'x-api-key': key, accept: 'text/event-stream' } })
  } catch (error) {
    console.error(`dcp watch: cannot reach ${server}: ${(error as Error).message}`)
    return 1
  }
  if (!response.ok || !response.body) {
    const body = await response.text().catch(() => '')
    let message = body
    try {
      message = (JSON.parse(body) as { error: { message: string } }).error.message
    } catch {} // not the error contract: show it as it is
    console.error(`dcp watch: ${response.status} ${message}`)
    return 1
  }
  const tty = process.stdout.isTTY
  let drawn = 0
  for await (const { event, data } of sseEvents(response.body as unknown as AsyncIterable<Uint8Array>)) {
    if (event === 'stats') {
      // redraw in place on a terminal; one block after another when piped
      if (tty && drawn > 0) process.stdout.write(`\u001b[${drawn}A\u001b[J`)
      process.stdout.write(`${data}\n`)
      drawn = data.split('\n').length
    } else if (event === 'end') {
      process.stdout.write(`${data}\n`)
      return 0
    } else if (event === 'stream_error') {
      console.error(`dcp watch: ${data}`)
      return 1
    }
  }
  console.error('dcp watch: the stream ended before the project completed (run it again to follow on)')
  return 1
}
