import { type Kysely, sql } from 'kysely'
import { type DeviceEvent, deviceDecider } from '../domain/device.js'
import { inputCount, type TaskEvent, taskDecider, taskEventTypes } from '../domain/task.js'
import { parseRecorded } from '../domain/decider.js'
import { liveSchema, type Projection } from './projection.js'
import { RowSet } from './rows.js'

/**
 * Every task's current state: what the scheduler rebuilds its queue and leases from after a restart, and
 * what job views and the dashboard read: its project, how many inputs, the kind of device (`aws` or `user`)
 * its attempt is billed by, when it finished and its latency (for every task, in a project or not). Inputs
 * and outputs stay in the log (inputs above the scheduler's inline limit in the blob `inputs_sha256`).
 * A batch is folded in memory (rows.ts).
 */
export const tasksProjection: Projection = {
  name: 'tasks',
  // 2: project_id, inputs, instance_type, finished_at, latency_ms (the dashboard read them from the projects
  // read model, which has only the tasks of a project); 3: inputs_sha256 (the blob of inputs kept out of
  // TaskQueued, which the blob collector keeps while the task is open)
  version: 3,
  filter: { types: [...taskEventTypes, 'DeviceRegistered'] },
  tables: [
    { name: 'tasks', primaryKey: ['task_id'] },
    { name: 'device_instance_types', primaryKey: ['device_id'] },
  ],

  async createTables(db) {
    await db.schema
      .createTable('tasks')
      .addColumn('task_id', 'text', (c) => c.primaryKey())
      .addColumn('job_id', 'text', (c) => c.notNull())
      .addColumn('customer_id', 'text', (c) => c.notNull())
      .addColumn('project_id', 'text')
      .addColumn('model_id', 'text', (c) => c.notNull())
      .addColumn('inputs', 'integer', (c) => c.notNull())
      .addColumn('inputs_sha256', 'text')
      .addColumn('instance_type', 'text')
      .addColumn('status', 'text', (c) => c.notNull())
      .addColumn('attempts', 'integer', (c) => c.notNull())
      .addColumn('device_id', 'text')
      .addColumn('lease_id', 'text')
      .addColumn('error', 'text')
      .addColumn('queued_at', 'text', (c) => c.notNull())
      .addColumn('finished_at', 'text')
      .addColumn('latency_ms', 'double precision')
      .addColumn('updated_at', 'text', (c) => c.notNull())
      .execute()
    await db.schema.createIndex('tasks_open').on('tasks').columns(['status', 'queued_at']).execute()
    await db.schema.createIndex('tasks_by_job').on('tasks').columns(['job_id']).execute()
    await db.schema.createIndex('tasks_by_customer').on('tasks').columns(['customer_id', 'updated_at']).execute()
    // a device's registered kind: the instance type of tasks whose events predate the recorded one
    await db.schema.createTable('device_instance_types').addColumn('device_id', 'text', (c) => c.primaryKey()).addColumn('instance_type', 'text', (c) => c.notNull()).execute()
  },

  async apply(trx, events) {
    const parsed = events.map((recorded): TaskEvent | Extract<DeviceEvent, { type: 'DeviceRegistered' }> => {
      if (recorded.type !== 'DeviceRegistered') return parseRecorded(taskDecider, recorded)
      const event = parseRecorded(deviceDecider, recorded)
      if (event.type !== 'DeviceRegistered') throw new Error(`not a DeviceRegistered: ${event.type}`)
      return event
    })
    const tasks = new RowSet<TaskRow>('tasks', 'task_id')
    const instanceTypes = new RowSet<{ device_id: string; instance_type: string }>('device_instance_types', 'device_id')
    await tasks.load(trx, parsed.flatMap((e) => (e.type === 'DeviceRegistered' ? [] : [e.data.task_id])))
    await instanceTypes.load(trx, parsed.flatMap((e) => (e.type === 'TaskLeased' || e.type === 'TaskCompleted' ? [e.data.device_id] : [])))
    /** The type the attempt is billed by (recorded with it); the device's registration only for old events. */
    const instanceTypeOf = (deviceId: string, recorded: string | null | undefined) => recorded ?? instanceTypes.get(deviceId)?.instance_type ?? null
    /** Ends a task once, as the projects read model does: its first end is its finish (a held result is not one). */
    const finish = (id: string, at: string, completed: boolean) => {
      const task = tasks.get(id)
      if (!task || task.finished_at !== null) return {}
      return { finished_at: at, ...(completed ? { latency_ms: Date.parse(at) - Date.parse(task.queued_at) } : {}) }
    }
    for (const event of parsed) {
      if (event.type === 'DeviceRegistered') {
        instanceTypes.put({ device_id: event.data.device_id, instance_type: event.data.instance_type })
        continue
      }
      const id = event.data.task_id
      switch (event.type) {
        case 'TaskQueued': {
          const d = event.data
          tasks.insert({
            task_id: id, job_id: d.job_id, customer_id: d.customer_id, project_id: d.project_id ?? null, model_id: d.model.id, inputs: inputCount(d), inputs_sha256: d.inputs_blob?.sha256 ?? null, instance_type: null,
            status: 'queued', attempts: 0, device_id: null, lease_id: null, error: null, queued_at: d.queued_at, finished_at: null, latency_ms: null, updated_at: d.queued_at,
          })
          break
        }
        case 'TaskLeased':
          tasks.update(id, { status: 'leased', attempts: event.data.attempt, device_id: event.data.device_id, instance_type: instanceTypeOf(event.data.device_id, event.data.instance_type), lease_id: event.data.lease_id, updated_at: event.data.leased_at })
          break
        case 'TaskCompleted': {
          const d = event.data
          const ran = d.device_id ? { device_id: d.device_id, instance_type: instanceTypeOf(d.device_id, d.instance_type ?? tasks.get(id)?.instance_type) } : {}
          tasks.update(id, { status: 'completed', lease_id: null, ...ran, ...finish(id, d.completed_at, true), updated_at: d.completed_at })
          break
        }
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
          tasks.update(id, { status: 'failed', lease_id: null, error: event.data.reason, ...finish(id, event.data.failed_at, false), updated_at: event.data.failed_at })
          break
        case 'TaskCancelled':
          tasks.update(id, { status: 'cancelled', lease_id: null, ...finish(id, event.data.cancelled_at, false), updated_at: event.data.cancelled_at })
          break
      }
    }
    await instanceTypes.save(trx)
    await tasks.save(trx)
  },
}

interface TaskRow extends Record<string, unknown> {
  task_id: string
  job_id: string
  customer_id: string
  project_id: string | null
  model_id: string
  inputs: number
  inputs_sha256: string | null
  instance_type: string | null
  status: string
  attempts: number
  device_id: string | null
  lease_id: string | null
  error: string | null
  queued_at: string
  finished_at: string | null
  latency_ms: number | null
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
