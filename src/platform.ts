import { existsSync, readFileSync } from 'node:fs'
import { mkdir, rm, writeFile } from 'node:fs/promises'
import path from 'node:path'
import type { Config } from './config.js'
import { completeIntents } from './event-store/intents.js'
import type { EventStore } from './event-store/port.js'
import { PostgresEventStore } from './event-store/postgres.js'
import { connect, type Database, ensureDatabase, withDatabase } from './postgres/database.js'
import { type EmbeddedServer, startEmbeddedPostgres } from './postgres/embedded.js'
import { migrateToLatest } from './postgres/migrations.js'
import { claimCheckpointsLog } from './projections/log-kind.js'
import { Projections } from './projections/projections.js'

/** The parts every dcp command runs on: Postgres (embedded or given), the event store, the projections. */
export interface Platform {
  database: Database
  store: EventStore
  projections: Projections
  /** Where Postgres came from, for messages. */
  postgres: 'embedded' | 'embedded (shared with a running dcp)' | 'DATABASE_URL'
  close(): Promise<void>
}

export class DatabaseUnreachableError extends Error {
  readonly code = 'DATABASE_UNREACHABLE'
}

/** A command that reads dcp's data found none: no DATABASE_URL, no running dcp, no embedded Postgres in the data directory. */
export class NoDataError extends Error {
  readonly code = 'NO_DATA'
}

/** File in which a running `dcp start` publishes its embedded Postgres, for other dcp commands. */
const runtimeFile = (config: Config) => path.join(config.dataDir, 'postgres.json')

/**
 * Opens the platform. Without DATABASE_URL it uses the embedded Postgres in `<data dir>/pg`: the one a
 * running `dcp start` published, or one it starts itself (and, with `publish`, announces to others).
 */
export async function openPlatform(config: Config, options: { publish?: boolean; log?: (line: string) => void; existing?: boolean } = {}): Promise<Platform> {
  const log = options.log ?? (() => {})
  let embedded: EmbeddedServer | undefined
  let serverUrl = config.databaseUrl
  let postgres: Platform['postgres'] = 'DATABASE_URL'
  if (!serverUrl) {
    const shared = runningEmbedded(config)
    if (shared) {
      serverUrl = shared
      postgres = 'embedded (shared with a running dcp)'
    } else {
      // a command that reads what dcp stored (audit, projections) creates nothing where there is nothing
      if (options.existing && !existsSync(path.join(config.dataDir, 'pg', 'PG_VERSION'))) {
        throw new NoDataError(`no dcp data in ${config.dataDir} (no embedded Postgres at ${path.join(config.dataDir, 'pg')}, no running dcp start): run it where \`dcp start\` keeps its data (--data-dir or DATA_DIR), or set DATABASE_URL`)
      }
      await mkdir(config.dataDir, { recursive: true })
      embedded = await startEmbeddedPostgres(path.join(config.dataDir, 'pg'), { log })
      serverUrl = withDatabase(embedded.url, 'dcp')
      postgres = 'embedded'
      if (options.publish) await writeFile(runtimeFile(config), JSON.stringify({ url: serverUrl, pid: process.pid }), { mode: 0o600 })
    }
  }
  try {
    await ensureDatabase(serverUrl)
  } catch (cause) {
    await embedded?.stop()
    throw new DatabaseUnreachableError(`cannot reach Postgres at ${describe(serverUrl)}: ${(cause as Error).message}`, { cause })
  }
  const database = connect(serverUrl)
  await migrateToLatest(database.db)
  const store = await openEventStore(config, database)
  try {
    await claimCheckpointsLog(database.db, config.eventStoreUrl ? 'eventstoredb' : 'postgres')
    // Multi-stream writes a stop left half done (on a store without appendMany) are completed before anything
    // reads the log: the projections then fold every stream of the set, and the scheduler, which rebuilds its
    // queue from them, finds every task. Commands that only read what is stored (`existing`) write nothing.
    if (!options.existing) {
      const recovered = await completeIntents(store, { log })
      for (const refused of recovered.refused) console.error(`dcp: multi-stream write ${refused.intent_id} could not write ${refused.stream_id}: ${refused.reason}`)
    }
  } catch (error) {
    await store.close()
    await database.close()
    await embedded?.stop()
    throw error
  }
  const projections = new Projections({ db: database.db, store, log })
  return {
    database,
    store,
    projections,
    postgres,
    async close() {
      await projections.stop()
      await store.close()
      await database.close()
      if (embedded) {
        if (options.publish) await rm(runtimeFile(config), { force: true })
        await embedded.stop()
      }
    },
  }
}

async function openEventStore(config: Config, database: Database): Promise<EventStore> {
  if (!config.eventStoreUrl) return new PostgresEventStore(database.pool)
  const { EventStoreDbEventStore } = await import('./event-store/eventstoredb.js')
  return EventStoreDbEventStore.fromConnectionString(config.eventStoreUrl)
}

/** The URL a running `dcp start` published, if that process is still alive. */
function runningEmbedded(config: Config): string | undefined {
  const file = runtimeFile(config)
  if (!existsSync(file)) return undefined
  try {
    const { url, pid } = JSON.parse(readFileSync(file, 'utf8')) as { url: string; pid: number }
    process.kill(pid, 0)
    return url
  } catch {
    return undefined
  }
}

/** A connection string without its password; a Unix socket's directory (`?host=/dir`) in place of the host. */
function describe(url: string): string {
  try {
    const u = new URL(url)
    return `${u.searchParams.get('host') ?? u.hostname}:${u.port || 5432}${u.pathname}`
  } catch {
    return 'the given DATABASE_URL'
  }
}
