import { randomBytes } from 'node:crypto'
import pg from 'pg'
import type { Test } from 'tap'
import { connect, type Database, withDatabase } from '../../src/postgres/database.js'
import { migrateToLatest } from '../../src/postgres/migrations.js'

export function serverUrl(): string {
  const url = process.env.DATABASE_URL
  if (!url) throw new Error('DATABASE_URL is not set: run the tests with `npm test`, which starts an embedded Postgres')
  return url
}

/** A fresh, migrated database for one test file, dropped when the test ends. */
export async function freshDatabase(t: Test, options: { max?: number } = {}): Promise<Database> {
  const name = `dcp_test_${randomBytes(6).toString('hex')}`
  const admin = new pg.Client({ connectionString: withDatabase(serverUrl(), 'postgres') })
  await admin.connect()
  await admin.query(`create database ${name}`)
  await admin.end()
  const database = connect(withDatabase(serverUrl(), name), options)
  await migrateToLatest(database.db)
  t.teardown(async () => {
    await database.close()
    const cleanup = new pg.Client({ connectionString: withDatabase(serverUrl(), 'postgres') })
    await cleanup.connect()
    await cleanup.query(`drop database if exists ${name} with (force)`)
    await cleanup.end()
  })
  return database
}
