import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { chmod, mkdtemp, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import t, { type Test } from 'tap'
import { connect, withDatabase } from '../../src/postgres/database.js'
import { startEmbeddedPostgres } from '../../src/postgres/embedded.js'

const holder = fileURLToPath(new URL('./embedded-holder.ts', import.meta.url))

/** A directory for a data directory, which Postgres (as the `postgres` user when we are root) may enter. */
async function root(t: Test, prefix: string): Promise<string> {
  const dir = await mkdtemp(path.join(tmpdir(), prefix))
  await chmod(dir, 0o755)
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  return dir
}

/** How dcp connects (a pool on `withDatabase(url)`): is it over a Unix socket, and does the server listen on TCP? */
async function connection(url: string): Promise<{ address: string | null; listen: string }> {
  const database = connect(withDatabase(url, 'postgres'), { max: 1 })
  try {
    const { rows } = await database.pool.query(`select inet_server_addr()::text as address, current_setting('listen_addresses') as listen`)
    return rows[0]
  } finally {
    await database.close()
  }
}

t.test('the embedded Postgres is reached over a Unix socket in its data directory and listens on no TCP port', async (t) => {
  // a space and a comma: unix_socket_directories is a comma-separated list
  const dataDir = path.join(await root(t, 'dcp pg, socket-'), 'pg')
  const server = await startEmbeddedPostgres(dataDir)
  t.teardown(() => server.stop())
  t.equal(server.socketDir, dataDir)
  t.ok((await stat(path.join(dataDir, `.s.PGSQL.${server.port}`))).isSocket(), 'the socket is in the data directory')
  t.same(await connection(server.url), { address: null, listen: '' }, 'no server address: a Unix socket; no TCP listener')
})

t.test('a data directory too deep for a socket path: the socket goes to a private directory under the tmpdir, removed at stop', async (t) => {
  const dataDir = path.join(await root(t, 'dcp-socket-long-'), 'd'.repeat(100), 'pg')
  const server = await startEmbeddedPostgres(dataDir)
  t.teardown(() => server.stop())
  t.equal(path.dirname(server.socketDir), tmpdir())
  t.equal((await stat(server.socketDir)).mode & 0o777, 0o700, 'only its owner may enter it')
  t.same(await connection(server.url), { address: null, listen: '' })
  await server.stop()
  t.notOk(existsSync(server.socketDir), 'removed when the server stopped')
})

t.test('killed with its server running (SIGKILL), the next start stops that server and removes its socket directory', async (t) => {
  const dataDir = path.join(await root(t, 'dcp-socket-crash-'), 'd'.repeat(100), 'pg')
  const child = spawn(process.execPath, ['--import', 'tsx', holder, dataDir], { stdio: ['ignore', 'pipe', 'inherit'] })
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
  })
  const { socketDir } = await new Promise<{ socketDir: string }>((resolve, reject) => {
    let output = ''
    child.stdout.setEncoding('utf8')
    child.stdout.on('data', (chunk: string) => {
      output += chunk
      if (output.includes('\n')) resolve(JSON.parse(output.split('\n')[0]!))
    })
    child.on('exit', (code) => reject(new Error(`the holder exited with ${code} before starting Postgres: ${output}`)))
  })
  child.kill('SIGKILL')
  await new Promise((resolve) => child.once('exit', resolve))
  t.ok(existsSync(socketDir), 'the orphaned server still has its socket directory')
  const server = await startEmbeddedPostgres(dataDir)
  t.teardown(() => server.stop())
  t.notOk(existsSync(socketDir), 'the orphan is stopped and its socket directory removed')
  t.not(server.socketDir, socketDir)
  t.same(await connection(server.url), { address: null, listen: '' })
})
