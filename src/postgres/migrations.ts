import { type Kysely, type Migration, Migrator, sql } from 'kysely'

/**
 * Schema migrations of the tables dcp owns outside projections: the event log and the projection
 * checkpoints. Read-model tables are created by their projections (see src/projections/runner.ts), so
 * that a rebuild can create them again in a fresh schema.
 */
const migrations: Record<string, Migration> = {
  '0001_event_log': {
    async up(db) {
      await sql`
        create table events (
          position bigint generated always as identity primary key,
          stream_id text not null,
          revision bigint not null,
          event_id uuid not null unique,
          type text not null,
          data jsonb not null,
          metadata jsonb not null,
          recorded_at timestamptz not null default now(),
          -- the writing transaction, so readers can stop below transactions that may still commit
          tx_id xid8 not null default pg_current_xact_id(),
          unique (stream_id, revision)
        )`.execute(db)
      // Wakes subscribers after every committed insert, whoever the writer is.
      await sql`
        create function dcp_notify_events() returns trigger language plpgsql as $$
        begin
          perform pg_notify('dcp_events', '');
          return null;
        end $$`.execute(db)
      await sql`
        create trigger events_notify after insert on events
        for each statement execute function dcp_notify_events()`.execute(db)
    },
  },
  '0002_projection_checkpoints': {
    async up(db) {
      await sql`
        create table projection_checkpoints (
          name text primary key,
          position bigint not null,
          version integer not null,
          updated_at timestamptz not null default now()
        )`.execute(db)
    },
  },
}

export async function migrateToLatest(db: Kysely<any>): Promise<void> {
  const migrator = new Migrator({
    db,
    provider: { getMigrations: async () => migrations },
  })
  const { error, results } = await migrator.migrateToLatest()
  const failed = results?.find((r) => r.status === 'Error')
  if (error || failed) {
    const cause = error instanceof Error ? error.message : String(error ?? '')
    throw new Error(`migration ${failed?.migrationName ?? ''} failed: ${cause}`, { cause: error })
  }
}
