import { sql } from 'kysely'
import t, { type Test } from 'tap'
import type { EventStore, NewEvent, Position } from '../../src/event-store/port.js'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import { applyBatch, readCheckpoint } from '../../src/projections/checkpoints.js'
import { audit, rebuild } from '../../src/projections/replay.js'
import { usageBulkLoad, usageProjection } from '../../src/projections/usage.js'
import { auditUsage, formatUsageReport } from '../../src/projections/usage-audit.js'
import { freshDatabase } from '../helpers/database.js'

/**
 * The usage audit builds its shadow with a bulk load (pages folded in memory by several readers, written
 * once, the primary key built after the rows) instead of `apply` page by page. Its rows must be the rows
 * the live read model got from `apply` in small batches, byte for byte, with key values that need quoting,
 * when it spills to its staging table, and when the live copy moves on during the replay.
 */

/** Key values that a hand-written array literal could get wrong. */
const CUSTOMERS = ['cust_plain', 'cust "quoted"', 'cust\\back\\slash\\', 'cust,comma {brace}', 'cüst 😀 ü', 'NULL', ' spaced ']
const SDKS = ['sdk-nodejs-aaaaaa', 'sdk "2"', 'sdk\\3', null] as const
const LIVE = { schema: 'rm_usage', checkpoint: 'usage' }

let seq = 0
/** A task's outcome in the shapes the task decider writes: completed, or a failed attempt. */
function outcome(i: number, overrides: { customer?: string; sdk?: string | null; hour?: number } = {}): { stream: string; event: NewEvent } {
  const n = seq++
  const customer = overrides.customer ?? CUSTOMERS[i % CUSTOMERS.length]!
  const sdk = overrides.sdk !== undefined ? overrides.sdk : SDKS[i % SDKS.length]!
  const at = new Date(Date.UTC(2026, 0, 2, overrides.hour ?? i % 5, i % 60, i % 60, i % 1000)).toISOString()
  const inputs = 1 + (i % 3)
  const gpu = i % 4 === 0
  const ref = {
    task_id: `task_${n}`,
    customer_id: customer,
    job_id: `job_${n % 17}`,
    project_id: i % 3 === 0 ? null : `proj "${i % 2}"`,
    lease_id: `lease_${n}`,
    device_id: `dev_${i % 5}`,
    sdk_uuid: sdk,
    instance_type: i % 5 === 0 ? null : i % 2 ? 'aws' : 'user',
    inputs,
  }
  // fractional milliseconds: billed in whole microseconds, rounded per event
  const metrics = { cpu_ms: 1.2345 * (1 + (i % 7)), gpu_ms: gpu ? 0.5005 * (1 + (i % 3)) : 0, bytes_in: 40 * inputs, bytes_out: 8 * inputs }
  const event: NewEvent =
    i % 9 === 4
      ? { type: 'TaskAttemptFailed', data: { ...ref, reason: 'device error', metrics: i % 2 ? metrics : null, requeued: true, failed_at: at } }
      : { type: 'TaskCompleted', data: { ...ref, outputs: Array.from({ length: inputs }, () => ({ data: [0.25, 0.75], shape: [1, 2] })), metrics, completed_at: at } }
  return { stream: `task-task_${n}`, event: { ...event, metadata: { customerId: customer, schemaVersion: 1 } } }
}

async function append(store: EventStore, outcomes: { stream: string; event: NewEvent }[]): Promise<void> {
  // other events between them, which the usage filter skips
  for (const o of outcomes) await store.append(o.stream, [{ type: 'TaskLeased', data: {} }, o.event])
}

/** The live usage read model, applied as the live runner applies it: a few events per transaction. */
async function applyLive(db: import('kysely').Kysely<any>, store: EventStore, after: Position): Promise<Position> {
  const events = (await store.readAll(after, 100_000)).filter((e) => usageProjection.filter!.types!.includes(e.type))
  for (let i = 0; i < events.length; i += 3) {
    const batch = events.slice(i, i + 3)
    await applyBatch(db, usageProjection, LIVE, batch, batch.at(-1)!.position)
  }
  return (await readCheckpoint(db, 'usage'))!.position
}

async function setup(t: Test) {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  await rebuild({ db: database.db, store }, usageProjection) // an empty live copy
  await append(store, Array.from({ length: 240 }, (_, i) => outcome(i)))
  const checkpoint = await applyLive(database.db, store, -1n)
  return { db: database.db, store, checkpoint }
}

t.test('the bulk-loaded shadow equals the live rows built batch by batch, awkward key values included', async (t) => {
  const { db, store, checkpoint } = await setup(t)
  const stored = await sql<{ customer_id: string; sdk_uuid: string }>`select distinct customer_id, sdk_uuid from rm_usage.usage_hourly`.execute(db)
  t.same([...new Set(stored.rows.map((r) => r.customer_id))].sort(), [...CUSTOMERS].sort(), 'every customer id stored exactly as sent')
  t.same([...new Set(stored.rows.map((r) => r.sdk_uuid))].sort(), SDKS.map((s) => s ?? '').sort(), 'every SDK UUID stored exactly as sent')

  const deps = { db, store, batchSize: 7 }
  const report = await auditUsage(deps)
  t.equal(report.ok, true, 'no differences')
  t.equal(report.position, checkpoint.toString())
  t.equal(report.digest, report.liveDigest)
  t.ok(report.tables[0]!.liveRows > 100, `${report.tables[0]!.liveRows} rows`)
  t.equal(report.tables[0]!.replayedRows, report.tables[0]!.liveRows)
  // the shadow as `apply` builds it page by page, for the generic audit: the same verdict
  t.equal((await audit(deps, usageProjection)).ok, true, 'the shadow built with apply agrees')
  // past its limit of rows in memory, the bulk load sums its rows in a staging table instead
  const spilled = await audit(deps, usageProjection, { bulkLoad: usageBulkLoad(5) })
  t.equal(spilled.ok, true, 'spilled to staging: no differences')
  t.equal(spilled.tables[0]!.replayedRows, report.tables[0]!.liveRows)
  t.equal((await auditUsage({ db, store, batchSize: 10_000 })).digest, report.digest, 'one page or many: the same digest')
  const schemas = await sql<{ n: string }>`select count(*) as n from pg_namespace where nspname like 'rm_usage__audit_%'`.execute(db)
  t.equal(Number(schemas.rows[0]!.n), 0, 'every shadow dropped')
})

t.test('the live copy moves on during the bulk replay: the shadow catches up with apply under the lock', async (t) => {
  const { db, store, checkpoint } = await setup(t)
  let moved: Position | undefined
  const moving: EventStore = Object.create(store)
  moving.readFilteredPage = async (after, limit, filter) => {
    if (moved === undefined) {
      moved = 0n
      // more usage on keys the bulk load has already written (an upsert on them) and on a new key
      await append(store, [outcome(1), outcome(2), outcome(3, { customer: 'cust_new', hour: 23 })])
      moved = await applyLive(db, store, checkpoint)
    }
    return store.readFilteredPage(after, limit, filter)
  }
  const report = await auditUsage({ db, store: moving, batchSize: 11 })
  t.ok(moved !== undefined && moved > checkpoint, 'the live checkpoint moved during the replay')
  t.equal(report.position, moved!.toString(), 'compared at the live checkpoint it had under the lock')
  t.equal(report.ok, true, 'no differences')
  t.equal(report.digest, report.liveDigest)
  t.ok(report.totals.some((r) => r.customer_id === 'cust_new'), 'the last stretch is in the replay')
  t.equal((await auditUsage({ db, store })).digest, report.digest, 'an audit from scratch gives the same digest')
})

t.test('a bulk-loaded audit finds a tampered row and a missing one, and names them', async (t) => {
  const { db, store } = await setup(t)
  const clean = await auditUsage({ db, store })
  await sql`update rm_usage.usage_hourly set cpu_us = cpu_us + 1 where ctid = (select ctid from rm_usage.usage_hourly where customer_id = ${'cust "quoted"'} limit 1)`.execute(db)
  const removed = await sql<{ customer_id: string; hour: string; sdk_uuid: string }>`
    delete from rm_usage.usage_hourly where ctid = (select ctid from rm_usage.usage_hourly where customer_id = ${'cust\\back\\slash\\'} limit 1)
    returning customer_id, hour, sdk_uuid`.execute(db)
  for (const [what, report] of [
    ['in memory', await auditUsage({ db, store })],
    ['spilled to staging', await audit({ db, store }, usageProjection, { bulkLoad: usageBulkLoad(5) })],
  ] as const) {
    t.equal(report.ok, false, `${what}: differences found`)
    const table = report.tables[0]!
    t.equal(table.differenceCount, 2, `${what}: two rows differ`)
    const changed = table.differences.find((d) => d.live && d.replayed)
    t.equal(changed?.key.customer_id, 'cust "quoted"', `${what}: the changed row named`)
    t.equal(Number(changed?.live?.cpu_us) - Number(changed?.replayed?.cpu_us), 1)
    const missing = table.differences.find((d) => !d.live)
    t.match(missing?.key, removed.rows[0], `${what}: the missing row named`)
  }
  const tampered = await auditUsage({ db, store })
  t.not(tampered.liveDigest, tampered.digest, 'the live digest is computed when rows differ')
  t.equal(tampered.digest, clean.digest, 'the replay is what it was')
})

t.test('a failing read ends the bulk audit with its error and drops the shadow', async (t) => {
  const { db, store } = await setup(t)
  let reads = 0
  const failing: EventStore = Object.create(store)
  failing.readFilteredPage = async (after, limit, filter) => {
    if (++reads === 5) throw new Error('the log went away')
    return store.readFilteredPage(after, limit, filter)
  }
  await t.rejects(auditUsage({ db, store: failing, batchSize: 5 }), /the log went away/)
  const schemas = await sql<{ n: string }>`select count(*) as n from pg_namespace where nspname like 'rm_usage__audit_%'`.execute(db)
  t.equal(Number(schemas.rows[0]!.n), 0, 'the shadow dropped')
  const left = await sql<{ n: string }>`select count(*) as n from projection_checkpoints where name like 'usage__audit_%'`.execute(db)
  t.equal(Number(left.rows[0]!.n), 0, 'its checkpoint forgotten')
  t.equal((await auditUsage({ db, store })).ok, true, 'the next audit runs')
})

t.test('the audit totals bill training rounds as GET /usage does: in CPU and GPU time, and on their own', async (t) => {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  await rebuild({ db: database.db, store }, usageProjection)
  const customer = 'cust_trainer'
  const task = outcome(1, { customer, sdk: 'sdk-a', hour: 3 }) // i = 1: a completed task, 2 inputs, CPU only
  const taskData = task.event.data as { metrics: { cpu_ms: number }; inputs: number }
  const contribution = (device: string, samples: number, cpu_ms: number, gpu_ms: number) => ({ device_id: device, sdk_uuid: `sdk-${device}`, instance_type: 'aws', samples, steps: 4, loss: 0.5, staleness: 0, cpu_ms, gpu_ms, wall_ms: 20, power_watts: 0 })
  const round = {
    type: 'TrainingRoundCompleted',
    data: {
      job_id: 'train_1', customer_id: customer, round: 1, weights_sha256: 'x'.repeat(64), loss: 0.5, validation_loss: 0.6, accuracy: 0.7, samples: 160, steps: 8,
      batches_completed: 2, epoch: 0, contributions: [contribution('d1', 100, 10.5, 0), contribution('d2', 60, 4.25, 2.5)], wall_ms: 40, at: '2026-01-02T03:30:00.000Z',
    },
    metadata: { customerId: customer, schemaVersion: 1 },
  }
  await append(store, [task])
  await store.append('training-train_1', [round])
  await applyLive(database.db, store, -1n)
  const report = await auditUsage({ db: database.db, store }, { customer })
  t.equal(report.ok, true, 'the live rows equal the replay')
  t.equal(report.totals.length, 1)
  const total = report.totals[0]!
  t.match(total, { customer_id: customer, hour: '2026-01-02T03', tasks: 1, inputs: taskData.inputs, training_samples: 160, failed_attempts: 0 })
  const taskCpu = Math.round(taskData.metrics.cpu_ms * 1000) / 1000
  t.equal(total.cpu_ms, Math.round((taskCpu + 14.75) * 1000) / 1000, 'CPU time billed: the task and both devices\' training')
  t.equal(total.gpu_ms, 2.5, 'GPU time billed: training\'s')
  t.equal(total.training_cpu_ms, 14.75)
  t.equal(total.training_gpu_ms, 2.5)
  t.match(formatUsageReport(report), /of which training:\s+14\.750\s+2\.500\s+160 samples/, 'the text report shows training\'s part')
})
