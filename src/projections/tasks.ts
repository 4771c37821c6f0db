import { type Kysely, sql } from 'kysely'
import { taskDecider, taskEventTypes } from '../domain/task.js'
import { liveSchema, type Projection } from './projection.js'

/**
 * Every task's current state: what the scheduler rebuilds its queue and leases from after a restart, and
 * what job views read. Inputs and outputs stay in the log.
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
    for (const recorded of events) {
      const event = taskDecider.parse({ type: recorded.type, data: recorded.data, schemaVersion: recorded.metadata.schemaVersion ?? 1 })
      const where = (q: any) => q.where('task_id', '=', event.data.task_id)
      switch (event.type) {
        case 'TaskQueued': {
          const d = event.data
          await trx
            .insertInto('tasks')
            .values({ task_id: d.task_id, job_id: d.job_id, customer_id: d.customer_id, model_id: d.model.id, status: 'queued', attempts: 0, queued_at: d.queued_at, updated_at: d.queued_at })
            .onConflict((oc) => oc.doNothing())
            .execute()
          break
        }
        case 'TaskLeased':
          await where(trx.updateTable('tasks').set({ status: 'leased', attempts: event.data.attempt, device_id: event.data.device_id, lease_id: event.data.lease_id, updated_at: event.data.leased_at })).execute()
          break
        case 'TaskCompleted':
          await where(trx.updateTable('tasks').set({ status: 'completed', lease_id: null, updated_at: event.data.completed_at })).execute()
          break
        case 'TaskAttemptFailed':
          await where(
            trx.updateTable('tasks').set({ status: event.data.requeued ? 'queued' : 'failed', lease_id: null, error: event.data.reason, updated_at: event.data.failed_at }),
          ).execute()
          break
        case 'TaskFailed':
          await where(trx.updateTable('tasks').set({ status: 'failed', lease_id: null, error: event.data.reason, updated_at: event.data.failed_at })).execute()
          break
        case 'TaskCancelled':
          await where(trx.updateTable('tasks').set({ status: 'cancelled', lease_id: null, updated_at: event.data.cancelled_at })).execute()
          break
      }
    }
  },
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
