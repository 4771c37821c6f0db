/**
 * The billing audit at scale: loads BENCH_AUDIT_EVENTS (default 1,000,000) task events for 100 customers
 * and 1,000 devices over the last 48 hours (each task queued, leased and completed; ~6% with a failed
 * attempt and a second lease first), builds the live usage read model with `rebuild`, then times a full
 * `auditUsage` (replay into a shadow schema, row-by-row comparison, totals and digests) and checks its
 * totals against sums kept while generating. Target: under 30 s for 1,000,000 events on a 2-core machine.
 * Baseline in the same run: `store.readAll` over the whole log in pages of 5,000, what reading every
 * event in full through the store costs; ratio = baseline seconds / audit seconds.
 * BENCH_PROFILE=1 adds a second, instrumented audit and a breakdown of where its time goes (`profile`).
 */
import { sql, type Transaction } from 'kysely'
import type { EventFilter, NewEvent, Position, RecordedEvent } from '../src/event-store/port.js'
import { START } from '../src/event-store/port.js'
import { PostgresEventStore } from '../src/event-store/postgres.js'
import { taskDecider } from '../src/domain/task.js'
import { rebuild } from '../src/projections/replay.js'
import { usageBulkLoad, usageProjection } from '../src/projections/usage.js'
import { auditUsage, type UsageAuditReport } from '../src/projections/usage-audit.js'
import type { BenchContext } from './run.js'

const EVENTS = Number(process.env.BENCH_AUDIT_EVENTS ?? 1_000_000)
const CUSTOMERS = 100
const DEVICES = 1000
const HOURS = 48
/** Tasks whose events are appended round by round (all first events, then all second ones, ...). */
const CHUNK_TASKS = 4000
/** Chunks loading at once (their streams are disjoint). */
const LOADERS = 2
const PAGE = 5000

const rate = (n: number, ms: number) => Math.round((n * 1000) / ms)
const seconds = (ms: number) => (ms / 1000).toFixed(2)

/** mulberry32: the same seed gives the same log, run after run (only the times move with the clock). */
function rng(seed: number) {
  let a = seed >>> 0
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
  const int = (lo: number, hi: number) => lo + Math.floor(next() * (hi - lo + 1))
  const id = (prefix: string, length = 8) => {
    let s = ''
    for (let i = 0; i < length; i++) s += 'abcdefghijklmnopqrstuvwxyz0123456789'[int(0, 35)]
    return `${prefix}_${s}`
  }
  const hex = (length: number) => Array.from({ length }, () => '0123456789abcdef'[int(0, 15)]).join('')
  return { next, int, id, hex }
}
type Rng = ReturnType<typeof rng>

interface Customer {
  id: string
  projects: string[]
  model: { id: string; format: 'onnx'; checksum: string }
  /** Cumulative weight, for a skewed pick (a few customers send most of the work). */
  weight: number
}
interface Device {
  id: string
  sdkUuid: string
  instanceType: 'aws' | 'user'
  gpu: boolean
}

/** What the audit's totals must add up to, summed while generating. */
interface Expected {
  completed: number
  failedAttempts: number
  inputs: number
  cpuUs: number
  gpuUs: number
}

function fleet(r: Rng) {
  let total = 0
  const customers: Customer[] = Array.from({ length: CUSTOMERS }, (_, i) => {
    total += 1 / (i + 1) ** 0.7
    const projects = r.next() < 0.4 ? Array.from({ length: r.int(1, 3) }, () => r.id('proj')) : []
    return { id: r.id('cust'), projects, model: { id: r.id('model'), format: 'onnx', checksum: `sha256:${r.hex(64)}` }, weight: total }
  })
  const platforms = ['nodejs', 'python', 'windows']
  const devices: Device[] = Array.from({ length: DEVICES }, () => ({
    id: r.id('dev'),
    sdkUuid: `sdk-${platforms[r.int(0, 2)]}-${r.hex(6)}`,
    instanceType: r.next() < 0.25 ? 'aws' : 'user',
    gpu: r.next() < 0.3,
  }))
  return { customers, devices, totalWeight: total }
}

const tensor = (r: Rng, size: number) => ({ data: Array.from({ length: size }, () => Math.round(r.next() * 1e6) / 1e6), shape: [1, size] })
const iso = (ms: number) => new Date(ms).toISOString()

/**
 * The log, one task at a time, in the shapes the task decider writes: each task's events with their
 * metadata. Stops after exactly `EVENTS` events (the last task may be cut short: still in flight).
 */
function* tasks(r: Rng, expected: Expected): Generator<{ stream: string; events: NewEvent[] }> {
  const { customers, devices, totalWeight } = fleet(r)
  const start = Date.now() - HOURS * 3600_000
  let emitted = 0
  while (emitted < EVENTS) {
    const pick = r.next() * totalWeight
    const customer = customers.find((c) => c.weight >= pick) ?? customers.at(-1)!
    const batch = r.next() < 0.3
    const jobId = r.id(batch ? 'batch' : 'infer')
    const projectId = customer.projects.length > 0 && r.next() < 0.5 ? customer.projects[r.int(0, customer.projects.length - 1)]! : null
    let at = start + (emitted / EVENTS) * HOURS * 3600_000
    for (let index = 0, n = batch ? r.int(2, 12) : 1; index < n && emitted < EVENTS; index++) {
      const spec = { task_id: `${jobId}-${index}`, customer_id: customer.id, job_id: jobId, project_id: projectId, model: customer.model }
      const inputs = Array.from({ length: batch ? r.int(1, 4) : 1 }, () => tensor(r, 10))
      const events: NewEvent[] = []
      const push = (type: string, data: Record<string, unknown>, when: number) => {
        if (emitted >= EVENTS) return false
        events.push({ type, data, metadata: { customerId: customer.id, occurredAt: iso(when), schemaVersion: 1 } })
        emitted++
        return true
      }
      at += r.int(1, 400)
      push('TaskQueued', { ...spec, inputs, output_shape: [1, 2], prefer_gpu: r.next() < 0.2, max_attempts: 3, queued_at: iso(at) }, at)
      for (let attempt = 1; ; attempt++) {
        const device = devices[r.int(0, DEVICES - 1)]!
        const lease = { lease_id: `lease_${r.hex(16)}`, device_id: device.id, sdk_uuid: device.sdkUuid, instance_type: device.instanceType }
        at += r.int(2, 250)
        if (!push('TaskLeased', { task_id: spec.task_id, ...lease, attempt, leased_at: iso(at) }, at)) break
        const ref = { ...spec, ...lease, inputs: inputs.length }
        const cpuUs = inputs.length * r.int(1_000, 90_000)
        const gpuUs = device.gpu ? inputs.length * r.int(200, 20_000) : 0
        const metrics = { cpu_ms: cpuUs / 1000, gpu_ms: gpuUs / 1000, bytes_in: inputs.length * r.int(60, 200), bytes_out: inputs.length * r.int(20, 60) }
        at += Math.ceil(cpuUs / 1000) + r.int(5, 80)
        if (attempt === 1 && r.next() < 0.06) {
          const lost = r.next() < 0.5
          const failed = { ...ref, reason: lost ? 'the lease expired' : 'device error: out of memory', metrics: lost ? null : metrics, requeued: true, failed_at: iso(at) }
          if (!push('TaskAttemptFailed', failed, at)) break
          expected.failedAttempts++
          continue
        }
        const outputs = inputs.map(() => tensor(r, 2))
        if (!push('TaskCompleted', { ...ref, outputs, metrics, completed_at: iso(at) }, at)) break
        expected.completed++
        expected.inputs += inputs.length
        expected.cpuUs += cpuUs
        expected.gpuUs += gpuUs
        break
      }
      yield { stream: `task-${spec.task_id}`, events }
    }
  }
}

/** Every generated shape must be one the decider accepts: a sample goes through `taskDecider.parse`. */
function validate(events: NewEvent[]): void {
  for (const e of events) taskDecider.parse({ type: e.type, data: e.data, schemaVersion: e.metadata?.schemaVersion ?? 1 })
}

async function load(store: PostgresEventStore, expected: Expected, log: BenchContext['log']): Promise<number> {
  const source = tasks(rng(20_260_101), expected)
  let written = 0
  let validated = 0
  let nextReport = EVENTS / 10
  const started = performance.now()
  const loader = async () => {
    for (;;) {
      const chunk: { stream: string; events: NewEvent[] }[] = []
      for (let i = 0; i < CHUNK_TASKS; i++) {
        const next = source.next()
        if (next.done) break
        chunk.push(next.value)
      }
      if (chunk.length === 0) return
      for (const task of chunk.slice(0, 50)) validate(task.events)
      validated += Math.min(50, chunk.length)
      // round by round, so that the log interleaves tasks as a live system's does
      for (let round = 0; ; round++) {
        const due = chunk.filter((t) => t.events.length > round)
        if (due.length === 0) break
        await Promise.all(due.map((t) => store.append(t.stream, [t.events[round]!], { expectedRevision: round === 0 ? 'no_stream' : round - 1 })))
        written += due.length
      }
      if (written >= nextReport) {
        log(`  load: ${written} events, ${rate(written, performance.now() - started)}/s`)
        while (nextReport <= written) nextReport += EVENTS / 10
      }
    }
  }
  await Promise.all(Array.from({ length: LOADERS }, loader))
  log(`  load: the events of ${validated} tasks (the first 50 of each chunk) checked with taskDecider.parse`)
  return written
}

/** `store.readAll` over the whole log, page by page: what any replay through the store pays at least. */
async function readAllScan(store: PostgresEventStore): Promise<{ events: number; ms: number }> {
  const started = performance.now()
  let after: Position = START
  let events = 0
  for (;;) {
    const page = await store.readAll(after, PAGE)
    if (page.length === 0) break
    events += page.length
    after = page.at(-1)!.position
  }
  return { events, ms: performance.now() - started }
}

function check(report: UsageAuditReport, expected: Expected, log: BenchContext['log']): boolean {
  const sum = { completed: 0, failedAttempts: 0, inputs: 0, cpuUs: 0, gpuUs: 0 }
  for (const t of report.totals) {
    sum.completed += t.tasks
    sum.failedAttempts += t.failed_attempts
    sum.inputs += t.inputs
    sum.cpuUs += Math.round(t.cpu_ms * 1000)
    sum.gpuUs += Math.round(t.gpu_ms * 1000)
  }
  let ok = report.ok && report.digest === report.liveDigest
  for (const key of Object.keys(sum) as (keyof Expected)[]) {
    if (sum[key] !== expected[key]) {
      log(`  MISMATCH ${key}: generated ${expected[key]}, audit totals ${sum[key]}`)
      ok = false
    }
  }
  const table = report.tables[0]!
  log(`verify: ${table.liveRows} live rows, ${table.replayedRows} replayed, ${table.differenceCount} differences; totals ${JSON.stringify(sum)}; ${ok ? 'as generated' : 'NOT as generated'}`)
  return ok
}

export async function auditBench({ database, log }: BenchContext): Promise<string> {
  const { pool, db } = database
  const expected: Expected = { completed: 0, failedAttempts: 0, inputs: 0, cpuUs: 0, gpuUs: 0 }

  // 1. load the log
  log(`load: ${EVENTS} task events, ${CUSTOMERS} customers, ${DEVICES} devices, ${HOURS} h, chunks of ${CHUNK_TASKS} tasks x ${LOADERS} loaders`)
  const loader = new PostgresEventStore(pool, { maxBatchEvents: 5000 })
  const loadStart = performance.now()
  const written = await load(loader, expected, log)
  await loader.close()
  const loadMs = performance.now() - loadStart
  log(`load: ${written} events in ${seconds(loadMs)} s = ${rate(written, loadMs)}/s; ${expected.completed} completed tasks, ${expected.failedAttempts} failed attempts`)
  await pool.query('vacuum analyze events')
  const stats = (await pool.query(`select count(*) as n, pg_total_relation_size('events') as bytes, avg(pg_column_size(data)) as data from events`)).rows[0]
  log(`events table: ${stats.n} rows, ${Math.round(Number(stats.bytes) / 2 ** 20)} MiB with indexes, data ${Math.round(Number(stats.data))} B per event on average`)
  const total = Number(stats.n)

  // 2. the live read model
  const store = new PostgresEventStore(pool)
  const rebuildStart = performance.now()
  const checkpoint = await rebuild({ db, store }, usageProjection)
  const rebuildMs = performance.now() - rebuildStart
  const rows = (await pool.query('select count(*) as n from rm_usage.usage_hourly')).rows[0].n
  log(`live usage read model: rebuilt in ${seconds(rebuildMs)} s (${rate(total, rebuildMs)} events/s), ${rows} rows, checkpoint ${checkpoint}`)

  // 3. baseline, then the audit
  const scan = await readAllScan(store)
  log(`baseline store.readAll scan: ${scan.events} events in ${seconds(scan.ms)} s = ${rate(scan.events, scan.ms)}/s`)
  const auditStart = performance.now()
  const report = await auditUsage({ db, store })
  const auditMs = performance.now() - auditStart
  log(`audit: ${seconds(auditMs)} s = ${rate(total, auditMs)} events/s (target < 30 s); ${report.totals.length} customer-hours; digest ${report.digest.slice(0, 16)}…`)
  const ok = check(report, expected, log) && scan.events === total
  if (process.env.BENCH_PROFILE === '1') await profile(database, store, log)
  await store.close()
  return `RESULT name=audit events=${total} seconds=${seconds(auditMs)} events_per_s=${rate(total, auditMs)} ok=${ok} ratio=${(scan.ms / auditMs).toFixed(2)}`
}

/**
 * Where the audit's time goes: a second audit with the store's reads timed (two readers read at once, and
 * each reads its next page while the current one is folded, so the reads overlap each other and the
 * folding) and the ends of its replay, of its bulk load's writes and of its comparison marked; then its
 * parts alone: the read without row decoding, the read of the usage events only, `taskDecider.parse`,
 * the bulk load over the same pages into a scratch schema, and, for comparison, `usageProjection.apply`
 * over them page by page (what a rebuild and the live runner do).
 */
async function profile({ db, pool }: BenchContext['database'], store: PostgresEventStore, log: BenchContext['log']): Promise<void> {
  let readMs = 0
  let reads = 0
  let lastRead = 0
  const pages: RecordedEvent[][] = []
  const timed = Object.assign(Object.create(store) as PostgresEventStore, {
    readFilteredPage: async (after: Position, limit: number, filter: EventFilter) => {
      const s = performance.now()
      const page = await store.readFilteredPage(after, limit, filter)
      lastRead = performance.now()
      readMs += lastRead - s
      reads++
      pages.push(page.events)
      return page
    },
  })
  const started = performance.now()
  await auditUsage({ db, store: timed })
  const end = performance.now()
  log(
    `profile: audit ${seconds(end - started)} s; store.readFilteredPage ${reads} x ${(readMs / reads).toFixed(0)} ms = ${seconds(readMs)} s (two readers at once, overlapping the folding); ` +
      `its replay's reads end ${seconds(lastRead - started)} s in; then the shadow's writes, the comparison, totals and digest ${seconds(end - lastRead)} s`,
  )
  const raw = { getTypeParser: () => (value: string) => value }
  for (const [label, condition] of [['every event, rows left as text (no JSON.parse, Date, BigInt)', ''], ['only TaskCompleted/TaskAttemptFailed (type filter in SQL), as text', `and type in ('TaskCompleted', 'TaskAttemptFailed')`]] as const) {
    const s = performance.now()
    let after = '-1'
    let rows = 0
    for (;;) {
      const page = await pool.query({ text: `select position, stream_id, revision, event_id, type, data, metadata, recorded_at from events where position > $1 ${condition} order by position limit ${PAGE}`, values: [after], types: raw })
      if (page.rows.length === 0) break
      rows += page.rows.length
      after = page.rows.at(-1)!.position
    }
    log(`profile: keyset read, ${label}: ${rows} rows in ${seconds(performance.now() - s)} s`)
  }
  const usageEvents = pages.flat()
  let s = performance.now()
  for (const e of usageEvents) taskDecider.parse({ type: e.type, data: e.data, schemaVersion: e.metadata.schemaVersion ?? 1 })
  log(`profile: taskDecider.parse of the ${usageEvents.length} usage events alone: ${seconds(performance.now() - s)} s`)
  const scratch = async () => {
    await sql`drop schema if exists bench_usage_scratch cascade`.execute(db)
    await sql`create schema bench_usage_scratch`.execute(db)
    await inScratch((trx) => usageProjection.createTables(trx))
  }
  const inScratch = <T>(f: (trx: Transaction<any>) => Promise<T>) => db.transaction().execute(async (trx) => {
    await sql`set local search_path to bench_usage_scratch, public`.execute(trx)
    return f(trx)
  })
  await scratch()
  const bulk = usageBulkLoad()
  s = performance.now()
  await bulk.begin(inScratch)
  for (const page of pages) if (page.length > 0) await bulk.add(page, inScratch)
  const folded = performance.now()
  await bulk.finish(inScratch)
  log(`profile: usageBulkLoad alone, ${pages.length} pages: ${seconds(performance.now() - s)} s (folding ${seconds(folded - s)} s, writing ${seconds(performance.now() - folded)} s)`)
  await scratch()
  s = performance.now()
  for (const page of pages) if (page.length > 0) await inScratch((trx) => usageProjection.apply(trx, page))
  log(`profile: usageProjection.apply alone, ${pages.length} pages, one transaction each: ${seconds(performance.now() - s)} s`)
  await sql`drop schema bench_usage_scratch cascade`.execute(db)
}
