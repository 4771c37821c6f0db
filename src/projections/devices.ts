import { type Kysely, sql } from 'kysely'
import { deviceDecider, deviceEventTypes, HeartbeatReceived } from '../domain/device.js'
import { taskDecider } from '../domain/task.js'
import type { RecordedEvent } from '../event-store/port.js'
import { parseRecorded } from '../domain/decider.js'
import { liveSchema, type Projection } from './projection.js'
import { RowSet } from './rows.js'

/**
 * The fleet: each device with its description, whether it is connected, its last heartbeat and how many
 * tasks it holds; status `offline` (not connected), `busy` (holds a task) or `idle`. Heartbeats come by the
 * thousand per second, so a batch is folded in memory first and written with one statement.
 */
export const devicesProjection: Projection = {
  name: 'devices',
  // 2: enrollment token, ban and quarantine columns
  version: 2,
  filter: { types: [...deviceEventTypes, 'HeartbeatReceived', 'TaskLeased', 'TaskCompleted', 'TaskResultHeld', 'TaskValidated', 'TaskAttemptFailed', 'TaskLeaseReturned', 'TaskCancelled'] },
  tables: [{ name: 'devices', primaryKey: ['device_id'] }],

  async createTables(db) {
    await db.schema
      .createTable('devices')
      .addColumn('device_id', 'text', (c) => c.primaryKey())
      .addColumn('platform', 'text', (c) => c.notNull())
      .addColumn('sdk_version', 'text', (c) => c.notNull())
      .addColumn('sdk_uuid', 'text', (c) => c.notNull())
      .addColumn('instance_type', 'text', (c) => c.notNull())
      .addColumn('hardware', 'jsonb', (c) => c.notNull())
      .addColumn('capabilities', 'jsonb', (c) => c.notNull())
      .addColumn('connected', 'boolean', (c) => c.notNull())
      .addColumn('running_tasks', 'integer', (c) => c.notNull())
      .addColumn('heartbeats', 'bigint', (c) => c.notNull())
      .addColumn('load', 'double precision')
      .addColumn('memory_used_mb', 'double precision')
      .addColumn('power_watts', 'double precision')
      .addColumn('registered_at', 'text', (c) => c.notNull())
      .addColumn('last_seen_at', 'text', (c) => c.notNull())
      .addColumn('disconnect_reason', 'text')
      .addColumn('enrollment_token_id', 'text')
      .addColumn('banned_reason', 'text')
      .addColumn('banned_at', 'text')
      .addColumn('quarantine_reason', 'text')
      .addColumn('quarantined_at', 'text')
      .execute()
    await db.schema.createIndex('devices_by_status').on('devices').columns(['connected', 'running_tasks']).execute()
  },

  async apply(trx, events) {
    const rows = new RowSet<DeviceRow>('devices', 'device_id', (row) => ({ ...row, heartbeats: Number(row.heartbeats) }))
    await rows.load(trx, events.map(deviceIdOf).filter((id): id is string => id !== undefined))
    for (const event of events) fold(rows, event)
    await rows.save(trx)
  },
}

interface DeviceRow extends Record<string, unknown> {
  device_id: string
  platform: string
  sdk_version: string
  sdk_uuid: string
  instance_type: string
  hardware: unknown
  capabilities: unknown
  connected: boolean
  running_tasks: number
  heartbeats: number
  load: number | null
  memory_used_mb: number | null
  power_watts: number | null
  registered_at: string
  last_seen_at: string
  disconnect_reason: string | null
  enrollment_token_id: string | null
  banned_reason: string | null
  banned_at: string | null
  quarantine_reason: string | null
  quarantined_at: string | null
}

function deviceIdOf(event: RecordedEvent): string | undefined {
  const data = event.data as { device_id?: unknown }
  return typeof data?.device_id === 'string' ? data.device_id : undefined
}

function fold(rows: RowSet<DeviceRow>, recorded: RecordedEvent): void {
  if (recorded.type === 'HeartbeatReceived') {
    const { data } = HeartbeatReceived.parse({ type: recorded.type, data: recorded.data })
    const row = rows.get(data.device_id)
    if (row) rows.update(data.device_id, { heartbeats: row.heartbeats + 1, load: data.load, memory_used_mb: data.memory_used_mb, power_watts: data.power_watts, last_seen_at: data.at })
    return
  }
  if (recorded.type.startsWith('Device')) {
    const event = parseRecorded(deviceDecider, recorded)
    const id = event.data.device_id
    switch (event.type) {
      case 'DeviceRegistered': {
        const { token_hash: _hash, registered_at, ...device } = event.data
        rows.put({
          ...device, connected: false, running_tasks: 0, heartbeats: 0, load: null, memory_used_mb: null, power_watts: null,
          registered_at, last_seen_at: registered_at, disconnect_reason: null,
          banned_reason: null, banned_at: null, quarantine_reason: null, quarantined_at: null,
        })
        return
      }
      case 'DeviceConnected': {
        const { connected_at, ...device } = event.data
        rows.update(id, { ...device, connected: true, last_seen_at: connected_at, disconnect_reason: null })
        return
      }
      case 'DeviceDisconnected':
        rows.update(id, { connected: false, last_seen_at: event.data.disconnected_at, disconnect_reason: event.data.reason })
        return
      case 'DeviceBanned':
        rows.update(id, { banned_reason: event.data.reason, banned_at: event.data.banned_at })
        return
      case 'DeviceUnbanned':
        rows.update(id, { banned_reason: null, banned_at: null })
        return
      case 'DeviceQuarantined':
        rows.update(id, { quarantine_reason: event.data.reason, quarantined_at: event.data.at })
        return
      case 'DeviceReleased':
        rows.update(id, { quarantine_reason: null, quarantined_at: null })
        return
      case 'DeviceEnrollmentRevoked':
        return
    }
  }
  const task = parseRecorded(taskDecider, recorded)
  // a validated completion names the accepted run; the run that just ended is the last of TaskValidated's
  const holder =
    task.type === 'TaskQueued' || task.type === 'TaskFailed' || (task.type === 'TaskCompleted' && task.data.validated) ? undefined
    : task.type === 'TaskValidated' ? task.data.runs.at(-1)?.device_id
    : task.data.device_id
  const row = holder ? rows.get(holder) : undefined
  if (!holder || !row) return
  rows.update(holder, { running_tasks: task.type === 'TaskLeased' ? row.running_tasks + 1 : Math.max(0, row.running_tasks - 1) })
}

const schema = liveSchema(devicesProjection.name)
export const DEVICE_STATUSES = ['idle', 'busy', 'offline'] as const
export type DeviceStatus = (typeof DEVICE_STATUSES)[number]

const statusSql = sql<DeviceStatus>`case when not connected then 'offline' when running_tasks > 0 then 'busy' else 'idle' end`

export async function listDevices(db: Kysely<any>, filter: { status?: DeviceStatus; limit: number; offset: number }) {
  let query = db.withSchema(schema).selectFrom('devices')
  if (filter.status) query = query.where(statusSql, '=', filter.status)
  const [rows, total] = await Promise.all([
    query.selectAll().select(statusSql.as('status')).orderBy('device_id').limit(filter.limit).offset(filter.offset).execute(),
    query.select(sql<string>`count(*)`.as('n')).executeTakeFirst(),
  ])
  return { devices: rows.map(deviceView), total: Number(total?.n ?? 0) }
}

export async function findDevice(db: Kysely<any>, deviceId: string) {
  const row = await db.withSchema(schema).selectFrom('devices').selectAll().select(statusSql.as('status')).where('device_id', '=', deviceId).executeTakeFirst()
  return row ? deviceView(row) : undefined
}

export async function deviceStats(db: Kysely<any>) {
  const rows = await db
    .withSchema(schema)
    .selectFrom('devices')
    .select(['platform', 'instance_type', statusSql.as('status'), sql<string>`count(*)`.as('n')])
    .groupBy(['platform', 'instance_type', sql`3`])
    .execute()
  const stats = { total: 0, idle: 0, busy: 0, offline: 0, by_platform: {} as Record<string, number>, by_instance_type: {} as Record<string, number> }
  for (const r of rows) {
    const n = Number(r.n)
    stats.total += n
    stats[r.status as DeviceStatus] += n
    stats.by_platform[r.platform] = (stats.by_platform[r.platform] ?? 0) + n
    stats.by_instance_type[r.instance_type] = (stats.by_instance_type[r.instance_type] ?? 0) + n
  }
  return stats
}

function deviceView(r: Record<string, any>) {
  return {
    id: r.device_id as string,
    status: r.status as DeviceStatus,
    platform: r.platform,
    sdk_version: r.sdk_version,
    sdk_uuid: r.sdk_uuid,
    instance_type: r.instance_type,
    hardware: r.hardware,
    capabilities: r.capabilities,
    running_tasks: r.running_tasks,
    metrics: { load: r.load, memory_used_mb: r.memory_used_mb, power_watts: r.power_watts, heartbeats: Number(r.heartbeats) },
    registered_at: r.registered_at,
    last_seen_at: r.last_seen_at,
    ...(r.disconnect_reason ? { disconnect_reason: r.disconnect_reason } : {}),
    enrollment_token_id: r.enrollment_token_id ?? null,
    banned: r.banned_at ? { reason: r.banned_reason as string, at: r.banned_at as string } : null,
    quarantined: r.quarantined_at ? { reason: r.quarantine_reason as string, at: r.quarantined_at as string } : null,
  }
}

/** Devices the read model shows connected (after a restart: none really are). */
export async function connectedDevices(db: Kysely<any>): Promise<string[]> {
  const rows = await db.withSchema(schema).selectFrom('devices').select('device_id').where('connected', '=', true).execute()
  return rows.map((r) => r.device_id)
}
