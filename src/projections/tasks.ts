import { type Kysely, sql } from 'kysely'
import { taskDecider, taskEventTypes } from '../domain/task.js'
import { parseRecorded } from '../domain/decider.js'
import { liveSchema, type Projection } from './projection.js'
import { RowSet } from './rows.js'

/**
 * Every task's current state: what the scheduler rebuilds its queue and leases from after a restart, and
 * what job views read. Inputs and outputs stay in the log. A batch is folded in memory (rows.ts).
 */
export const tasksProjection: Projection = {
  name: 'tasks',
  version: 1,
  filter: { types: taskEventTypes },
  tables: [{ name: 'tasks', primaryKey: ['task_id'] }],

  async createTables(db) {
    await db.schema
      .createTable('tasks')
      .addColumn('task_id', 'text', (c) => c.primaryKey())
      .addColumn('job_id', 'text', (c) => c.notNull())
      .addColumn('customer_id', 'text', (c) => c.notNull())
      .addColumn('model_id', 'text', (c) => c.notNull())
      .addColumn('status', 'text', (c) => c.notNull())
      .addColumn('attempts', 'integer', (c) => c.notNull())
      .addColumn('device_id', 'text')
      .addColumn('lease_id', 'text')
      .addColumn('error', 'text')
      .addColumn('queued_at', 'text', (c) => c.notNull())
      .addColumn('updated_at', 'text', (c) => c.notNull())
      .execute()
    await db.schema.createIndex('tasks_open').on('tasks').columns(['status', 'queued_at']).execute()
    await db.schema.createIndex('tasks_by_job').on('tasks').columns(['job_id']).execute()
  },

  async apply(trx, events) {
    const parsed = events.map((recorded) => parseRecorded(taskDecider, recorded))
    const tasks = new RowSet<TaskRow>('tasks', 'task_id')
    await tasks.load(trx, parsed.map((e) => e.data.task_id))
    for (const event of parsed) {
      const id = event.data.task_id
      switch (event.type) {
        case 'TaskQueued': {
          const d = event.data
          tasks.insert({ task_id: id, job_id: d.job_id, customer_id: d.customer_id, model_id: d.model.id, status: 'queued', attempts: 0, device_id: null, lease_id: null, error: null, queued_at: d.queued_at, updated_at: d.queued_at })
          break
        }
        case 'TaskLeased':
          tasks.update(id, { status: 'leased', attempts: event.data.attempt, device_id: event.data.device_id, lease_id: event.data.lease_id, updated_at: event.data.leased_at })
          break
        case 'TaskCompleted':
          tasks.update(id, { status: 'completed', lease_id: null, updated_at: event.data.completed_at })
          break
        case 'TaskResultHeld':
          tasks.update(id, { status: 'queued', lease_id: null, updated_at: event.data.held_at })
          break
        case 'TaskValidated':
          break
        case 'TaskAttemptFailed':
          tasks.update(id, { status: event.data.requeued ? 'queued' : 'failed', lease_id: null, error: event.data.reason, updated_at: event.data.failed_at })
          break
        case 'TaskLeaseReturned':
          tasks.update(id, { status: 'queued', attempts: Math.max(0, (tasks.get(id)?.attempts ?? 1) - 1), lease_id: null, updated_at: event.data.returned_at })
          break
        case 'TaskFailed':
          tasks.update(id, { status: 'failed', lease_id: null, error: event.data.reason, updated_at: event.data.failed_at })
          break
        case 'TaskCancelled':
          tasks.update(id, { status: 'cancelled', lease_id: null, updated_at: event.data.cancelled_at })
          break
      }
    }
    await tasks.save(trx)
  },
}

interface TaskRow extends Record<string, unknown> {
  task_id: string
  job_id: string
  customer_id: string
  model_id: string
  status: string
  attempts: number
  device_id: string | null
  lease_id: string | null
  error: string | null
  queued_at: string
  updated_at: string
}

const schema = liveSchema(tasksProjection.name)

/** Tasks waiting for a device or held by one: the scheduler's state after a restart. */
export async function openTasks(db: Kysely<any>): Promise<{ task_id: string; status: 'queued' | 'leased'; device_id: string | null; lease_id: string | null }[]> {
  return db
    .withSchema(schema)
    .selectFrom('tasks')
    .select(['task_id', 'status', 'device_id', 'lease_id'])
    .where('status', 'in', ['queued', 'leased'])
    .orderBy('queued_at')
    .orderBy('task_id')
    .execute()
}

export async function countOpenTasks(db: Kysely<any>): Promise<{ queued: number; leased: number }> {
  const rows = await db.withSchema(schema).selectFrom('tasks').select(['status', sql<string>`count(*)`.as('n')]).where('status', 'in', ['queued', 'leased']).groupBy('status').execute()
  const n = (s: string) => Number(rows.find((r) => r.status === s)?.n ?? 0)
  return { queued: n('queued'), leased: n('leased') }
}
