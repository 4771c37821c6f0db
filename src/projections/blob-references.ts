import { type Kysely, sql } from 'kysely'
import { trainingStream } from '../domain/training-job.js'
import type { EventStore, Position } from '../event-store/port.js'
import { readCheckpoints } from './checkpoints.js'
import { liveSchema } from './projection.js'

/** The read models the references come from; each must have applied the log up to where the collector looked. */
export const REFERENCE_PROJECTIONS = ['models', 'datasets', 'training', 'tasks', 'inference'] as const

/** The read models are behind the log (still catching up, or one of them stopped): nothing may be collected now. */
export class ReferencesBehindError extends Error {
  readonly code = 'REFERENCES_BEHIND'
}

/**
 * Every blob something still holds (sha256 hex digests), as of the log's position `head`. What holds one:
 * - a model or a dataset, until it has been deleted for longer than the grace period (`releasedBefore`);
 * - a task on a model (its device downloads the file, even of a deleted model) until it finished that long ago,
 *   and the blob of its inputs (kept out of its TaskQueued above the inline limit) as long: a restart reads
 *   the inputs of every open task back from it;
 * - the blob of a task's outputs (kept out of its TaskCompleted above the inline limit) as long as its result
 *   row exists: `GET /inference/:jobId` reads them from it;
 * - a training job's model file and dataset, until the job finished that long ago (a running or paused job
 *   reloads them when it resumes or the server restarts);
 * - every round's weights (checkpoints) of every training job, for as long as the job exists: jobs are never
 *   deleted, so checkpoints are never collected. A trained model is a model like any other.
 * Releasing a file only a grace period after its holder let it go covers a reader that saw the holder live a
 * moment ago and is copying the reference (a training job submitted on a model being deleted).
 */
export async function liveBlobReferences(db: Kysely<any>, store: EventStore, head: Position, releasedBefore: string): Promise<Set<string>> {
  // 1. the read models must have seen everything up to head (a projection that is behind misses references)
  const checkpoints = await readCheckpoints(db, REFERENCE_PROJECTIONS)
  const behind = REFERENCE_PROJECTIONS.filter((_, i) => (checkpoints[i]?.position ?? -1n) < head)
  if (behind.length > 0) throw new ReferencesBehindError(`read models ${behind.join(', ')} have not reached position ${head}`)
  const live = new Set<string>()
  const add = (checksum: string | null | undefined) => {
    const hex = checksum?.replace(/^sha256:/, '').toLowerCase()
    if (hex && /^[0-9a-f]{64}$/.test(hex)) live.add(hex)
  }
  // 2. models, datasets, the models open tasks run on and their inputs, the outputs of results
  // times are compared as times (the columns hold ISO-8601 text from the events)
  const before = sql`${releasedBefore}::timestamptz`
  const files = await sql<{ checksum: string }>`
    select checksum from ${sql.table(`${liveSchema('models')}.models`)} where deleted_at is null or deleted_at::timestamptz > ${before}
    union select checksum from ${sql.table(`${liveSchema('datasets')}.datasets`)} where deleted_at is null or deleted_at::timestamptz > ${before}
    union select m.checksum from ${sql.table(`${liveSchema('tasks')}.tasks`)} t join ${sql.table(`${liveSchema('models')}.models`)} m on m.model_id = t.model_id
      where t.finished_at is null or t.finished_at::timestamptz > ${before}
    union select inputs_sha256 from ${sql.table(`${liveSchema('tasks')}.tasks`)}
      where inputs_sha256 is not null and (finished_at is null or finished_at::timestamptz > ${before})
    union select outputs_sha256 from ${sql.table(`${liveSchema('inference')}.inference_results`)} where outputs_sha256 is not null`.execute(db)
  for (const row of files.rows) add(row.checksum)
  // 3. training jobs: their inputs while they may run, their checkpoints always (from the log: the read model keeps no weights)
  const jobs = await sql<{ job_id: string; model_checksum: string | null; dataset_checksum: string | null; inputs_held: boolean }>`
    select job_id, spec->>'model_checksum' as model_checksum, spec->'data_config'->>'dataset_checksum' as dataset_checksum,
      (finished_at is null or finished_at::timestamptz > ${before}) as inputs_held
    from ${sql.table(`${liveSchema('training')}.training_jobs`)}`.execute(db)
  for (const job of jobs.rows) {
    if (job.inputs_held) {
      add(job.model_checksum)
      add(job.dataset_checksum)
    }
    for (const event of await store.readStream(trainingStream(job.job_id))) {
      if (event.type === 'TrainingRoundCompleted') add((event.data as { weights_sha256?: string }).weights_sha256)
    }
  }
  return live
}
