import { type Kysely, sql } from 'kysely'

/** Which event log the projections read: the checkpoints are positions in it, and in no other. */
export type LogKind = 'postgres' | 'eventstoredb'

/** The read models in this database were built from another log than the one dcp is starting on. */
export class CheckpointsFromOtherLogError extends Error {
  readonly code = 'CHECKPOINTS_FROM_OTHER_LOG'
  constructor(readonly recorded: LogKind, readonly starting: LogKind) {
    const how = (kind: LogKind) => (kind === 'postgres' ? 'the Postgres log (EVENTSTORE_URL unset)' : 'EventStoreDB (EVENTSTORE_URL)')
    super(
      `the read models in this database were built from ${how(recorded)}, and dcp is starting on ${how(starting)}: their ` +
        `projection checkpoints are positions in the other log and mean nothing in this one. Start on ${how(recorded)} again, ` +
        `or give dcp an empty database (DATABASE_URL) and it builds every read model from ${how(starting)} as it starts. ` +
        'dcp does not copy events from one log into the other.',
    )
    this.name = 'CheckpointsFromOtherLogError'
  }
}

/**
 * Records which log the checkpoints of this database belong to (table `event_log_kind`, one row), and
 * refuses `starting` when checkpoints of the other log are there. A database recorded before this check
 * existed is told by its `events` table: the Postgres log keeps its events there, EventStoreDB leaves it
 * empty. A recorded kind with no checkpoint past the start of a log is moved to `starting` (nothing was built).
 */
export async function claimCheckpointsLog(db: Kysely<any>, starting: LogKind): Promise<void> {
  // 1. what was recorded, whether any read model was built, and whether the Postgres log holds events
  const { rows } = await sql<{ kind: LogKind | null; built: boolean; postgres_events: boolean }>`
    select (select kind from public.event_log_kind) as kind,
           exists (select 1 from public.projection_checkpoints where position >= 0) as built,
           exists (select 1 from public.events) as postgres_events`.execute(db)
  const { kind, built, postgres_events: postgresEvents } = rows[0]!
  // 2. the log the checkpoints came from (any, when nothing was built)
  const recorded: LogKind = kind ?? (built ? (postgresEvents ? 'postgres' : 'eventstoredb') : starting)
  if (recorded !== starting && built) throw new CheckpointsFromOtherLogError(recorded, starting)
  // 3. record it; of two processes starting at once on different logs, the second one's check above ran
  // on a database with no checkpoint yet, so either may win: both have built nothing.
  if (kind !== starting) {
    await sql`insert into public.event_log_kind (one, kind) values (true, ${starting})
              on conflict (one) do update set kind = excluded.kind`.execute(db)
  }
}
