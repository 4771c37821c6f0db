/**
 * Append throughput: 64 concurrent writers, each appending one event at a time to its own stream with an
 * exact expected revision, through PostgresEventStore (group commit), for BENCH_SECONDS (default 10) in all.
 * Baseline in the same run: a few connections doing autocommitted 100-row INSERTs of the same kind of rows
 * into a plain table with the same columns and indexes as `events` (no checks, no locks), for as long.
 * The two take turns in BENCH_SLICES slices (default 5) of BENCH_SECONDS / BENCH_SLICES each, so that a
 * machine that speeds up or slows down during the run (this VM does, by tens of percent) weighs on both
 * alike and the ratio compares them under the same conditions. Each runs BENCH_WARMUP_SECONDS (default 1)
 * first, unmeasured: the first slice measured the store's cold start (its connections, the JIT) and was
 * always the slowest by a third.
 */
import { randomBytes, randomUUID } from 'node:crypto'
import type pg from 'pg'
import type { NewEvent } from '../src/event-store/port.js'
import { CopyAppend } from '../src/event-store/copy-append.js'
import { PostgresEventStore } from '../src/event-store/postgres.js'
import type { BenchContext } from './run.js'

const WRITERS = Number(process.env.BENCH_WRITERS ?? 64)
/** Store instances sharing the pool (writers split between them): more than one overlaps their batches. */
/** BENCH_BATCHES: group-commit batches in flight per store (the store's default when unset). */
const STORES = Number(process.env.BENCH_STORES ?? 1)
const BASELINE_CONNECTIONS = Number(process.env.BENCH_BASELINE_CONNECTIONS ?? 4)
const BASELINE_ROWS = 100
const SECONDS = Number(process.env.BENCH_SECONDS ?? 10)
const SLICES = Math.max(1, Number(process.env.BENCH_SLICES ?? 5))
/** Unmeasured seconds each side runs first (connections, JIT, caches), so the first slice is not a cold start. */
const WARMUP_SECONDS = Number(process.env.BENCH_WARMUP_SECONDS ?? 1)

const hex = (bytes: number) => randomBytes(bytes).toString('hex')
/**
 * Digests for the events, made once: a `randomBytes` call per event costs the bench's own process more CPU
 * than the store spends on an append. Each event still has fresh UUIDs (randomUUID draws from a cache).
 */
const DIGESTS = Array.from({ length: 4096 }, () => hex(32))

/** A task-completed event, ~300 bytes of data JSON and ~190 of metadata, all ids fresh. */
function taskCompleted(jobId: string, deviceId: string, seq: number): Required<Pick<NewEvent, 'id' | 'type' | 'data' | 'metadata'>> {
  const cpuMs = 50 + ((seq * 7919) % 5000)
  return {
    id: randomUUID(),
    type: 'TaskCompleted',
    data: {
      taskId: randomUUID(),
      jobId,
      deviceId,
      attempt: 1 + (seq % 3),
      shard: seq % 256,
      cpuMs,
      wallMs: cpuMs + 17,
      peakMemoryBytes: 104857600 + seq,
      outputBytes: 4096 + (seq % 65536),
      outputDigest: `sha256:${DIGESTS[seq % DIGESTS.length]}`,
      exitCode: 0,
      completedAt: new Date(1_767_225_600_000 + seq * 1000).toISOString(),
    },
    metadata: {
      customerId: 'cus_01HZX4K7Q2W9',
      correlationId: randomUUID(),
      causationId: randomUUID(),
      occurredAt: new Date(1_767_225_600_000 + seq * 1000).toISOString(),
      schemaVersion: 1,
    },
  }
}

function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return NaN
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!
}

export async function appendBench({ database, log }: BenchContext): Promise<string> {
  const { pool } = database
  const sample = taskCompleted(randomUUID(), 'device-x', 0)
  log(`event size: data ${JSON.stringify(sample.data).length} B, metadata ${JSON.stringify(sample.metadata).length} B`)

  // --- the store -------------------------------------------------------------------------------------
  const stores = Array.from({ length: STORES }, () => new PostgresEventStore(pool, process.env.BENCH_BATCHES ? { maxConcurrentBatches: Number(process.env.BENCH_BATCHES) } : {}))
  let storePhase = false
  // Count group-commit batches (each is one CopyAppend query), and those that took one round trip (written on
  // a transaction the writer's previous batch left open: the query starts with the COPY). The store's
  // writers check clients out with pool.connect() and no callback.
  let batches = 0
  let oneTrip = 0
  const connect = pool.connect.bind(pool) as (...a: unknown[]) => unknown
  // With BENCH_PROFILE=1, also time each statement the writers send, by its first word.
  const profiling = process.env.BENCH_PROFILE === '1'
  const statementMs = new Map<string, { n: number; ms: number }>()
  ;(pool as unknown as { connect: (...a: unknown[]) => unknown }).connect = (...a: unknown[]) => {
    if (a.length > 0 || !storePhase) return connect(...a)
    return (connect() as Promise<pg.PoolClient>).then((client) => {
      const query = client.query
      const watched = (text: string | { text: string; done?: Promise<unknown> }, values?: unknown[]) => {
        if (text instanceof CopyAppend) {
          batches++
          if (text.text.startsWith('copy')) oneTrip++
        }
        const result = (query as (t: unknown, v?: unknown[]) => unknown).call(client, text, values)
        if (!profiling) return result
        const t0 = performance.now()
        // a submittable (the COPY append) is its own result: time it until it is done
        const finished = typeof text === 'object' && text.done ? text.done : (result as Promise<unknown>)
        void Promise.resolve(finished)
          .catch(() => {})
          .then(() => {
            const key = (typeof text === 'string' ? text : text.text).trim().split(/\s+/, 1)[0]!.replace(/;$/, '')
            const s = statementMs.get(key) ?? { n: 0, ms: 0 }
            s.n++
            s.ms += performance.now() - t0
            statementMs.set(key, s)
          })
        return result
      }
      const release = client.release
      ;(client as unknown as { query: unknown }).query = watched
      ;(client as unknown as { release: unknown }).release = (err?: Error | boolean) => {
        ;(client as unknown as { query: unknown }).query = query
        ;(client as unknown as { release: unknown }).release = release
        return release.call(client, err)
      }
      return client
    })
  }
  log(
    `append: ${WRITERS} writers, one event per append; baseline: ${BASELINE_CONNECTIONS} connections, autocommitted ${BASELINE_ROWS}-row INSERTs; ` +
      `${SECONDS} s each, taking turns in ${SLICES} slices${STORES > 1 ? `; ${STORES} store instances` : ''}`,
  )
  let latencies = new Float64Array(1 << 16)
  let count = 0
  const record = (ms: number) => {
    if (count === latencies.length) {
      const grown = new Float64Array(latencies.length * 2)
      grown.set(latencies)
      latencies = grown
    }
    latencies[count++] = ms
  }
  // each writer's stream, kept from slice to slice
  const writers = Array.from({ length: WRITERS }, (_, w) => ({ store: stores[w % STORES]!, streamId: `job-${hex(4)}-w${w}`, jobId: randomUUID(), revision: -1 }))
  const writer = async (state: (typeof writers)[number], w: number, deadline: number) => {
    while (performance.now() < deadline) {
      const event = taskCompleted(state.jobId, `device-${w}`, state.revision + 1)
      const t0 = performance.now()
      const result = await state.store.append(state.streamId, [event], { expectedRevision: state.revision < 0 ? 'no_stream' : state.revision })
      record(performance.now() - t0)
      state.revision = result.nextRevision
    }
  }

  // the same columns, defaults, constraints and indexes as the events table
  await pool.query('create table baseline_events (like events including all)')
  const placeholders = Array.from({ length: BASELINE_ROWS }, (_, r) => `(${[1, 2, 3, 4, 5, 6].map((c) => `$${r * 6 + c}`).join(', ')})`)
  const insert = `insert into baseline_events (stream_id, revision, event_id, type, data, metadata) values ${placeholders.join(', ')}`
  let rows = 0
  const inserters = Array.from({ length: BASELINE_CONNECTIONS }, (_, c) => ({ streamId: `job-${hex(4)}-b${c}`, jobId: randomUUID(), revision: 0 }))
  const inserter = async (state: (typeof inserters)[number], c: number, deadline: number) => {
    const client: pg.PoolClient = await pool.connect()
    try {
      while (performance.now() < deadline) {
        const values: unknown[] = []
        for (let i = 0; i < BASELINE_ROWS; i++, state.revision++) {
          const e = taskCompleted(state.jobId, `device-${c}`, state.revision)
          values.push(state.streamId, state.revision, e.id, e.type, JSON.stringify(e.data), JSON.stringify(e.metadata))
        }
        await client.query(insert, values)
        rows += BASELINE_ROWS
      }
    } finally {
      client.release()
    }
  }

  // warm-up, not measured (its events are stored, and counted in the check at the end)
  const warmupStart = performance.now()
  storePhase = true
  await Promise.all(writers.map((state, w) => writer(state, w, warmupStart + WARMUP_SECONDS * 1000)))
  storePhase = false
  await Promise.all(inserters.map((state, c) => inserter(state, c, performance.now() + WARMUP_SECONDS * 1000)))
  const warmEvents = count
  const warmRows = rows
  log(`warm-up: ${WARMUP_SECONDS} s each, not measured (dcp ${warmEvents} events, baseline ${warmRows} rows)`)

  const sliceMs = (SECONDS * 1000) / SLICES
  let storeMs = 0
  let baselineMs = 0
  let batchesDuringStore = 0
  let oneTripDuringStore = 0
  let cpuDuringStore = 0
  for (let slice = 1; slice <= SLICES; slice++) {
    const events0 = count
    const batches0 = batches
    const oneTrip0 = oneTrip
    const cpu0 = process.cpuUsage()
    const t0 = performance.now()
    storePhase = true
    await Promise.all(writers.map((state, w) => writer(state, w, t0 + sliceMs)))
    storePhase = false
    const t1 = performance.now()
    const cpu = process.cpuUsage(cpu0)
    storeMs += t1 - t0
    batchesDuringStore += batches - batches0
    oneTripDuringStore += oneTrip - oneTrip0
    cpuDuringStore += cpu.user + cpu.system
    const rows0 = rows
    await Promise.all(inserters.map((state, c) => inserter(state, c, t1 + sliceMs)))
    const t2 = performance.now()
    baselineMs += t2 - t1
    log(
      `  slice ${slice}/${SLICES}: dcp ${Math.round(((count - events0) * 1000) / (t1 - t0))} events/s, ` +
        `baseline ${Math.round(((rows - rows0) * 1000) / (t2 - t1))} rows/s`,
    )
  }
  await Promise.all(stores.map((s) => s.close()))
  ;(pool as unknown as { connect: unknown }).connect = connect

  const stored = Number((await pool.query('select count(*) as n from events')).rows[0].n)
  if (stored !== count) throw new Error(`append: ${count} appends acknowledged but ${stored} events stored`)
  const storedBaseline = Number((await pool.query('select count(*) as n from baseline_events')).rows[0].n)
  if (storedBaseline !== rows) throw new Error(`baseline: ${rows} rows inserted but ${storedBaseline} stored`)
  const elapsed = storeMs / 1000
  const measured = count - warmEvents
  const eventsPerS = measured / elapsed
  const sorted = latencies.slice(warmEvents, count).sort()
  log(
    `append: ${measured} events in ${elapsed.toFixed(2)} s = ${Math.round(eventsPerS)} events/s; ` +
      `latency p50 ${percentile(sorted, 50).toFixed(2)} ms, p99 ${percentile(sorted, 99).toFixed(2)} ms, max ${sorted[measured - 1]?.toFixed(2)} ms; ` +
      `${batchesDuringStore} group commits (${Math.round((oneTripDuringStore / batchesDuringStore) * 100)}% in one round trip), ${(measured / batchesDuringStore).toFixed(1)} events per commit, ${Math.round(batchesDuringStore / elapsed)} commits/s`,
  )
  log(`append: this process used ${(cpuDuringStore / 1e4 / elapsed).toFixed(0)}% of one core (${(cpuDuringStore / measured).toFixed(0)} µs CPU per event, the bench's own event making included)`)
  if (profiling) {
    for (const [key, s] of statementMs) log(`  profile: '${key}' ${s.n} x ${(s.ms / s.n).toFixed(2)} ms = ${((s.ms / 1000 / elapsed) * 100).toFixed(0)}% of the run`)
  }
  const baselinePerS = (rows - warmRows) / (baselineMs / 1000)
  log(`baseline: ${rows - warmRows} rows in ${(baselineMs / 1000).toFixed(2)} s = ${Math.round(baselinePerS)} rows/s`)

  return `RESULT name=append events_per_s=${Math.round(eventsPerS)} baseline_rows_per_s=${Math.round(baselinePerS)} ratio=${(eventsPerS / baselinePerS).toFixed(2)}`
}
