/**
 * Replay throughput: loads BENCH_EVENTS (default 1,000,000) events of ~200 bytes through `store.append` by
 * concurrent writers on several store instances (so transactions interleave and positions/tx ids are
 * real), then times `rebuild({ db, store, batchSize: 5000 }, eventCounts)` and checks the rebuilt counts.
 * Baseline: a plain keyset read of the same events through pg in pages of 10,000, which must see every
 * position exactly once. BENCH_PROFILE=1 adds a breakdown of the rebuild (store reads vs apply).
 */
import { randomBytes, randomUUID } from 'node:crypto'
import { sql } from 'kysely'
import type { EventStore, NewEvent, Position, RecordedEvent } from '../src/event-store/port.js'
import { START } from '../src/event-store/port.js'
import { PostgresEventStore } from '../src/event-store/postgres.js'
import { eventCounts } from '../src/projections/event-counts.js'
import type { Projection } from '../src/projections/projection.js'
import { rebuild } from '../src/projections/replay.js'
import type { BenchContext } from './run.js'

const EVENTS = Number(process.env.BENCH_EVENTS ?? 1_000_000)
const STORES = Number(process.env.BENCH_LOAD_STORES ?? 4)
const WRITERS_PER_STORE = Number(process.env.BENCH_LOAD_WRITERS ?? 8)
const PER_APPEND = Number(process.env.BENCH_LOAD_APPEND ?? 100)
const BATCH_SIZE = 5000
const KEYSET_PAGE = 10_000

const KINDS: Record<string, string[]> = {
  device: ['DeviceRegistered', 'DeviceHeartbeat', 'DeviceCapacityChanged'],
  job: ['JobSubmitted', 'JobScheduled', 'JobCompleted'],
  task: ['TaskAssigned', 'TaskStarted', 'TaskCompleted', 'TaskFailed'],
  model: ['ModelVersionPublished', 'TrainingRoundClosed'],
}
const CATEGORIES = Object.keys(KINDS)

/** ~200 bytes of data JSON. */
function event(category: string, seq: number): NewEvent {
  const types = KINDS[category]!
  return {
    type: types[seq % types.length]!,
    data: {
      id: randomUUID(),
      jobId: randomUUID(),
      deviceId: `device-${seq % 997}`,
      attempt: 1 + (seq % 3),
      cpuMs: 40 + ((seq * 7919) % 4000),
      outputBytes: 2048 + (seq % 9000),
      digest: randomBytes(16).toString('hex'),
      at: new Date(1_767_225_600_000 + seq * 37).toISOString(),
    },
    metadata: { customerId: 'cus_01HZX4K7Q2W9', schemaVersion: 1 },
  }
}

const rate = (n: number, ms: number) => Math.round((n * 1000) / ms)

export async function replayBench({ database, log }: BenchContext): Promise<string> {
  const { pool, db } = database
  log(`event size: data ${JSON.stringify(event('task', 1).data).length} B`)

  // --- load ------------------------------------------------------------------------------------------
  log(`load: ${EVENTS} events, ${STORES} stores x ${WRITERS_PER_STORE} writers, ${PER_APPEND} events per append, exact expected revisions`)
  const expected = new Map<string, number>() // category \u0001 type -> count
  const stores = Array.from({ length: STORES }, () => new PostgresEventStore(pool))
  let claimed = 0
  let written = 0
  let nextReport = EVENTS / 10
  const loadStart = performance.now()
  const writer = async (store: PostgresEventStore, w: number) => {
    const tag = `${w}${randomBytes(3).toString('hex')}`
    const revisions = new Map<string, number>()
    let seq = 0
    while (claimed < EVENTS) {
      const n = Math.min(PER_APPEND, EVENTS - claimed)
      claimed += n
      const category = CATEGORIES[seq % CATEGORIES.length]!
      const streamId = `${category}-${tag}-${seq % 16}`
      const events = Array.from({ length: n }, (_, i) => event(category, seq * PER_APPEND + i))
      const revision = revisions.get(streamId) ?? -1
      const result = await store.append(streamId, events, { expectedRevision: revision < 0 ? 'no_stream' : revision })
      revisions.set(streamId, result.nextRevision)
      for (const e of events) {
        const key = `${category}\u0001${e.type}`
        expected.set(key, (expected.get(key) ?? 0) + 1)
      }
      written += n
      seq++
      if (written >= nextReport) {
        log(`  load: ${written} events, ${rate(written, performance.now() - loadStart)}/s`)
        nextReport += EVENTS / 10
      }
    }
  }
  await Promise.all(stores.flatMap((store, s) => Array.from({ length: WRITERS_PER_STORE }, (_, w) => writer(store, s * WRITERS_PER_STORE + w))))
  const loadMs = performance.now() - loadStart
  await Promise.all(stores.map((s) => s.close()))
  log(`load: ${written} events in ${(loadMs / 1000).toFixed(1)} s = ${rate(written, loadMs)} events/s`)
  const t0 = performance.now()
  await pool.query('vacuum analyze events')
  const stats = (await pool.query('select count(*) as n, max(position) as max, pg_total_relation_size($1) as bytes from events', ['events'])).rows[0]
  log(`vacuum analyze: ${Math.round(performance.now() - t0)} ms; events table ${stats.n} rows, max position ${stats.max}, ${Math.round(Number(stats.bytes) / 2 ** 20)} MiB with indexes`)
  const total = Number(stats.n)
  if (total !== EVENTS) throw new Error(`load: expected ${EVENTS} events, table has ${total}`)

  // --- rebuild ---------------------------------------------------------------------------------------
  const store = new PostgresEventStore(pool)
  log(`rebuild: eventCounts, batchSize ${BATCH_SIZE}`)
  const rebuildStart = performance.now()
  const checkpoint = await rebuild({ db, store, batchSize: BATCH_SIZE }, eventCounts)
  const rebuildMs = performance.now() - rebuildStart
  const eventsPerS = rate(total, rebuildMs)
  log(`rebuild: ${total} events in ${(rebuildMs / 1000).toFixed(2)} s = ${eventsPerS} events/s, checkpoint ${checkpoint}`)
  if (checkpoint.toString() !== String(stats.max)) log(`  WARNING: checkpoint ${checkpoint} is not the last position ${stats.max}`)

  const { rows } = await sql<{ category: string; type: string; count: string }>`
    select category, type, count from rm_event_counts.event_counts`.execute(db)
  let counted = 0
  const got = new Map(rows.map((r) => [`${r.category}\u0001${r.type}`, Number(r.count)]))
  for (const n of got.values()) counted += n
  for (const key of new Set([...expected.keys(), ...got.keys()])) {
    if (expected.get(key) !== got.get(key)) log(`  MISMATCH ${key.replace('\u0001', '/')}: expected ${expected.get(key) ?? 0}, counted ${got.get(key) ?? 0}`)
  }
  const missing = Math.max(0, total - counted)
  const duplicates = Math.max(0, counted - total)
  log(`verify: ${got.size} count rows, sum ${counted} (expected ${total}): missing ${missing}, duplicates ${duplicates}`)

  // --- baseline: keyset read -------------------------------------------------------------------------
  const client = await pool.connect()
  let seen = 0
  let outOfOrder = 0
  const keysetStart = performance.now()
  try {
    let after = '-1'
    let last = -1
    for (;;) {
      const page = await client.query<{ position: string }>(
        `select position, stream_id, revision, event_id, type, data, metadata, recorded_at
           from events where position > $1 order by position limit ${KEYSET_PAGE}`,
        [after],
      )
      if (page.rows.length === 0) break
      for (const row of page.rows) {
        const p = Number(row.position)
        if (p <= last) outOfOrder++
        last = p
      }
      seen += page.rows.length
      after = page.rows.at(-1)!.position
    }
  } finally {
    client.release()
  }
  const keysetMs = performance.now() - keysetStart
  const baselinePerS = rate(seen, keysetMs)
  log(`baseline keyset read: ${seen} rows in ${(keysetMs / 1000).toFixed(2)} s = ${baselinePerS} rows/s; out of order ${outOfOrder}`)
  if (seen !== total || outOfOrder !== 0) log(`  WARNING: keyset read saw ${seen} rows (${outOfOrder} out of order), the table has ${total}`)

  if (process.env.BENCH_PROFILE === '1') await profile({ database, store, total, log })
  await store.close()

  return (
    `RESULT name=replay events=${total} events_per_s=${eventsPerS} baseline_per_s=${baselinePerS} ` +
    `ratio=${(eventsPerS / baselinePerS).toFixed(2)} duplicates=${duplicates} missing=${missing}`
  )
}

/** Where a rebuild's time goes: the store's reads alone, then a rebuild with its reads and applies timed. */
async function profile({ database: { db, pool }, store, total, log }: { database: BenchContext['database']; store: EventStore; total: number; log(line: string): void }) {
  // 1. store.readAll alone, pages of BATCH_SIZE, sequential
  let t = performance.now()
  let after: Position = START
  let n = 0
  for (;;) {
    const page = await store.readAll(after, BATCH_SIZE)
    if (page.length === 0) break
    n += page.length
    after = page.at(-1)!.position
  }
  log(`profile: store.readAll alone: ${n} events in ${((performance.now() - t) / 1000).toFixed(2)} s = ${rate(n, performance.now() - t)}/s`)

  // 2. a rebuild with timed reads and applies (reads overlap applies: the next page is read during apply)
  let readMs = 0
  let reads = 0
  let applyMs = 0
  let applies = 0
  const timedStore: EventStore = Object.assign(Object.create(store) as EventStore, {
    readAll: async (a?: Position, limit?: number): Promise<RecordedEvent[]> => {
      const s = performance.now()
      const page = await store.readAll(a, limit)
      readMs += performance.now() - s
      reads++
      return page
    },
  })
  const timedProjection: Projection = {
    ...eventCounts,
    apply: async (trx, events) => {
      const s = performance.now()
      await eventCounts.apply(trx, events)
      applyMs += performance.now() - s
      applies++
    },
  }
  t = performance.now()
  await rebuild({ db, store: timedStore, batchSize: BATCH_SIZE }, timedProjection)
  const wall = performance.now() - t
  log(
    `profile: instrumented rebuild ${rate(total, wall)}/s, wall ${(wall / 1000).toFixed(2)} s; ` +
      `store.readAll ${reads} x ${(readMs / reads).toFixed(1)} ms = ${(readMs / 1000).toFixed(2)} s (${Math.round((readMs / wall) * 100)}% of wall); ` +
      `projection.apply ${applies} x ${(applyMs / applies).toFixed(1)} ms = ${(applyMs / 1000).toFixed(2)} s (overlaps the next read)`,
  )
  // 3. the same keyset read with every column left as text: the server's share vs pg's row decoding
  //    (JSON.parse of data/metadata, Date of recorded_at) in this process
  const raw = { getTypeParser: () => (value: string) => value }
  const client = await pool.connect()
  try {
    for (const [label, columns] of [
      ['all columns, unparsed', 'position, stream_id, revision, event_id, type, data, metadata, recorded_at'],
      ['position, stream_id, type only', 'position, stream_id, type'],
    ] as const) {
      t = performance.now()
      let after = '-1'
      let rows = 0
      for (;;) {
        const page = await client.query({ text: `select ${columns} from events where position > $1 order by position limit ${BATCH_SIZE}`, values: [after], types: raw })
        if (page.rows.length === 0) break
        rows += page.rows.length
        after = page.rows.at(-1)!.position
      }
      log(`profile: keyset read, pages of ${BATCH_SIZE}, ${label}: ${rate(rows, performance.now() - t)} rows/s`)
    }
  } finally {
    client.release()
  }
}
