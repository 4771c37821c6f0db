/**
 * All-or-nothing writes across streams on a store without `appendMany` (EventStoreDB, which appends to one
 * stream at a time): the whole set is first recorded as one intent, then applied stream by stream, and
 * recovery (`completeIntents`, run as the platform starts) applies what a crash left unapplied.
 *
 * Streams (user streams: EventStoreDB keeps `$` for its own):
 * - `intents-index`: `IntentOpened {intent_id}`, one per set, appended before its intent: where recovery
 *   finds intents without scanning the log (one small read per set written since the last recovery);
 * - `intent-<uuid>`: revision 0 `IntentRecorded` (every append of the set: streams, expected revisions,
 *   events with their ids and metadata), the COMMIT POINT; revision 1 `IntentCompleted` once every stream
 *   is written. Or revision 0 `IntentAbandoned`: recovery found the index entry without its intent and
 *   closed the stream, so that a writer still on its way can no longer commit it (it starts over);
 * - `intents-checkpoint`: `IntentIndexCheckpointed {next_revision}`: every index entry before it is resolved.
 *
 * What a reader sees: between the intent and its completion the set is partly written (a job whose tasks
 * appear a moment later, or after a restart). The streams reach the log in the order given, as with
 * `appendMany`, so a read model never sees a task before its job or project; a job counts its tasks from
 * its own event, so it never looks finished before its last task is there.
 *
 * Refusals. Before the commit point each stream's expected revision is checked (an empty append: the port's
 * check), so a stream that exists already refuses the whole set and nothing is written, as with
 * `appendMany`. After it, the set is committed: a stream whose expected revision no longer holds is
 * either the same events written already (a repeat, or a recovery racing the writer: idempotent, answered
 * with the stored events) or another writer's events, which dcp never does (it uses `appendAll` for new
 * streams with fresh ids and `no_stream`): the other streams are written, the refusal is recorded in
 * `IntentCompleted` and the writer gets `IntentConflictError`; recovery reports it through its log.
 *
 * Size. The intent holds the whole set inline. Task inputs above PAYLOAD_INLINE_MAX_BYTES are in the blob
 * store, their `TaskQueued` naming the blob (docs/event-store.md), so a batch's set is its jobs' and tasks'
 * small events: 100,000 inputs in ~100 tasks is some tens of KB. A set still above EventStoreDB's
 * `MaxAppendSize` (many tasks of inputs just under the threshold) is refused whole, before the commit point;
 * an intent event could then carry a blob reference in place of `data` (`IntentEvent`, told apart by the
 * intent's `version`).
 */
import { randomUUID } from 'node:crypto'
import { z } from 'zod'
import { DuplicateEventIdError, WrongExpectedRevisionError } from './errors.js'
import { eventIdFor } from './event-id.js'
import type { AppendResult, EventMetadata, EventStore, ExpectedRevision, RecordedEvent, StreamAppend } from './port.js'
import { storedId } from './storable.js'

export const INTENT_INDEX_STREAM = 'intents-index'
export const INTENT_CHECKPOINT_STREAM = 'intents-checkpoint'
export const intentStream = (intentId: string) => `intent-${intentId}`

/** How often a writer whose index entry recovery closed (abandoned) starts over with a new intent. */
const RECORD_ATTEMPTS = 3
/** Index entries read per page, and intents resolved at once, by recovery. */
const INDEX_PAGE = 1000
const RESOLVE_CONCURRENCY = 16

const ExpectedRevisionSchema = z.union([z.enum(['no_stream', 'stream_exists', 'any']), z.number().int().min(-1)])

/** One event of an intent, its id fixed. Version 1 holds `data` inline (see the header: blob references later). */
const IntentEvent = z.object({ id: z.guid(), type: z.string(), data: z.unknown(), metadata: z.record(z.string(), z.unknown()) })
const IntentAppend = z.object({ stream_id: z.string(), expected_revision: ExpectedRevisionSchema, events: z.array(IntentEvent) })
const IntentRecorded = z.object({ version: z.literal(1), appends: z.array(IntentAppend) })
const IntentOpened = z.object({ intent_id: z.guid() })
const Checkpointed = z.object({ next_revision: z.number().int().min(0) })

type IntentAppend = z.infer<typeof IntentAppend>

/** A stream of a committed set that another writer's events hold: see the header ("Refusals"). */
export interface RefusedAppend {
  stream_id: string
  expected_revision: ExpectedRevision
  actual: number | 'no_stream' | 'unknown'
  reason: string
}

/** A committed set with streams that could not be written (another writer's events): a bug, reported loudly. */
export class IntentConflictError extends Error {
  readonly code = 'INTENT_CONFLICT'
  constructor(readonly intentId: string, readonly refused: RefusedAppend[]) {
    super(`multi-stream write ${intentId} is committed but ${refused.map((r) => r.stream_id).join(', ')} already held other events: ${refused.map((r) => r.reason).join('; ')}`)
    this.name = 'IntentConflictError'
  }
}

/**
 * `appendAll` on a store without `appendMany`: the set all or nothing (see the header). Resolves with each
 * append's result in the order given.
 */
export async function appendThroughIntent(store: EventStore, appends: readonly StreamAppend[]): Promise<AppendResult[]> {
  // one stream is atomic by itself
  if (appends.length <= 1) return Promise.all(appends.map((a) => store.append(a.streamId, a.events, a.options)))
  // the streams are checked side by side, so a stream named twice would be checked against its old head
  if (new Set(appends.map((a) => a.streamId)).size < appends.length) throw new RangeError('a multi-stream write names a stream twice: give its events in one append')
  // 1. fix every event's id: the intent names them, so that applying it again writes nothing twice
  const set = appends.map(toIntentAppend)
  // 2. check each stream before the commit point: a refusal here writes nothing
  await Promise.all(set.map((a) => checkBefore(store, a)))
  // 3. record the intent: the commit point
  const intentId = await recordIntent(store, set)
  // 4. write each stream, in the order given, then mark the intent done. One after another, not side by
  // side: the log then holds the streams in the set's order, as appendMany's transaction does, and the
  // read models count on it (a batch's project is created before its tasks count towards it). A failure
  // other than a refusal (the store unreachable) leaves the set committed and unfinished: the caller gets
  // the error (a write that fails that way has an unknown outcome on every store) and the next start's
  // recovery finishes it
  const outcomes: Applied[] = []
  for (const append of set) outcomes.push(await applyAppend(store, append, false))
  const refused = await markDone(store, intentId, outcomes)
  if (refused.length > 0) throw new IntentConflictError(intentId, refused)
  return outcomes.map((o) => (o as { result: AppendResult }).result)
}

function toIntentAppend(append: StreamAppend): IntentAppend {
  return {
    stream_id: append.streamId,
    expected_revision: append.options?.expectedRevision ?? 'any',
    events: append.events.map((e) => ({ id: storedId(e), type: e.type, data: e.data ?? null, metadata: e.metadata ?? {} })),
  }
}

/** The port's check (an empty append) of a stream's expected revision; a set stored already passes (a repeat). */
async function checkBefore(store: EventStore, append: IntentAppend): Promise<void> {
  if (append.expected_revision === 'any') return
  try {
    await store.append(append.stream_id, [], { expectedRevision: append.expected_revision })
  } catch (error) {
    if (error instanceof WrongExpectedRevisionError && (await storedAlready(store, append))) return
    throw error
  }
}

/** Writes the index entry, then the intent; starts over when recovery closed the entry meanwhile. */
async function recordIntent(store: EventStore, set: IntentAppend[]): Promise<string> {
  const recorded: z.infer<typeof IntentRecorded> = { version: 1, appends: set }
  for (let attempt = 1; ; attempt++) {
    const intentId = randomUUID()
    await store.append(INTENT_INDEX_STREAM, [{ id: eventIdFor(`intent-opened:${intentId}`, 0), type: 'IntentOpened', data: { intent_id: intentId } }])
    try {
      await store.append(intentStream(intentId), [{ id: eventIdFor(`intent:${intentId}`, 0), type: 'IntentRecorded', data: recorded }], { expectedRevision: 'no_stream' })
      return intentId
    } catch (error) {
      if (!(error instanceof WrongExpectedRevisionError) || attempt >= RECORD_ATTEMPTS) throw error
    }
  }
}

type Applied = { ok: true; result: AppendResult } | { ok: false; refused: RefusedAppend }

/**
 * Writes one stream of a committed set. A refusal is a repeat when the stream holds these very events
 * where they were expected. `careful` (recovery): for `any` and `stream_exists`, which no revision check
 * guards, look for the events before writing them (EventStoreDB only remembers recent ids for those).
 */
async function applyAppend(store: EventStore, append: IntentAppend, careful: boolean): Promise<Applied> {
  const guarded = typeof append.expected_revision === 'number' || append.expected_revision === 'no_stream'
  if (careful && !guarded) {
    const stored = await storedAlready(store, append)
    if (stored) return { ok: true, result: stored }
  }
  try {
    // the metadata as it was given (read back through zod as a plain record)
    const events = append.events.map((e) => ({ id: e.id, type: e.type, data: e.data, metadata: e.metadata as EventMetadata }))
    return { ok: true, result: await store.append(append.stream_id, events, { expectedRevision: append.expected_revision }) }
  } catch (error) {
    if (!(error instanceof WrongExpectedRevisionError || error instanceof DuplicateEventIdError)) throw error
    const stored = await storedAlready(store, append)
    if (stored) return { ok: true, result: stored }
    const actual = error instanceof WrongExpectedRevisionError ? error.actual : 'unknown'
    return { ok: false, refused: { stream_id: append.stream_id, expected_revision: append.expected_revision, actual, reason: error.message } }
  }
}

/** The result of the append if the stream holds its events, in order, where it expected them; else undefined. */
async function storedAlready(store: EventStore, append: IntentAppend): Promise<AppendResult | undefined> {
  const ids = append.events.map((e) => e.id)
  if (ids.length === 0) return undefined
  const expected = append.expected_revision
  const from = expected === 'no_stream' ? 0 : typeof expected === 'number' ? expected + 1 : undefined
  let found: RecordedEvent[]
  if (from !== undefined) found = await store.readStream(append.stream_id, { fromRevision: from, maxCount: ids.length })
  else {
    const all = await store.readStream(append.stream_id)
    const at = all.findIndex((e) => e.id === ids[0])
    found = at < 0 ? [] : all.slice(at, at + ids.length)
  }
  if (found.length !== ids.length || found.some((e, i) => e.id !== ids[i])) return undefined
  const last = found.at(-1)!
  return { nextRevision: last.revision, position: last.position }
}

/** Records that the intent is applied (refusals named); the same event whoever writes it, so written once. */
async function markDone(store: EventStore, intentId: string, outcomes: Applied[]): Promise<RefusedAppend[]> {
  const refused = outcomes.flatMap((o) => (o.ok ? [] : [o.refused]))
  const event = { id: eventIdFor(`intent-completed:${intentId}`, 0), type: 'IntentCompleted', data: { refused } }
  try {
    await store.append(intentStream(intentId), [event], { expectedRevision: 0 })
  } catch (error) {
    // marked already (a recovery and the writer raced): the stream holds the completion
    if (!(error instanceof WrongExpectedRevisionError)) throw error
    const [done] = await store.readStream(intentStream(intentId), { fromRevision: 1, maxCount: 1 })
    if (done?.type !== 'IntentCompleted') throw error
  }
  return refused
}

// ---------------------------------------------------------------------------------------------------------
// Recovery

export interface IntentRecovery {
  /** Index entries read (multi-stream writes since the last recovery). */
  scanned: number
  /** Intents this run applied (committed, not marked done). */
  completed: number
  /** Index entries without an intent, closed so that they can no longer commit. */
  abandoned: number
  /** Streams of completed intents that held other events (a bug: see the header). */
  refused: (RefusedAppend & { intent_id: string })[]
}

/**
 * Completes every intent recorded and not marked done, from the index checkpoint on, then moves the
 * checkpoint. Cost: one small read per multi-stream write since the last recovery (two and the writes for
 * one left unfinished); run before anything reads the read models (the platform's start). Safe to run
 * while writers write (each step is idempotent, and an entry whose intent is not there yet is closed, which
 * makes its writer start over) and safe to run twice: the second run finds nothing to do and writes nothing.
 */
export async function completeIntents(store: EventStore, options: { log?: (line: string) => void } = {}): Promise<IntentRecovery> {
  const log = options.log ?? (() => {})
  const report: IntentRecovery = { scanned: 0, completed: 0, abandoned: 0, refused: [] }
  const checkpoints = await store.readStream(INTENT_CHECKPOINT_STREAM)
  const last = checkpoints.at(-1)
  const from = last ? Checkpointed.parse(last.data).next_revision : 0
  let next = from
  for (;;) {
    const entries = await store.readStream(INTENT_INDEX_STREAM, { fromRevision: next, maxCount: INDEX_PAGE })
    if (entries.length === 0) break
    const ids = entries.map((e) => IntentOpened.parse(e.data).intent_id)
    for (let i = 0; i < ids.length; i += RESOLVE_CONCURRENCY) {
      await Promise.all(ids.slice(i, i + RESOLVE_CONCURRENCY).map((id) => resolveIntent(store, id, report, log)))
    }
    report.scanned += entries.length
    next = entries.at(-1)!.revision + 1
  }
  if (next > from) {
    const event = { type: 'IntentIndexCheckpointed', data: { next_revision: next } }
    // another recovery that moved it meanwhile resolved the same entries: either checkpoint holds
    await store.append(INTENT_CHECKPOINT_STREAM, [event], { expectedRevision: last ? last.revision : 'no_stream' }).catch((error: unknown) => {
      if (!(error instanceof WrongExpectedRevisionError)) throw error
    })
  }
  return report
}

async function resolveIntent(store: EventStore, intentId: string, report: IntentRecovery, log: (line: string) => void): Promise<void> {
  const stream = intentStream(intentId)
  // marked done: the common case, read without the intent's payload
  if ((await store.readStream(stream, { fromRevision: 1, maxCount: 1 })).length > 0) return
  let [head] = await store.readStream(stream, { maxCount: 1 })
  if (!head) {
    try {
      await store.append(stream, [{ type: 'IntentAbandoned', data: { reason: 'recovery found the index entry without its intent' } }], { expectedRevision: 'no_stream' })
      report.abandoned++
      return
    } catch (error) {
      // its writer committed it meanwhile: complete it
      if (!(error instanceof WrongExpectedRevisionError)) throw error
      ;[head] = await store.readStream(stream, { maxCount: 1 })
    }
  }
  if (head?.type !== 'IntentRecorded') return
  const intent = IntentRecorded.parse(head.data)
  const outcomes: Applied[] = []
  for (const append of intent.appends) outcomes.push(await applyAppend(store, append, true))
  const refused = await markDone(store, intentId, outcomes)
  report.completed++
  for (const r of refused) {
    report.refused.push({ ...r, intent_id: intentId })
    log(`ERROR: multi-stream write ${intentId} completed without ${r.stream_id}, which held other events (${r.reason})`)
  }
  log(`completed multi-stream write ${intentId} (${intent.appends.length} streams) left unfinished by a stop`)
}
