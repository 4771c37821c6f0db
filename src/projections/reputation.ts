import type { Kysely } from 'kysely'
import { parseRecorded } from '../domain/decider.js'
import { taskDecider } from '../domain/task.js'
import { emptyReputation, type Reputation } from '../domain/validation.js'
import { liveSchema, type Projection } from './projection.js'
import { RowSet } from './rows.js'

/**
 * Each device's reputation, folded from task outcomes: results validated (its run accepted or agreeing)
 * and disputed (outvoted), tasks it completed, and its failed attempts of tasks that then completed on
 * another device. The scheduler quarantines by these figures (src/domain/validation.ts) and loads them
 * after a restart; `GET /devices/:id` shows them.
 */
export const reputationProjection: Projection = {
  name: 'reputation',
  version: 1,
  filter: { types: ['TaskCompleted', 'TaskValidated', 'DeviceReleased'] },
  tables: [{ name: 'device_reputation', primaryKey: ['device_id'] }],

  async createTables(db) {
    await db.schema
      .createTable('device_reputation')
      .addColumn('device_id', 'text', (c) => c.primaryKey())
      .addColumn('validated', 'integer', (c) => c.notNull())
      .addColumn('disputed', 'integer', (c) => c.notNull())
      .addColumn('completed', 'integer', (c) => c.notNull())
      .addColumn('failed_elsewhere_ok', 'integer', (c) => c.notNull())
      .execute()
  },

  async apply(trx, events) {
    // a release starts a device's reputation afresh (else it would be quarantined again at once)
    const parsed = events.map((recorded) => (recorded.type === 'DeviceReleased' ? { type: 'DeviceReleased' as const, data: { device_id: String((recorded.data as { device_id: unknown }).device_id) } } : parseRecorded(taskDecider, recorded)))
    const rows = new RowSet<ReputationRow>('device_reputation', 'device_id')
    await rows.load(
      trx,
      parsed.flatMap((e) => (e.type === 'TaskCompleted' ? [e.data.device_id, ...e.data.failed_on] : e.type === 'TaskValidated' ? e.data.runs.map((r) => r.device_id) : e.type === 'DeviceReleased' ? [e.data.device_id] : [])),
    )
    const change = (deviceId: string, f: (r: ReputationRow) => void) => {
      const row = rows.get(deviceId) ?? { device_id: deviceId, validated: 0, disputed: 0, completed: 0, failed_elsewhere_ok: 0 }
      f(row)
      rows.put(row)
    }
    for (const event of parsed) {
      if (event.type === 'DeviceReleased') rows.put({ device_id: event.data.device_id, validated: 0, disputed: 0, completed: 0, failed_elsewhere_ok: 0 })
      else if (event.type === 'TaskCompleted') {
        const d = event.data
        if (!d.validated) change(d.device_id, (r) => r.completed++)
        for (const failed of new Set(d.failed_on)) if (failed !== d.device_id) change(failed, (r) => r.failed_elsewhere_ok++)
      } else if (event.type === 'TaskValidated') {
        for (const run of event.data.runs) {
          change(run.device_id, (r) => {
            if (run.verdict === 'outvoted') r.disputed++
            else {
              r.validated++
              r.completed++
            }
          })
        }
      }
    }
    await rows.save(trx)
  },
}

interface ReputationRow extends Record<string, unknown> {
  device_id: string
  validated: number
  disputed: number
  completed: number
  failed_elsewhere_ok: number
}

const schema = liveSchema(reputationProjection.name)

const toReputation = (row: ReputationRow): Reputation => ({ validated: row.validated, disputed: row.disputed, completed: row.completed, failedElsewhereOk: row.failed_elsewhere_ok })

/** Every device's reputation (the scheduler's after a restart). */
export async function allReputations(db: Kysely<any>): Promise<Map<string, Reputation>> {
  const rows = (await db.withSchema(schema).selectFrom('device_reputation').selectAll().execute()) as ReputationRow[]
  return new Map(rows.map((row) => [row.device_id, toReputation(row)]))
}

/** One device's reputation (zeros when it has none yet). */
export async function deviceReputation(db: Kysely<any>, deviceId: string): Promise<Reputation> {
  const row = (await db.withSchema(schema).selectFrom('device_reputation').selectAll().where('device_id', '=', deviceId).executeTakeFirst()) as ReputationRow | undefined
  return row ? toReputation(row) : emptyReputation()
}
