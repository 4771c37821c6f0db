import { type Kysely, sql } from 'kysely'
import { inferenceDecider, inferenceEventTypes } from '../domain/inference-job.js'
import { taskDecider } from '../domain/task.js'
import { liveSchema, type Projection } from './projection.js'

/**
 * Inference jobs and their results: a row per job with its counts, a row per input with its outcome.
 * Fed by the job's own events and by its tasks' outcomes.
 */
export const inferenceProjection: Projection = {
  name: 'inference',
  version: 1,
  filter: { types: [...inferenceEventTypes, 'TaskCompleted', 'TaskFailed', 'TaskCancelled'] },
  tables: [
    { name: 'inference_jobs', primaryKey: ['job_id'] },
    { name: 'inference_results', primaryKey: ['task_id'] },
  ],

  async createTables(db) {
    await db.schema
      .createTable('inference_jobs')
      .addColumn('job_id', 'text', (c) => c.primaryKey())
      .addColumn('customer_id', 'text', (c) => c.notNull())
      .addColumn('project_id', 'text')
      .addColumn('model_id', 'text', (c) => c.notNull())
      .addColumn('kind', 'text', (c) => c.notNull())
      .addColumn('mode', 'text', (c) => c.notNull())
      .addColumn('name', 'text')
      .addColumn('total_tasks', 'integer', (c) => c.notNull())
      .addColumn('completed', 'integer', (c) => c.notNull())
      .addColumn('failed', 'integer', (c) => c.notNull())
      .addColumn('cancelled', 'boolean', (c) => c.notNull())
      .addColumn('requested_at', 'text', (c) => c.notNull())
      .addColumn('updated_at', 'text', (c) => c.notNull())
      .execute()
    await db.schema
      .createTable('inference_results')
      .addColumn('task_id', 'text', (c) => c.primaryKey())
      .addColumn('job_id', 'text', (c) => c.notNull())
      .addColumn('idx', 'integer', (c) => c.notNull())
      .addColumn('status', 'text', (c) => c.notNull())
      .addColumn('output', 'jsonb')
      .addColumn('error', 'text')
      .addColumn('device_id', 'text')
      .addColumn('finished_at', 'text')
      .execute()
    await db.schema.createIndex('inference_results_by_job').on('inference_results').columns(['job_id', 'idx']).execute()
  },

  async apply(trx, events) {
    for (const recorded of events) {
      const version = recorded.metadata.schemaVersion ?? 1
      if (recorded.type.startsWith('Inference')) {
        const event = inferenceDecider.parse({ type: recorded.type, data: recorded.data, schemaVersion: version })
        if (event.type === 'InferenceRequested') {
          const d = event.data
          await trx
            .insertInto('inference_jobs')
            .values({ job_id: d.job_id, customer_id: d.customer_id, project_id: d.project_id, model_id: d.model_id, kind: d.kind, mode: d.mode, name: d.name, total_tasks: d.task_ids.length, completed: 0, failed: 0, cancelled: false, requested_at: d.requested_at, updated_at: d.requested_at })
            .onConflict((oc) => oc.doNothing())
            .execute()
          for (let i = 0; i < d.task_ids.length; i += 5000) {
            const rows = d.task_ids.slice(i, i + 5000).map((task_id, j) => ({ task_id, job_id: d.job_id, idx: i + j, status: 'queued' }))
            await trx.insertInto('inference_results').values(rows).onConflict((oc) => oc.doNothing()).execute()
          }
        } else {
          await trx.updateTable('inference_jobs').set({ cancelled: true, updated_at: event.data.cancelled_at }).where('job_id', '=', event.data.job_id).execute()
        }
        continue
      }
      const task = taskDecider.parse({ type: recorded.type, data: recorded.data, schemaVersion: version })
      if (task.type === 'TaskCompleted') {
        const { task_id, output, device_id, completed_at } = task.data
        await finish(trx, task_id, { status: 'completed', output: JSON.stringify(output), device_id, finished_at: completed_at }, 'completed')
      } else if (task.type === 'TaskFailed') {
        await finish(trx, task.data.task_id, { status: 'failed', error: task.data.reason, finished_at: task.data.failed_at }, 'failed')
      } else if (task.type === 'TaskCancelled') {
        await finish(trx, task.data.task_id, { status: 'cancelled', finished_at: task.data.cancelled_at }, undefined)
      }
    }
  },
}

/** Moves a queued result to its end state and counts it on its job (once: only from `queued`). */
async function finish(trx: Kysely<any>, taskId: string, values: Record<string, unknown>, counter: 'completed' | 'failed' | undefined) {
  const moved = await trx.updateTable('inference_results').set(values).where('task_id', '=', taskId).where('status', '=', 'queued').returning('job_id').executeTakeFirst()
  if (!moved) return
  const set: Record<string, unknown> = { updated_at: values.finished_at }
  if (counter) set[counter] = sql`${sql.ref(counter)} + 1`
  await trx.updateTable('inference_jobs').set(set).where('job_id', '=', moved.job_id).execute()
}

const schema = liveSchema(inferenceProjection.name)

export type JobStatus = 'queued' | 'running' | 'completed' | 'failed' | 'cancelled'

export function jobStatus(job: { total_tasks: number; completed: number; failed: number; cancelled: boolean }): JobStatus {
  if (job.cancelled) return 'cancelled'
  const done = job.completed + job.failed
  if (done === job.total_tasks) return job.failed === job.total_tasks ? 'failed' : 'completed'
  return done > 0 ? 'running' : 'queued'
}

export interface JobRow {
  job_id: string
  customer_id: string
  project_id: string | null
  model_id: string
  kind: 'single' | 'batch'
  mode: 'sync' | 'async'
  name: string | null
  total_tasks: number
  completed: number
  failed: number
  cancelled: boolean
  requested_at: string
  updated_at: string
}

export async function findJob(db: Kysely<any>, customerId: string, jobId: string): Promise<JobRow | undefined> {
  return db.withSchema(schema).selectFrom('inference_jobs').selectAll().where('job_id', '=', jobId).where('customer_id', '=', customerId).executeTakeFirst() as Promise<JobRow | undefined>
}

export async function jobResults(db: Kysely<any>, jobId: string, page: { limit: number; offset: number }) {
  return db
    .withSchema(schema)
    .selectFrom('inference_results')
    .select(['idx', 'task_id', 'status', 'output', 'error', 'device_id', 'finished_at'])
    .where('job_id', '=', jobId)
    .orderBy('idx')
    .limit(page.limit)
    .offset(page.offset)
    .execute()
}

export async function openTaskIds(db: Kysely<any>, jobId: string): Promise<string[]> {
  const rows = await db.withSchema(schema).selectFrom('inference_results').select('task_id').where('job_id', '=', jobId).where('status', '=', 'queued').execute()
  return rows.map((r) => r.task_id)
}
