/** Running dcp as a user does, for the benchmarks: `dcp start` as a child process, and its API with the development key. */
import { type ChildProcess, spawn } from 'node:child_process'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'

type Log = (line: string) => void
export const API_KEY = 'test-api-key' // the development customer's key (src/commands/dev-customer.ts)
export const DCP_BIN = fileURLToPath(new URL('../bin/dcp.js', import.meta.url))

/** `dcp start` as a user runs it; resolves with its base URL once it prints that it listens. */
export async function startDcp(databaseUrl: string, dataDir: string, log: Log, options: { workers: number; pythonWorkers?: number }): Promise<{ child: ChildProcess; url: string }> {
  const env: NodeJS.ProcessEnv = { ...process.env, DATABASE_URL: databaseUrl, DATA_DIR: dataDir, LOG_LEVEL: 'warn', RATE_LIMIT_MAX: '100000000' }
  delete env.EVENTSTORE_URL
  delete env.NODE_ENV
  delete env.WORKERS
  delete env.PYTHON_WORKERS
  const python = options.pythonWorkers ? ['--python-workers', String(options.pythonWorkers)] : []
  // BENCH_CPU_PROF=<dir>: the server writes a V8 CPU profile there when it stops (where its time went)
  const profile = process.env.BENCH_CPU_PROF ? ['--cpu-prof', '--cpu-prof-dir', process.env.BENCH_CPU_PROF] : []
  const child = spawn(process.execPath, [...profile, DCP_BIN, 'start', '--workers', String(options.workers), ...python, '--port', '0', '--host', '127.0.0.1'], { env, stdio: ['ignore', 'pipe', 'pipe'] })
  let lines = 0
  const show = (line: string) => {
    if (++lines <= 40) log(`  [dcp] ${line}`)
    else if (lines === 41) log('  [dcp] (more output not shown)')
  }
  createInterface({ input: child.stderr! }).on('line', show)
  const port = await untilListening(child, show).catch(async (error: Error) => {
    await stopDcp(child)
    throw error
  })
  return { child, url: `http://127.0.0.1:${port}` }
}

/** The port `dcp start` says it listens on (its stdout's other lines go to `other`); rejects if it exits first or takes over 120 s. */
export function untilListening(child: ChildProcess, other: (line: string) => void): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('dcp start did not report listening within 120 s')), 120_000)
    child.once('exit', (code, signal) => reject(new Error(`dcp start exited (${code ?? signal}) before listening`)))
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const match = /dcp listening on http:\/\/[^:]+:(\d+)\//.exec(line)
      if (match) {
        clearTimeout(timer)
        resolve(Number(match[1]))
      } else other(line)
    })
  })
}

/** SIGINT (dcp drains its workers and closes), then waits for the exit; SIGKILL after 30 s. */
export async function stopDcp(child: ChildProcess): Promise<number | string | null> {
  if (child.exitCode !== null || child.signalCode !== null) return child.exitCode ?? child.signalCode
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 30_000)
    child.once('exit', (code, signal) => {
      clearTimeout(timer)
      resolve(code ?? signal)
    })
    child.kill('SIGINT')
  })
}

/** A JSON call to dcp's API with the development key. */
export async function api(base: string, method: string, route: string, payload?: string | FormData): Promise<{ status: number; body: any }> {
  const json = typeof payload === 'string'
  const response = await fetch(`${base}/api/v1${route}`, {
    method,
    headers: { 'x-api-key': API_KEY, ...(json ? { 'content-type': 'application/json' } : {}) },
    ...(payload !== undefined ? { body: payload } : {}),
  })
  const text = await response.text()
  let body: unknown = text
  try {
    body = JSON.parse(text)
  } catch {} // not JSON: kept as text for the message
  return { status: response.status, body }
}
