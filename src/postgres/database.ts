import { Kysely, PostgresDialect } from 'kysely'
import pg from 'pg'

// bigint columns (positions) come back as strings by default; dcp parses them where it reads them, as
// BigInt, so no precision is lost. int8 arrays likewise.

export interface Database {
  pool: pg.Pool
  /** Kysely over the same pool; table types are declared by the modules that own the tables. */
  db: Kysely<any>
  url: string
  close(): Promise<void>
}

export function connect(url: string, options: { max?: number; applicationName?: string } = {}): Database {
  const pool = new pg.Pool({
    connectionString: url,
    max: options.max ?? 20,
    application_name: options.applicationName ?? 'dcp',
  })
  // An idle client that loses its server (e.g. a restart) must not crash the process; nor may one that is
  // checked out (a projection leader's lock session, a writer's open transaction) when the server ends it,
  // as at shutdown: its queries fail and say so, which is where the error belongs.
  pool.on('error', () => {})
  pool.on('connect', (client) => client.on('error', () => {}))
  const db = new Kysely<any>({ dialect: new PostgresDialect({ pool }) })
  let closed = false
  return {
    pool,
    db,
    url,
    async close() {
      if (closed) return
      closed = true
      await db.destroy()
    },
  }
}

/** Replaces the database name of a connection string. */
export function withDatabase(url: string, database: string): string {
  const parsed = new URL(url)
  parsed.pathname = `/${database}`
  return parsed.toString()
}

/** Creates the database if it does not exist (connecting to the server's `postgres` database). */
export async function ensureDatabase(url: string): Promise<void> {
  const name = decodeURIComponent(new URL(url).pathname.slice(1)) || 'postgres'
  const admin = new pg.Client({ connectionString: withDatabase(url, 'postgres') })
  await admin.connect()
  try {
    const found = await admin.query('select 1 from pg_database where datname = $1', [name])
    if (found.rowCount === 0) {
      await admin.query(`create database ${pg.escapeIdentifier(name)}`).catch((error: { code?: string }) => {
        if (error.code !== '42P04' && error.code !== '23505') throw error // created meanwhile by someone else
      })
    }
  } finally {
    await admin.end()
  }
}
