import { type Kysely, type Migration, Migrator, sql } from 'kysely'

/**
 * Schema migrations of the tables dcp owns outside projections: the event log and the projection
 * checkpoints. Read-model tables are created by their projections (see src/projections/runner.ts), so
 * that a rebuild can create them again in a fresh schema.
 */
const migrations: Record<string, Migration> = {
  '0001_event_log': {
    async up(db) {
      // Positions are `(writing transaction id << 20) + n`, n counting the transaction's events: position
      // order is transaction order, so everything below `pg_snapshot_xmin << 20` is final (see
      // docs/event-store.md). The adapter gives positions explicitly; the default serves other writers.
      await sql`create sequence events_position_seq`.execute(db)
      await sql`
        create table events (
          position bigint primary key
            default ((pg_current_xact_id()::text::bigint << 20) | (nextval('events_position_seq') & 1048575)),
          stream_id text not null,
          revision bigint not null,
          event_id uuid not null unique,
          type text not null,
          data json not null,
          metadata json not null,
          recorded_at timestamptz not null default now(),
          unique (stream_id, revision)
        )`.execute(db)
      // Every position below this one is final: no transaction still running in this database can commit
      // an event under it. It is the lowest transaction id in progress, shifted as positions are. Other
      // databases' transactions cannot write here, so they do not hold readers back; an id the snapshot
      // lists but pg_stat_activity no longer shows (it just ended) counts, to be safe.
      await sql`
        create function dcp_position_bound() returns bigint language sql stable as $$
          select coalesce(min(x::text::bigint), pg_snapshot_xmax(pg_current_snapshot())::text::bigint) << 20
          from pg_snapshot_xip(pg_current_snapshot()) as x
          where not exists (
            select 1 from pg_stat_activity a
            where a.backend_xid::text::bigint = (x::text::bigint & 4294967295)
              and a.datname is distinct from current_database())
        $$`.execute(db)
      // Wakes subscribers after every committed insert, whoever the writer is (dropped by 0003).
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
  '0003_notify_after_commit': {
    // A NOTIFY inside the writing transaction holds Postgres' notify lock through the commit's WAL flush, so
    // appending transactions committed one at a time (measured: ~14% fewer appends per second). The event
    // store now sends `NOTIFY dcp_events` itself, after its transaction has committed (postgres.ts).
    async up(db) {
      await sql`drop trigger if exists events_notify on events`.execute(db)
      await sql`drop function if exists dcp_notify_events()`.execute(db)
    },
  },
  '0004_recorded_at_statement_time': {
    // The store's writers keep a transaction open for their next batch under load (copy-append.ts), so the
    // transaction's start (now()) can be a batch earlier than the append. The statement's time is when
    // the batch reached the database: after every append in it was made. Stable, as now() is, so COPY
    // still inserts rows in bulk.
    async up(db) {
      await sql`alter table events alter column recorded_at set default statement_timestamp()`.execute(db)
    },
  },
  '0005_event_log_kind': {
    // Which log the projection checkpoints are positions of (src/projections/log-kind.ts): one row.
    async up(db) {
      await sql`
        create table event_log_kind (
          one boolean primary key default true check (one),
          kind text not null check (kind in ('postgres', 'eventstoredb'))
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
