/**
 * Multi-stream writes through a recorded intent (src/event-store/intents.ts), against the real Postgres store
 * used only through its single-stream path (`withoutAppendMany`), as a store without `appendMany`
 * (EventStoreDB) is.
 */
import { spawn } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import t, { type Test } from 'tap'
import { startStreams } from '../../src/commands/handle-command.js'
import { type TaskSpec, taskDecider, taskStream } from '../../src/domain/task.js'
import { NO_VALIDATION } from '../../src/domain/validation.js'
import { loadConfig } from '../../src/config.js'
import { WrongExpectedRevisionError } from '../../src/event-store/errors.js'
import { completeIntents, INTENT_INDEX_STREAM, IntentConflictError, intentStream } from '../../src/event-store/intents.js'
import type { EventStore, RecordedEvent, StreamAppend } from '../../src/event-store/port.js'
import { appendAll } from '../../src/event-store/port.js'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import { openPlatform } from '../../src/platform.js'
import { openTasks } from '../../src/projections/tasks.js'
import { freshDatabase } from '../helpers/database.js'
import { multiStreamContract } from './contract.js'
import { withoutAppendMany } from './without-append-many.js'

const writer = fileURLToPath(new URL('./intent-writer.ts', import.meta.url))
const unique = (prefix: string) => `${prefix}-${randomUUID().slice(0, 8)}`

/** `streams` new streams of two events each, expecting `no_stream` (what `startStreams` writes). */
function setOf(prefix: string, streams: number): StreamAppend[] {
  return Array.from({ length: streams }, (_, j) => ({
    streamId: `${prefix}-${j}`,
    events: [0, 1].map((k) => ({ id: randomUUID(), type: 'Part', data: { j, k }, metadata: { customerId: 'c1' } })),
    options: { expectedRevision: 'no_stream' as const },
  }))
}

async function openStore(t: Test) {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  return { database, store }
}

/** Each intent of the index, as the types of its stream's events. */
async function intents(store: EventStore): Promise<{ id: string; types: string[]; events: RecordedEvent[] }[]> {
  const index = await store.readStream(INTENT_INDEX_STREAM)
  return Promise.all(
    index.map(async (entry) => {
      const id = (entry.data as { intent_id: string }).intent_id
      const events = await store.readStream(intentStream(id))
      return { id, types: events.map((e) => e.type), events }
    }),
  )
}

const ids = (events: { id?: string }[]) => events.map((e) => e.id)

t.test('the multi-stream contract, on a store without appendMany', async (t) => {
  const database = await freshDatabase(t)
  multiStreamContract(t, async (t) => {
    const store = new PostgresEventStore(database.pool)
    t.teardown(() => store.close())
    return withoutAppendMany(store)
  })
})

t.test('a set is written whole through its intent, which is then marked done', async (t) => {
  const { store } = await openStore(t)
  const set = setOf(unique('whole'), 3)
  const results = await appendAll(withoutAppendMany(store), set)
  for (const [j, append] of set.entries()) {
    const stored = await store.readStream(append.streamId)
    t.same(ids(stored), ids([...append.events]), `stream ${j} holds its events`)
    t.same(results[j], { nextRevision: 1, position: stored.at(-1)!.position }, `stream ${j}: its append's result`)
  }
  const [intent, ...others] = await intents(store)
  t.same(others, [], 'one intent for the set')
  t.same(intent!.types, ['IntentRecorded', 'IntentCompleted'])
  const recorded = intent!.events[0]!.data as { version: number; appends: { stream_id: string; events: { id: string }[] }[] }
  t.equal(recorded.version, 1)
  t.same(recorded.appends.map((a) => [a.stream_id, ids(a.events)]), set.map((a) => [a.streamId, ids([...a.events])]), 'the intent holds every stream and event id')
  t.same(await completeIntents(store), { scanned: 1, completed: 0, abandoned: 0, refused: [] }, 'recovery finds it done')
})

t.test('the streams reach the log in the order given, however long each append takes', async (t) => {
  const { store } = await openStore(t)
  const set = setOf(unique('ordered'), 4)
  // the first stream's append is the slowest, the last one's the quickest: side by side, they would land reversed
  const delays = new Map(set.map((a, j) => [a.streamId, (set.length - j) * 15]))
  const slow = withoutAppendMany(store, {
    beforeAppend: async (streamId, events) => {
      if (events.length > 0 && delays.has(streamId)) await new Promise((resolve) => setTimeout(resolve, delays.get(streamId)))
    },
  })
  await appendAll(slow, set)
  const firsts = await Promise.all(set.map(async (a) => (await store.readStream(a.streamId))[0]!.position))
  t.same([...firsts].sort((a, b) => (a < b ? -1 : 1)), firsts, 'each stream after the one before it')
})

t.test('a stream that exists refuses the set before the commit point: nothing is written', async (t) => {
  const { store } = await openStore(t)
  const set = setOf(unique('refused'), 3)
  await store.append(set[2]!.streamId, [{ type: 'Other', data: {} }])
  const head = await store.headPosition()
  await t.rejects(appendAll(withoutAppendMany(store), set), WrongExpectedRevisionError)
  t.equal(await store.headPosition(), head, 'no event written: no intent, no stream')
  t.same(await store.readStream(set[0]!.streamId), [])
})

t.test('a failure half way: recovery completes the set once; a second recovery writes nothing', async (t) => {
  const { store } = await openStore(t)
  const set = setOf(unique('half'), 4)
  // the process "dies" as it appends the third stream: the check before the commit point (an empty append) passes
  const dying = withoutAppendMany(store, {
    beforeAppend: (streamId, events) => {
      if (streamId === set[2]!.streamId && events.length > 0) throw new Error('killed')
    },
  })
  await t.rejects(appendAll(dying, set), /killed/)
  t.same((await store.readStream(set[2]!.streamId)).length, 0, 'the third stream is missing')
  t.same((await intents(store)).map((i) => i.types), [['IntentRecorded']], 'the intent is recorded, not done')

  const lines: string[] = []
  const report = await completeIntents(withoutAppendMany(store), { log: (line) => lines.push(line) })
  t.same(report, { scanned: 1, completed: 1, abandoned: 0, refused: [] })
  for (const append of set) t.same(ids(await store.readStream(append.streamId)), ids([...append.events]), `${append.streamId} holds its events once`)
  t.same((await intents(store)).map((i) => i.types), [['IntentRecorded', 'IntentCompleted']], 'the intent is marked done')
  t.match(lines, [/completed multi-stream write/])

  const head = await store.headPosition()
  t.same(await completeIntents(withoutAppendMany(store)), { scanned: 0, completed: 0, abandoned: 0, refused: [] }, 'the second recovery starts past the checkpoint')
  t.equal(await store.headPosition(), head, 'and writes nothing')
})

t.test('an index entry without its intent is closed by recovery: its writer can no longer commit it', async (t) => {
  const { store } = await openStore(t)
  const intentId = randomUUID()
  await store.append(INTENT_INDEX_STREAM, [{ type: 'IntentOpened', data: { intent_id: intentId } }])
  t.match(await completeIntents(store), { scanned: 1, completed: 0, abandoned: 1 })
  t.same((await store.readStream(intentStream(intentId))).map((e) => e.type), ['IntentAbandoned'])
  await t.rejects(store.append(intentStream(intentId), [{ type: 'IntentRecorded', data: {} }], { expectedRevision: 'no_stream' }), WrongExpectedRevisionError)

  // a writer whose entry a recovery closes between its index entry and its intent starts over, and commits
  const set = setOf(unique('fenced'), 2)
  let recoveries = 0
  const racing = withoutAppendMany(store, {
    beforeAppend: async (streamId, events) => {
      if (events[0]?.type === 'IntentRecorded' && recoveries++ === 0) await completeIntents(store)
    },
  })
  await appendAll(racing, set)
  for (const append of set) t.same(ids(await store.readStream(append.streamId)), ids([...append.events]), `${append.streamId} written once`)
  t.same((await intents(store)).map((i) => i.types), [['IntentAbandoned'], ['IntentAbandoned'], ['IntentRecorded', 'IntentCompleted']], 'its first intent closed, the second committed and done')
})

t.test('a multi-stream write that names a stream twice is refused before anything is written', async (t) => {
  const { store } = await openStore(t)
  const [a, b] = setOf(unique('twice'), 2)
  await t.rejects(appendAll(withoutAppendMany(store), [a!, { ...b!, streamId: a!.streamId }]), RangeError)
  t.equal(await store.headPosition(), -1n, 'nothing written')
})

t.test('another writer in a stream after the commit point: the rest is written, the refusal recorded and raised', async (t) => {
  const { store } = await openStore(t)
  // live: another writer appends to the second stream between the check and the set's append to it
  const set = setOf(unique('raced'), 3)
  const raced = withoutAppendMany(store, {
    beforeAppend: async (streamId, events) => {
      if (streamId === set[1]!.streamId && events.length > 0) await store.append(streamId, [{ type: 'Foreign', data: {} }])
    },
  })
  const error = await appendAll(raced, set).catch((e: unknown) => e)
  t.type(error, IntentConflictError)
  t.same((error as IntentConflictError).refused.map((r) => [r.stream_id, r.actual]), [[set[1]!.streamId, 0]])
  t.same(ids(await store.readStream(set[0]!.streamId)), ids([...set[0]!.events]), 'the other streams are written')
  t.same((await store.readStream(set[1]!.streamId)).map((e) => e.type), ['Foreign'], "the other writer's stream is left as it is")
  const [live] = await intents(store)
  t.match(live!.events[1], { type: 'IntentCompleted', data: { refused: [{ stream_id: set[1]!.streamId, expected_revision: 'no_stream' }] } })

  // recovery: the intent was committed, then the process stopped; another writer filled a stream meanwhile
  const later = setOf(unique('recovered'), 3)
  const stopped = withoutAppendMany(store, {
    beforeAppend: (streamId, events) => {
      if (streamId.startsWith(later[0]!.streamId.slice(0, -2)) && events.length > 0) throw new Error('killed')
    },
  })
  await t.rejects(appendAll(stopped, later), /killed/)
  await store.append(later[2]!.streamId, [{ type: 'Foreign', data: {} }], { expectedRevision: 'no_stream' })
  const lines: string[] = []
  const report = await completeIntents(store, { log: (line) => lines.push(line) })
  t.match(report, { scanned: 2, completed: 1, refused: [{ stream_id: later[2]!.streamId, actual: 0 }] }, 'the first set was done, the second completed')
  t.match(lines, [new RegExp(`ERROR: .* without ${later[2]!.streamId}`), /completed/])
  t.same(ids(await store.readStream(later[1]!.streamId)), ids([...later[1]!.events]), 'the other streams are written')
})

t.test('SIGKILL between the streams of sets: after recovery every set is whole or absent, each event once', async (t) => {
  const { database, store } = await openStore(t)
  const prefix = unique('kill')
  const child = spawn(process.execPath, ['--import', 'tsx', writer, database.url, prefix], { stdio: ['ignore', 'pipe', 'inherit'] })
  const acked = new Set<number>()
  let buffer = ''
  let killing = false
  child.stdout.setEncoding('utf8')
  child.stdout.on('data', (chunk: string) => {
    buffer += chunk
    const lines = buffer.split('\n')
    buffer = lines.pop()!
    for (const line of lines) if (line.startsWith('ack ')) acked.add(Number(line.slice(4)))
    if (!killing && acked.size > 0) {
      killing = true
      setTimeout(() => child.kill('SIGKILL'), 100 + Math.floor(Math.random() * 400))
    }
  })
  t.equal(await new Promise((resolve) => child.on('exit', (_, signal) => resolve(signal))), 'SIGKILL', 'the writer was killed')

  const before = await intents(store)
  const unfinished = before.filter((i) => i.types.length === 1).length
  t.ok(unfinished <= 1, `at most the set being written is unfinished (${unfinished})`)
  const report = await completeIntents(withoutAppendMany(store))
  t.same(report.refused, [])
  t.equal(report.completed, unfinished, 'recovery completed the unfinished set')

  const { rows } = await database.pool.query<{ stream_id: string; n: number }>(
    `select stream_id, count(*)::int as n from events where stream_id like $1 group by stream_id`,
    [`${prefix}-%`],
  )
  const perSet = new Map<number, number[]>()
  for (const row of rows) {
    const set = Number(row.stream_id.slice(prefix.length + 1).split('-')[0])
    perSet.set(set, [...(perSet.get(set) ?? []), row.n])
  }
  t.same([...perSet].filter(([, counts]) => counts.length !== 4 || counts.some((n) => n !== 2)), [], 'every set is whole: four streams of two events')
  t.same([...acked].filter((set) => !perSet.has(set)), [], 'every acknowledged set is stored')
  t.ok(acked.size > 0, `${acked.size} sets acknowledged before the kill`)
  t.ok((await intents(store)).every((i) => i.types.at(-1) === 'IntentCompleted' || i.types[0] === 'IntentAbandoned'), 'every intent is done or abandoned')
})

t.test('the platform completes intents as it opens, before the projections and the scheduler read the tasks', async (t) => {
  const { database, store } = await openStore(t)
  const spec = (i: number): TaskSpec => ({
    task_id: `task_${i}`, customer_id: 'cust_1', job_id: 'job_1', project_id: null,
    model: { id: 'model_1', format: 'onnx', checksum: 'abc' }, inputs: [{ data: [i], shape: [1, 1] }],
    output_shape: null, prefer_gpu: false, instance_type: null, max_attempts: 2, validation: NO_VALIDATION, batching: null,
  })
  const at = '2026-12-08T04:00:00.000Z'
  // the server stops as it appends the third task: two tasks of three are written
  const dying = withoutAppendMany(store, {
    beforeAppend: (streamId, events) => {
      if (streamId === taskStream('task_2') && events.length > 0) throw new Error('killed')
    },
  })
  const starts = [0, 1, 2].map((i) => ({ streamId: taskStream(`task_${i}`), decider: taskDecider, command: { type: 'QueueTask' as const, task: spec(i), at } }))
  await t.rejects(startStreams(dying, starts), /killed/)

  const dataDir = await mkdtemp(path.join(tmpdir(), 'dcp-intents-'))
  t.teardown(() => rm(dataDir, { recursive: true, force: true }))
  const platform = await openPlatform(loadConfig({ DATABASE_URL: database.url, DATA_DIR: dataDir }))
  t.teardown(() => platform.close())
  platform.projections.start()
  await platform.projections.waitFor(await platform.store.headPosition(), 20_000)
  t.same((await openTasks(platform.database.db)).map((task) => task.task_id), ['task_0', 'task_1', 'task_2'], 'the read model holds every task of the set')
})
