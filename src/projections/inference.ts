import { type Kysely, sql } from 'kysely'
import { inferenceDecider, inferenceEventTypes } from '../domain/inference-job.js'
import { taskDecider } from '../domain/task.js'
import { parseRecorded } from '../domain/decider.js'
import { liveSchema, type Projection } from './projection.js'
import { RowSet } from './rows.js'
import type { BlobStore } from '../blobs/blob-store.js'
import { OutputsUnavailableError, readOutputs } from '../commands/task-outputs.js'

/**
 * Inference jobs and their results: a row per job with its counts (in inputs), a row per task with the
 * outputs of its run of inputs. Fed by the job's own events and by its tasks' outcomes.
 */
export const inferenceProjection: Projection = {
  name: 'inference',
  // 4: results record the instance type the task was billed as
  // 5: outputs kept out of TaskCompleted are named by their blob (outputs_sha256, output_values)
  version: 5,
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
    await db.schema.createIndex('inference_jobs_by_project').on('inference_jobs').columns(['project_id']).execute()
    await db.schema.createIndex('inference_jobs_by_customer').on('inference_jobs').columns(['customer_id', 'updated_at']).execute()
    await db.schema
      .createTable('inference_results')
      .addColumn('task_id', 'text', (c) => c.primaryKey())
      .addColumn('job_id', 'text', (c) => c.notNull())
      /** Index of its first input in the job, and how many it carries. */
      .addColumn('first_idx', 'integer', (c) => c.notNull())
      .addColumn('count', 'integer', (c) => c.notNull())
      .addColumn('status', 'text', (c) => c.notNull())
      .addColumn('outputs', 'jsonb')
      /**
       * Outputs in the blob store (TaskCompleted named a blob instead of carrying them): its hash and length,
       * and the values of all its outputs (the page limit counts them without reading the blob). Null with
       * `outputs` inline.
       */
      .addColumn('outputs_sha256', 'text')
      .addColumn('outputs_bytes', 'integer')
      .addColumn('output_values', 'integer')
      .addColumn('error', 'text')
      .addColumn('device_id', 'text')
      /** The device's kind the task ran and was billed as (`aws`, `user`); null before outcomes recorded it. */
      .addColumn('instance_type', 'text')
      .addColumn('finished_at', 'text')
      .execute()
    await db.schema.createIndex('inference_results_by_job').on('inference_results').columns(['job_id', 'first_idx']).execute()
  },

  async apply(trx, events) {
    const parsed = events.map((recorded) => (recorded.type.startsWith('Inference') ? parseRecorded(inferenceDecider, recorded) : parseRecorded(taskDecider, recorded)))
    const jobs = new RowSet<JobRow & Record<string, unknown>>('inference_jobs', 'job_id')
    const results = new RowSet<ResultRow>('inference_results', 'task_id')
    await results.load(trx, parsed.flatMap((e) => (e.type.startsWith('Task') ? [(e.data as { task_id: string }).task_id] : [])))
    const jobIds = parsed.flatMap((e) => (e.type.startsWith('Inference') ? [(e.data as { job_id: string }).job_id] : [results.get((e.data as { task_id: string }).task_id)?.job_id ?? []].flat()))
    await jobs.load(trx, jobIds)
    /** Moves a queued task's row to its end state and counts its inputs on its job (once: only from `queued`). */
    const finish = (taskId: string, values: Partial<ResultRow> & { finished_at: string }, counter: 'completed' | 'failed' | undefined) => {
      const row = results.get(taskId)
      if (!row || row.status !== 'queued') return
      results.update(taskId, values)
      const job = jobs.get(row.job_id)
      if (job) jobs.update(row.job_id, { updated_at: values.finished_at, ...(counter ? { [counter]: job[counter] + row.count } : {}) })
    }
    for (const event of parsed) {
      switch (event.type) {
        case 'InferenceRequested': {
          const d = event.data
          const total = d.tasks.reduce((n, task) => n + task.inputs, 0)
          jobs.insert({ job_id: d.job_id, customer_id: d.customer_id, project_id: d.project_id, model_id: d.model_id, kind: d.kind, mode: d.mode, name: d.name, total_tasks: total, completed: 0, failed: 0, cancelled: false, requested_at: d.requested_at, updated_at: d.requested_at })
          let first = 0
          for (const task of d.tasks) {
            results.insert({ task_id: task.task_id, job_id: d.job_id, first_idx: first, count: task.inputs, status: 'queued', outputs: null, outputs_sha256: null, outputs_bytes: null, output_values: null, error: null, device_id: null, instance_type: null, finished_at: null })
            first += task.inputs
          }
          break
        }
        case 'InferenceCancelled':
          jobs.update(event.data.job_id, { cancelled: true, updated_at: event.data.cancelled_at })
          break
        case 'TaskCompleted': {
          const { task_id, outputs, outputs_blob, device_id, instance_type, completed_at } = event.data
          const stored = outputs_blob ? { outputs_sha256: outputs_blob.sha256, outputs_bytes: outputs_blob.bytes, output_values: outputs_blob.values } : { outputs }
          finish(task_id, { status: 'completed', ...stored, device_id, instance_type, finished_at: completed_at }, 'completed')
          break
        }
        case 'TaskFailed':
          finish(event.data.task_id, { status: 'failed', error: event.data.reason, finished_at: event.data.failed_at }, 'failed')
          break
        case 'TaskCancelled':
          finish(event.data.task_id, { status: 'cancelled', finished_at: event.data.cancelled_at }, undefined)
          break
        default:
          break
      }
    }
    await jobs.save(trx)
    await results.save(trx)
  },
}

interface ResultRow extends Record<string, unknown> {
  task_id: string
  job_id: string
  first_idx: number
  count: number
  status: string
  outputs: unknown
  outputs_sha256: string | null
  outputs_bytes: number | null
  output_values: number | null
  error: string | null
  device_id: string | null
  instance_type: string | null
  finished_at: string | null
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

export interface InputResult {
  idx: number
  task_id: string
  /** Of the task that carries the input. */
  status: 'queued' | 'completed' | 'failed' | 'cancelled'
  output: { data: number[]; shape: number[] } | null
  error: string | null
  device_id: string | null
  finished_at: string | null
}

/** Where `jobResults` reads outputs kept out of their events, and where it reports one it cannot read. */
export interface StoredOutputs {
  blobs?: BlobStore
  log?: (message: string) => void
}

/**
 * The results of a page of the job's inputs, in input order (one per input, whatever task carried it). The
 * page ends early once its outputs hold `maxValues` values (read a few tasks at a time, so a page of large
 * outputs is never loaded whole): `results` are then fewer than asked, and `more` says so. Outputs in the
 * blob store are read for the tasks of the page only; a blob that cannot be read gives its task's results
 * an `error` (the task stays `completed`) and is logged.
 */
export async function jobResults(db: Kysely<any>, jobId: string, page: { limit: number; offset: number }, maxValues = Infinity, stored: StoredOutputs = {}): Promise<{ results: InputResult[]; more: boolean }> {
  const end = page.offset + page.limit
  const results: InputResult[] = []
  let values = 0
  let from = page.offset
  for (;;) {
    const tasks = await db
      .withSchema(schema)
      .selectFrom('inference_results')
      .select(['task_id', 'first_idx', 'count', 'status', 'outputs', 'outputs_sha256', 'outputs_bytes', 'output_values', 'error', 'device_id', 'finished_at'])
      .where('job_id', '=', jobId)
      .where('first_idx', '<', end)
      .where(sql<boolean>`first_idx + count > ${from}`)
      .orderBy('first_idx')
      .limit(RESULT_TASKS_PER_READ)
      .execute()
    for (const task of tasks) {
      let outputs = task.outputs as InputResult['output'][] | null
      let error: string | null = task.error
      // outputs in a blob: what the page limit counts is known without it (every output of a task is the same size)
      const blobbed = task.outputs_sha256 ? Math.ceil(task.output_values / task.count) : undefined
      for (let idx = Math.max(task.first_idx, from); idx < Math.min(task.first_idx + task.count, end); idx++) {
        const size = blobbed ?? outputs?.[idx - task.first_idx]?.data.length ?? 0
        // always at least one result, so a page moves on whatever the budget
        if (results.length > 0 && values + size > maxValues) return { results, more: true }
        if (blobbed !== undefined && !outputs && !error) ({ outputs, error } = await readRowOutputs(task, stored))
        const output = outputs?.[idx - task.first_idx] ?? null
        values += output?.data.length ?? size
        results.push({ idx, task_id: task.task_id, status: task.status, output, error, device_id: task.device_id, finished_at: task.finished_at })
      }
    }
    if (tasks.length < RESULT_TASKS_PER_READ) return { results, more: false }
    const last = tasks.at(-1)!
    from = last.first_idx + last.count
    if (from >= end) return { results, more: false }
  }
}

/** A task's outputs read back from their blob, or why they cannot be (logged). */
async function readRowOutputs(task: { task_id: string; count: number; outputs_sha256: string; outputs_bytes: number; output_values: number }, stored: StoredOutputs): Promise<{ outputs: InputResult['output'][] | null; error: string | null }> {
  try {
    return { outputs: await readOutputs(stored.blobs, { sha256: task.outputs_sha256, bytes: task.outputs_bytes, count: task.count, values: task.output_values }), error: null }
  } catch (error) {
    if (!(error instanceof OutputsUnavailableError)) throw error
    stored.log?.(`task ${task.task_id}: ${error.message}`)
    return { outputs: null, error: `the task completed, but ${error.message}` }
  }
}

/** Tasks read at once for a page of results (a task of a batch carries up to 4,096 inputs). */
const RESULT_TASKS_PER_READ = 64

/** The unfinished jobs of a project. */
export async function openJobsOfProject(db: Kysely<any>, customerId: string, projectId: string): Promise<JobRow[]> {
  const jobs = (await db.withSchema(schema).selectFrom('inference_jobs').selectAll().where('customer_id', '=', customerId).where('project_id', '=', projectId).where('cancelled', '=', false).execute()) as JobRow[]
  return jobs.filter((job) => job.completed + job.failed < job.total_tasks)
}

export async function openTaskIds(db: Kysely<any>, jobId: string): Promise<string[]> {
  const rows = await db.withSchema(schema).selectFrom('inference_results').select('task_id').where('job_id', '=', jobId).where('status', '=', 'queued').execute()
  return rows.map((r) => r.task_id)
}
