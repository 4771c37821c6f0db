import { randomUUID } from 'node:crypto'
import pg from 'pg'
import { copyAppend, type CopyRow } from './copy-append.js'
import { DuplicateEventIdError, EventStoreUnavailableError, WrongExpectedRevisionError } from './errors.js'
import type {
  AppendOptions,
  AppendResult,
  EventFilter,
  EventMetadata,
  EventStore,
  ExpectedRevision,
  NewEvent,
  Position,
  ReadStreamOptions,
  RecordedEvent,
  StreamAppend,
  SubscribeOptions,
  Subscription,
} from './port.js'
import { matchesFilter, START } from './port.js'
import { Signal } from './signal.js'
import { assertStorable, storedId } from './storable.js'
import { type Page, PollingSubscription } from './subscription.js'
import { WrittenEvents, type WrittenRow } from './written.js'

export interface PostgresEventStoreOptions {
  /** Most events written in one group-commit transaction. Default 2000 (at most 2^20). */
  maxBatchEvents?: number
  /** Group-commit transactions in flight at once, each on its own connection. Default 3. */
  maxConcurrentBatches?: number
  /** Longest a subscriber waits for a notification before polling anyway. Default 1000 ms. */
  idlePollMs?: number
  /** Re-read delay when a page stopped below an open transaction. Default 5 ms. */
  heldPollMs?: number
  /** How often the store asks whether another process listens for its NOTIFYs (see `othersListen`). Default 1000 ms. */
  listenerCheckMs?: number
}

interface PendingAppend {
  streamId: string
  events: { id: string; type: string; data: string; metadata: string }[]
  expected: ExpectedRevision
  /** Set on the appends of one `appendMany`: they sit next to each other in the queue and are written, or refused, together. */
  group?: { size: number }
  resolve(result: AppendResult): void
  reject(error: unknown): void
}

/** Bits of a position that number the events of one transaction; the bits above are its transaction id. */
const SEQUENCE_BITS = 20n
/** Queued events that make it worth writing a second batch while one is in flight. */
const MIN_PARALLEL_EVENTS = 16
/**
 * How long a writer holding an open transaction waits for more appends before it rolls the transaction back
 * and gives its connection back: under a steady trickle of appends (sync inference commits a couple of times
 * per request), the next append comes within this and is written in one round trip on the transaction
 * already open, instead of a rollback now and a two-trip write then.
 */
const WRITER_GRACE_MS = 2
/** Stream heads kept in memory (the oldest written are forgotten first). */
const HEAD_CACHE_SIZE = 100_000
const RETRYABLE = new Set(['23505', '40001', '40P01']) // a racing writer outside this process; serialisation; deadlock
const MAX_ATTEMPTS = 5
/**
 * Least time between two NOTIFYs of a store. Under load a store commits a thousand times a second or more; a
 * NOTIFY for each is a transaction of its own in Postgres and a wake-up of every listening process (this
 * one's own listener included), for subscribers in other processes that a NOTIFY a few ms later serves as
 * well. This store's own subscribers are woken at once, without it.
 */
const NOTIFY_INTERVAL_MS = 10
/** Longest `readAll` waits for a page held back by a transaction that may still commit. */
const READ_ALL_WAIT_MS = 1000

const SELECT_COLUMNS = 'position, stream_id, revision, event_id, type, data, metadata, recorded_at'

/**
 * The default event store: one `events` table in Postgres (see src/postgres/migrations.ts).
 *
 * Appends are group-committed: appends that arrive while batches are being written queue up, then go to
 * the database together in two round trips and one transaction, whatever their number. Each append keeps
 * its own expected-revision check and its own error; only the appends that pass are inserted. A few
 * batches are written at once (on different connections, so both Postgres cores work), never two with the
 * same stream.
 *
 * A position is the writing transaction's id shifted left 20 bits, plus the event's number within it, so
 * position order is transaction order. Every position below the lowest transaction id still running in
 * this database (shifted the same way; `dcp_position_bound()`) is final: readers stop there, so an event
 * that becomes visible later can never land below one already delivered.
 */
export class PostgresEventStore implements EventStore {
  private queue: PendingAppend[] = []
  /** Streams in a batch being written: their next appends wait, so batches never race each other. */
  private readonly busyStreams = new Set<string>()
  /** Writers rolling back the transaction they held open, on their way back to the pool. */
  private readonly retiring = new Set<Promise<void>>()
  private inFlight = 0
  /** Heads of streams this store wrote, so the next append to them can skip reading. */
  private readonly heads = new Map<string, { revision: number; position: Position }>()
  /** Events this store committed lately, for its subscribers' pages (see readPage). */
  private readonly written = new WrittenEvents()
  private pumpScheduled = false
  /** Writers waiting (WRITER_GRACE_MS at most) for appends, on a transaction they hold open: wake one to take work. */
  private readonly parked = new Set<() => void>()
  /** When the last two appends came (performance.now()): close together, a writer keeps a transaction open for the next. */
  private lastArrival = -Infinity
  private arrivalGap = Infinity
  private idle: (() => void) | undefined
  private readonly signal = new Signal()
  private listener: pg.Client | undefined
  private listening: Promise<void> | undefined
  /** Names this store in the notifications it sends, so that its own listener does not wake its subscribers twice. */
  private readonly instance = randomUUID()
  /** The NOTIFY being sent, and whether another commit came after it started (one more is owed). */
  private announcing: Promise<void> | undefined
  private announceAgain = false
  private announcedAt = -Infinity
  /** The backend of this store's LISTEN connection, once it listens. */
  private listenerPid: number | undefined
  /** Whether another process listens for this store's NOTIFYs, as last asked (performance.now()). */
  private others: { at: number; listening: boolean } | undefined
  private readonly listenerCheckMs: number
  private closed = false
  private readonly maxBatchEvents: number
  private readonly maxConcurrentBatches: number
  private readonly idlePollMs: number
  private readonly heldPollMs: number

  constructor(private readonly pool: pg.Pool, options: PostgresEventStoreOptions = {}) {
    this.maxBatchEvents = Math.min(options.maxBatchEvents ?? 2000, 2 ** Number(SEQUENCE_BITS))
    this.maxConcurrentBatches = options.maxConcurrentBatches ?? 3
    this.idlePollMs = options.idlePollMs ?? 1000
    this.heldPollMs = options.heldPollMs ?? 5
    this.listenerCheckMs = options.listenerCheckMs ?? 1000
  }

  append(streamId: string, events: readonly NewEvent[], options: AppendOptions = {}): Promise<AppendResult> {
    if (this.closed) return Promise.reject(new EventStoreUnavailableError('event store is closed'))
    let rows: PendingAppend['events']
    try {
      rows = events.map(toRow)
    } catch (error) {
      return Promise.reject(error) // refused alone, before it can fail a shared batch
    }
    return new Promise((resolve, reject) => {
      this.queue.push({ streamId, expected: options.expectedRevision ?? 'any', events: rows, resolve, reject })
      this.arrived()
      this.schedulePump()
    })
  }

  appendMany(appends: readonly StreamAppend[]): Promise<AppendResult[]> {
    if (this.closed) return Promise.reject(new EventStoreUnavailableError('event store is closed'))
    if (appends.length === 0) return Promise.resolve([])
    let rows: PendingAppend['events'][]
    try {
      rows = appends.map((a) => a.events.map(toRow))
    } catch (error) {
      return Promise.reject(error)
    }
    const group = { size: appends.length }
    const results = appends.map(
      (a, i) =>
        new Promise<AppendResult>((resolve, reject) => {
          this.queue.push({ streamId: a.streamId, expected: a.options?.expectedRevision ?? 'any', events: rows[i]!, group, resolve, reject })
        }),
    )
    this.arrived()
    this.schedulePump()
    return Promise.all(results)
  }

  private arrived(): void {
    const now = performance.now()
    this.arrivalGap = now - this.lastArrival
    this.lastArrival = now
  }

  /** Starts batches on the next turn of the event loop, so appends made together share one. */
  private schedulePump(): void {
    if (this.pumpScheduled) return
    this.pumpScheduled = true
    setImmediate(() => {
      this.pumpScheduled = false
      this.pump()
    })
  }

  /**
   * Starts writers while there are free slots and queued appends whose streams are not being written. With
   * a batch already being written, another writer starts only for a queue of MIN_PARALLEL_EVENTS or more: a
   * few appends wait for the batch in flight and go together in the next one (one COPY and one commit for
   * all of them) instead of each taking a connection of its own.
   */
  private pump(): void {
    for (const wake of this.parked) {
      if (this.queue.length === 0) break
      wake()
    }
    while (this.inFlight < this.maxConcurrentBatches) {
      const batch = this.nextBatch(false)
      if (!batch) break
      this.inFlight++
      void this.runWriter(batch)
    }
  }

  /**
   * The next batch: what is queued, shared between the free slots so that batches run side by side. A
   * writer that has just finished one (`continuing`) takes whatever is queued.
   */
  private nextBatch(continuing: boolean): PendingAppend[] | undefined {
    let queued = 0
    for (const append of this.queue) queued += append.events.length
    if (this.queue.length === 0) return undefined
    if (!continuing && this.inFlight > 0 && queued < MIN_PARALLEL_EVENTS) return undefined
    const free = this.maxConcurrentBatches - this.inFlight + (continuing ? 1 : 0)
    const batch = this.takeBatch(Math.ceil(queued / Math.max(1, free)))
    return batch.length > 0 ? batch : undefined
  }

  /**
   * One slot's writer: a connection that writes batches as long as there are appends for it. Each batch
   * written while more are coming leaves a transaction open for the next (see CopyAppend), so under load a
   * batch takes one round trip. When the queue runs dry the open transaction is rolled back at once (it holds
   * readers below its position) and the connection goes back to the pool.
   */
  private async runWriter(first: PendingAppend[]): Promise<void> {
    let writer: Writer | undefined
    try {
      writer = { client: await this.pool.connect(), xid: undefined }
    } catch (cause) {
      const error = new EventStoreUnavailableError(`cannot reach the event store database: ${(cause as Error).message}`, { cause })
      for (const append of first) append.reject(error)
    }
    if (!writer) this.release(first)
    let batch: PendingAppend[] | undefined = writer && first
    while (writer && batch) {
      try {
        await this.writeBatch(writer, batch)
      } finally {
        this.release(batch)
      }
      if (writer.broken) break
      batch = this.nextBatch(true) ?? (writer.xid !== undefined && !this.closed ? await this.park() : undefined)
      // what this writer leaves may be enough for another
      if (batch && this.queue.length > 0) this.pump()
    }
    this.inFlight--
    if (writer) this.retire(writer)
    if (this.queue.length > 0) this.pump()
    else if (this.inFlight === 0) this.idle?.()
  }

  /** Waits WRITER_GRACE_MS at most for appends (pump or close wakes it); the batch it may then take. */
  private park(): Promise<PendingAppend[] | undefined> {
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer)
        this.parked.delete(wake)
        resolve(this.closed ? undefined : this.nextBatch(true))
      }
      const timer = setTimeout(wake, WRITER_GRACE_MS)
      this.parked.add(wake)
    })
  }

  /** Rolls back the transaction a writer left open and returns its connection to the pool. */
  private retire(writer: Writer): void {
    const done = (async () => {
      if (!writer.broken && writer.xid !== undefined) {
        await writer.client.query('rollback').catch((error: Error) => (writer.broken = error))
      }
      writer.client.release(writer.broken)
    })()
    this.retiring.add(done)
    void done.finally(() => this.retiring.delete(done))
  }

  /**
   * Takes queued appends in order, up to the batch size, skipping streams being written (and every later
   * append of a skipped stream, so each stream's appends stay in order).
   */
  private takeBatch(size: number): PendingAppend[] {
    const limit = Math.max(1, Math.min(size, this.maxBatchEvents))
    const batch: PendingAppend[] = []
    const rest: PendingAppend[] = []
    const skipped = new Set<string>()
    let count = 0
    for (let i = 0; i < this.queue.length; ) {
      // an appendMany's appends are one unit: taken together or left together
      const unit = this.queue.slice(i, i + (this.queue[i]!.group?.size ?? 1))
      i += unit.length
      const events = unit.reduce((n, a) => n + a.events.length, 0)
      const blocked = unit.some((a) => this.busyStreams.has(a.streamId) || skipped.has(a.streamId))
      const fits = batch.length === 0 || count + events <= limit
      if (blocked || !fits) {
        for (const a of unit) skipped.add(a.streamId)
        rest.push(...unit)
      } else {
        batch.push(...unit)
        count += events
      }
    }
    this.queue = rest
    // its streams are busy from now until it is written: no other batch may take them meanwhile
    for (const append of batch) this.busyStreams.add(append.streamId)
    return batch
  }

  /** The batch is written (or failed): its streams may go into the next batches. */
  private release(batch: readonly PendingAppend[]): void {
    for (const append of batch) this.busyStreams.delete(append.streamId)
  }

  /**
   * Writes a batch on the writer's connection, retrying what a racing writer elsewhere made fail; settles
   * every append. A stream that another process keeps appending to can fail the batch again and again (its
   * head moves between this writer's read and its COPY): from the second time, the appends to that stream
   * are refused with WrongExpectedRevisionError (a command re-reads and decides again) and the rest of the
   * batch goes on without them, instead of every append of the batch failing on the database's error.
   */
  private async writeBatch(writer: Writer, all: PendingAppend[]): Promise<void> {
    let batch = all
    for (let attempt = 1, failures = 0; batch.length > 0; attempt++) {
      try {
        const outcomes = await this.writeOnce(writer, batch, attempt > 1)
        outcomes.forEach((outcome, i) => (outcome.ok ? batch[i]!.resolve(outcome.result) : batch[i]!.reject(outcome.error)))
        return
      } catch (error) {
        for (const append of batch) this.heads.delete(append.streamId)
        if (!(error instanceof pg.DatabaseError)) writer.broken = error as Error
        // the transaction failed: end it (a warning only, when it had ended already)
        else await writer.client.query('rollback').catch((e: Error) => (writer.broken = e))
        writer.xid = undefined
        const code = (error as { code?: string }).code
        const contended = attempt > 1 ? contendedStream(error) : undefined
        if (!writer.broken && contended) {
          batch = refuseStream(batch, contended)
          continue // the batch is shorter: this cannot go on for ever
        }
        if (writer.broken || !code || !RETRYABLE.has(code) || ++failures >= MAX_ATTEMPTS) {
          for (const append of batch) append.reject(error)
          return
        }
        // a writer elsewhere got there first: give it a moment (random, growing), so that two racing on the
        // same streams do not keep failing each other in step
        await new Promise((resolve) => setTimeout(resolve, Math.random() * 2 ** attempt))
      }
    }
  }

  /**
   * A few round trips for the whole batch, whatever its size: 1. read the heads of its streams and any of
   * its ids already stored, unless every stream's head is in the cache of heads this store wrote; 2. decide
   * each append in queue order; 3. insert the accepted events with one COPY and commit (one fsync):
   * positions come from the transaction's id. Under load that is one round trip (the writer's transaction
   * is open already, see CopyAppend), else two.
   * Whatever made the decision wrong fails the insert on a unique constraint: a writer in another process
   * that appended to one of the streams (the revision is taken), an id already stored (a retried append),
   * and then the batch is read afresh and decided again.
   */
  private async writeOnce(writer: Writer, batch: PendingAppend[], fresh: boolean): Promise<Outcome[]> {
    const streamIds = [...new Set(batch.map((a) => a.streamId))]
    const cached = fresh ? undefined : this.knownHeads(batch)
    const { heads, stored } = cached ? { heads: cached, stored: new Map<string, StoredId>() } : await this.readState(writer.client, streamIds, batch)
    // 2. decide (it moves the heads of the streams it writes; the newest as they were is kept first)
    const newest = newestHead(heads)
    const plan = planBatch(batch, heads, stored)
    // a cached head may be stale (another process appended): only the database may refuse an append
    if (cached && plan.outcomes.some((o) => !o.ok && o.error instanceof WrongExpectedRevisionError)) return this.writeOnce(writer, batch, true)
    // 3. insert and commit
    if (plan.rows.length > 0) {
      // COPY, with the positions made of the transaction id it runs in (see copy-append.ts); with more
      // appends coming (queued, other batches in flight, or appends arriving close together), leave a
      // transaction open for the next batch.
      // The transaction left open by the previous batch serves only if its id is above every head this
      // batch writes after: a stream's next event must have a higher position than its last. A head
      // written since it was opened (by another writer, here or in another process) needs a fresh one.
      const open = writer.xid
      writer.xid = undefined
      const xid = open !== undefined && open << SEQUENCE_BITS > newest ? open : undefined
      const { first, next } = await copyAppend(writer.client, plan.rows, SEQUENCE_BITS, { xid, discard: open !== undefined && xid === undefined, openNext: this.queue.length > 0 || this.inFlight > 1 || this.arrivalGap < WRITER_GRACE_MS })
      writer.xid = next
      plan.rows.forEach((row, i) => (row.position = first + BigInt(i)))
      for (const row of plan.rows) this.remember(row.streamId, { revision: row.revision, position: row.position! })
      this.written.add(plan.rows as WrittenRow[])
      this.committed()
    }
    return plan.outcomes.map((o) => (o.ok ? { ok: true, result: o.result() } : o))
  }

  /**
   * The heads of the batch's streams when no read is needed to know them, else undefined: a stream's head is
   * in the cache of heads this store wrote, or every append to it in the batch expects no stream (a new
   * stream: its commands start with a fresh id), which is taken at its word. A wrong guess, like a stale
   * cached head or an event id already stored, fails the insert on a unique constraint, and the batch is
   * then read and decided afresh.
   */
  private knownHeads(batch: readonly PendingAppend[]): Map<string, { revision: number; position: Position }> | undefined {
    const heads = new Map<string, { revision: number; position: Position }>()
    for (const append of batch) {
      const head = this.heads.get(append.streamId)
      if (head) heads.set(append.streamId, { ...head })
      else if (append.expected !== 'no_stream' || append.events.length === 0) return undefined
    }
    return heads
  }

  /**
   * Wakes subscribers after a commit: this store's own at once, other stores' (other processes) with
   * `NOTIFY dcp_events`, sent after the commit rather than inside the transaction. A NOTIFY in the writing
   * transaction holds Postgres' notify lock through the commit's WAL flush, so appending transactions
   * would commit one at a time. Commits made while a NOTIFY is on its way share the next one, which leaves
   * NOTIFY_INTERVAL_MS after it. A NOTIFY lost with a connection (or a process that dies right after its
   * commit) costs other stores' subscribers at most their idle poll (`idlePollMs`), never an event.
   */
  private committed(): void {
    this.signal.notify()
    if (this.announcing) {
      this.announceAgain = true
      return
    }
    this.announcing = (async () => {
      do {
        // at most one NOTIFY per NOTIFY_INTERVAL_MS: commits meanwhile share it
        const wait = this.announcedAt + NOTIFY_INTERVAL_MS - performance.now()
        if (wait > 0 && !this.closed) await new Promise((resolve) => setTimeout(resolve, wait))
        this.announceAgain = false
        this.announcedAt = performance.now()
        if (await this.othersListen()) await this.pool.query(`select pg_notify('dcp_events', $1)`, [this.instance]).catch(() => {})
      } while (this.announceAgain)
      this.announcing = undefined
    })()
  }

  /**
   * Whether a NOTIFY would wake another process: a connection of this database, other than this store's own
   * listener, whose last statement is `listen dcp_events` (a store's listener runs nothing else), or whose
   * statements this role may not see. Asked at most once per `listenerCheckMs`: a process that starts
   * listening meanwhile is woken by its idle poll until then (`idlePollMs`), as after a NOTIFY lost with a
   * connection; it reads every event all the same. When this store cannot see its own listener there
   * (statement tracking off) or cannot ask, the answer is yes. With one process, this saves a NOTIFY (a
   * transaction, and a wake-up of this store's own listener) every 10 ms under load.
   */
  private async othersListen(): Promise<boolean> {
    if (this.others && performance.now() - this.others.at < this.listenerCheckMs) return this.others.listening
    let listening = true
    const own = this.listenerPid
    if (own !== undefined) {
      const seen = await this.pool
        .query<{ own: number; others: number }>(
          `select count(*) filter (where pid = $1 and query = 'listen dcp_events')::int as own,
                  count(*) filter (where pid <> $1 and query in ('listen dcp_events', '<insufficient privilege>'))::int as others
             from pg_stat_activity where datname = current_database()`,
          [own],
        )
        .catch(() => undefined)
      const row = seen?.rows[0]
      if (row) listening = row.own === 0 || row.others > 0
    }
    this.others = { at: performance.now(), listening }
    return listening
  }

  /** Caches a stream's head (most recently written first out last; bounded). */
  private remember(streamId: string, head: { revision: number; position: Position }): void {
    this.heads.delete(streamId)
    this.heads.set(streamId, head)
    if (this.heads.size > HEAD_CACHE_SIZE) this.heads.delete(this.heads.keys().next().value!)
  }

  private async readState(client: pg.PoolClient, streamIds: string[], batch: PendingAppend[]) {
    const eventIds = batch.flatMap((a) => a.events.map((e) => e.id))
    const state = await client.query<{ kind: string; key: string; stream_id: string; revision: string; position: string }>({
      name: 'dcp-append-state',
      text: `select 'stream' as kind, s.stream_id as key, s.stream_id, e.revision, e.position
               from unnest($1::text[]) as s(stream_id)
               cross join lateral (select revision, position from events where stream_id = s.stream_id order by revision desc limit 1) e
             union all
             select 'id', event_id::text, stream_id, revision, position from events where event_id = any($2::uuid[])`,
      values: [streamIds, eventIds],
    })
    const heads = new Map<string, { revision: number; position: Position }>()
    const stored = new Map<string, StoredId>()
    for (const row of state.rows) {
      const at = { streamId: row.stream_id, revision: Number(row.revision), position: BigInt(row.position) }
      if (row.kind === 'stream') heads.set(row.key, at)
      else stored.set(row.key, at)
    }
    return { heads, stored }
  }

  async readStream(streamId: string, options: ReadStreamOptions = {}): Promise<RecordedEvent[]> {
    const result = await this.query(
      `select ${SELECT_COLUMNS} from events where stream_id = $1 and revision >= $2 order by revision limit $3`,
      [streamId, options.fromRevision ?? 0, options.maxCount ?? null],
    )
    return result.rows.map(toRecorded)
  }

  /**
   * A page of the log. When the page is held back below a transaction that may still commit while events
   * committed before this call lie past it (another writer's transaction, or one of another database that
   * has just ended, holds the bound for a moment), it is read again every few ms, for up to a second, until
   * those events are final: a read right after an append sees it. Events committed after the call do not
   * make it wait.
   */
  async readAll(after: Position = START, limit = 1000): Promise<RecordedEvent[]> {
    let page = await this.readPage(after, limit)
    if (!page.held) return page.events
    const head = await this.headPosition()
    const deadline = Date.now() + READ_ALL_WAIT_MS
    while (page.held && page.last < head && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, this.heldPollMs))
      page = await this.readPage(after, limit)
    }
    return page.events
  }

  /**
   * A page of the log, stopping below the bound (computed once: a materialised CTE), with one extra row
   * (position only) past it telling whether the page was held back. Rows at or above the bound are not read:
   * under a steady stream of appends there always are some, and a subscriber re-reads a held page every few
   * ms.
   *
   * Near the head of the log, where this store's own recent commits are (`written`), the page is read in two
   * steps: the positions, streams and types (no payloads), then in full only the events this store does not
   * hold (another process's, or forgotten ones). Deciding what may be delivered is the database's, as
   * always; only the payloads of this store's own events are not read back and parsed again. Further back
   * (a catch-up, a rebuild) the page is one read in full, as it was.
   */
  private async readPage(after: Position, limit: number, filter?: EventFilter): Promise<Page> {
    const oldest = this.written.oldest()
    if (oldest === undefined || after < oldest) return filter ? this.readFilteredPage(after, limit, filter) : this.readFullPage(after, limit)
    const heads = await this.query(
      `with b as materialized (select dcp_position_bound() as bound)
       (select position, stream_id, type, recorded_at, false as in_flight from events where position > $1 and position < (select bound from b) order by position limit $2)
       union all
       (select position, null, null, null, true from events where position > $1 and position >= (select bound from b) order by position limit 1)`,
      [after.toString(), limit],
    )
    const page: (RecordedEvent | bigint)[] = []
    const missing: string[] = []
    let scanned = 0
    let last = after
    let held = false
    for (const row of heads.rows as { position: string; stream_id: string; type: string; recorded_at: Date; in_flight: boolean }[]) {
      if (row.in_flight) {
        held = scanned < limit
        break
      }
      scanned++
      last = BigInt(row.position)
      if (!matchesFilter({ type: row.type, streamId: row.stream_id }, filter)) continue
      const event = this.written.take(last, row.stream_id, row.type, row.recorded_at)
      if (!event) missing.push(row.position)
      page.push(event ?? last)
    }
    if (missing.length === 0) return { events: page as RecordedEvent[], scanned, last, held }
    const full = await this.query(`select ${SELECT_COLUMNS} from events where position = any($1::bigint[])`, [missing])
    const read = new Map(full.rows.map((row) => [BigInt(row.position as string), toRecorded(row)]))
    // every position was below the bound, so it is final and the read finds it (unless deleted meanwhile by
    // hand, when a read in full would not have found it either)
    const events = page.flatMap((e) => (typeof e === 'bigint' ? (read.get(e) ?? []) : [e]))
    return { events, scanned, last, held }
  }

  /** A page read in full (see readPage). */
  private async readFullPage(after: Position, limit: number): Promise<Page> {
    const result = await this.query(
      `with b as materialized (select dcp_position_bound() as bound)
       (select ${SELECT_COLUMNS}, false as in_flight from events where position > $1 and position < (select bound from b) order by position limit $2)
       union all
       (select position, null, null, null, null, null, null, null, true from events where position > $1 and position >= (select bound from b) order by position limit 1)`,
      [after.toString(), limit],
    )
    const events: RecordedEvent[] = []
    let held = false
    for (const row of result.rows) {
      if (row.in_flight) {
        held = events.length < limit
        break
      }
      events.push(toRecorded(row))
    }
    return { events, scanned: events.length, last: events.at(-1)?.position ?? after, held }
  }

  /**
   * A filtered page in two reads: the page's positions, types and streams (no payloads), then in full only
   * the events that match. A projection that wants one event in a hundred does not read and parse the
   * other ninety-nine.
   */
  async readFilteredPage(after: Position, limit: number, filter: EventFilter): Promise<Page> {
    const heads = await this.query(
      `select position, type, stream_id, position >= (select dcp_position_bound()) as in_flight
         from events where position > $1 order by position limit $2`,
      [after.toString(), limit],
    )
    const wanted: string[] = []
    let scanned = 0
    let last = after
    let held = false
    for (const row of heads.rows as { position: string; type: string; stream_id: string; in_flight: boolean }[]) {
      if (row.in_flight) {
        held = true
        break
      }
      scanned++
      last = BigInt(row.position)
      if (matchesFilter({ type: row.type, streamId: row.stream_id }, filter)) wanted.push(row.position)
    }
    if (wanted.length === 0) return { events: [], scanned, last, held }
    const full = await this.query(`select ${SELECT_COLUMNS} from events where position = any($1::bigint[]) order by position`, [wanted])
    return { events: full.rows.map(toRecorded), scanned, last, held }
  }

  subscribe(options: SubscribeOptions = {}): Subscription {
    void this.listen()
    return new PollingSubscription(
      { readPage: (after, limit, filter) => this.readPage(after, limit, filter), signal: this.signal, idlePollMs: this.idlePollMs, heldPollMs: this.heldPollMs },
      options,
    )
  }

  async headPosition(): Promise<Position> {
    const result = await this.query('select max(position) as position from events', [])
    const position = result.rows[0]?.position
    return position == null ? START : BigInt(position)
  }

  async close(): Promise<void> {
    this.closed = true
    this.signal.notify()
    for (const wake of this.parked) wake()
    if (this.inFlight > 0 || this.queue.length > 0) await new Promise<void>((resolve) => (this.idle = resolve))
    await Promise.all(this.retiring)
    await this.announcing
    const listener = this.listener
    this.listener = undefined
    await listener?.end().catch(() => {})
  }

  private async query(text: string, values: unknown[]): Promise<pg.QueryResult> {
    try {
      return await this.pool.query(text, values)
    } catch (cause) {
      if (cause instanceof pg.DatabaseError) throw cause // the server answered: let its error say what it is
      throw new EventStoreUnavailableError(`cannot reach the event store database: ${(cause as Error).message}`, { cause })
    }
  }

  /** One LISTEN connection per store wakes every subscription; it reconnects after a drop. */
  private listen(): Promise<void> {
    if (this.listening || this.closed) return this.listening ?? Promise.resolve()
    this.listening = (async () => {
      const client = new pg.Client(this.pool.options)
      // another store's commit (an empty payload: a writer from before notifications named their store)
      client.on('notification', (message) => {
        if (message.payload !== this.instance) this.signal.notify()
      })
      client.on('error', () => {})
      client.on('end', () => {
        if (this.listener === client) this.listener = undefined
        if (this.listener === undefined) this.listenerPid = undefined
        this.listening = undefined
        // wake subscribers so they poll, and listen again unless the store is closing
        this.signal.notify()
        if (!this.closed) setTimeout(() => void this.listen(), 500).unref()
      })
      try {
        await client.connect()
        // its backend, asked first: `listen dcp_events` stays its last statement (see othersListen)
        const { rows } = await client.query<{ pid: number }>('select pg_backend_pid() as pid')
        await client.query('listen dcp_events')
        if (this.closed) await client.end()
        else {
          this.listener = client
          this.listenerPid = rows[0]?.pid
        }
      } catch {
        await client.end().catch(() => {})
      }
    })()
    return this.listening
  }
}

/** The highest position among the heads of a batch's streams (START when none has a head). */
function newestHead(heads: Map<string, { position: Position }>): Position {
  let newest = START
  for (const head of heads.values()) if (head.position > newest) newest = head.position
  return newest
}

/** The stream (and the revision taken) of a unique violation on `(stream_id, revision)`, or undefined. */
export function contendedStream(error: unknown): { streamId: string; revision: number } | undefined {
  const { code, constraint, detail } = error as { code?: string; constraint?: string; detail?: string }
  if (code !== '23505' || constraint !== 'events_stream_id_revision_key' || !detail) return undefined
  // the last ", <digits>)" closes the key: a stream id may hold commas and parentheses itself
  const match = /^Key \(stream_id, revision\)=\((.*), (\d+)\) already exists\.$/s.exec(detail)
  return match ? { streamId: match[1]!, revision: Number(match[2]) } : undefined
}

/**
 * Refuses the appends to a contended stream, and the `appendMany` lots they are part of (all or nothing),
 * with WrongExpectedRevisionError; returns the rest of the batch.
 */
function refuseStream(batch: PendingAppend[], contended: { streamId: string; revision: number }): PendingAppend[] {
  const groups = new Set(batch.filter((a) => a.streamId === contended.streamId && a.group).map((a) => a.group))
  const refused = (a: PendingAppend) => a.streamId === contended.streamId || (a.group !== undefined && groups.has(a.group))
  const error = new WrongExpectedRevisionError(contended.streamId, 'any', contended.revision)
  for (const append of batch) {
    if (refused(append)) append.reject(append.streamId === contended.streamId ? new WrongExpectedRevisionError(contended.streamId, append.expected, contended.revision) : error)
  }
  return batch.filter((a) => !refused(a))
}

/** A connection writing batches, and the transaction it holds open for its next one (its id), if any. */
interface Writer {
  client: pg.PoolClient
  xid: bigint | undefined
  /** Set when the connection failed: it leaves the pool. */
  broken?: Error
}

interface StoredId {
  streamId: string
  revision: number
  position: Position
}

type Outcome = { ok: true; result: AppendResult } | { ok: false; error: Error }

interface PlannedRow extends CopyRow {
  position?: Position
}

/**
 * Decides each append of a batch in queue order against the streams' current heads: the pure part of a
 * group commit. Returns the rows to insert and, per append, its error or a way to read its result once
 * the rows have positions.
 */
export function planBatch(
  batch: readonly Pick<PendingAppend, 'streamId' | 'events' | 'expected' | 'group'>[],
  heads: Map<string, { revision: number; position: Position }>,
  stored: Map<string, StoredId>,
): { rows: PlannedRow[]; outcomes: PlannedOutcome[] } {
  const rows: PlannedRow[] = []
  const inBatch = new Map<string, PlannedRow>()
  const outcomes: PlannedOutcome[] = []
  for (let i = 0; i < batch.length; ) {
    const unit = batch.slice(i, i + (batch[i]!.group?.size ?? 1))
    i += unit.length
    // what a refused unit must undo
    const rowCount = rows.length
    const headsBefore = unit.map((a) => [a.streamId, heads.get(a.streamId)] as const)
    const planned = unit.map((append) => planAppend(append, heads, stored, inBatch, rows))
    const refused = planned.find((o) => !o.ok)
    if (refused && unit.length > 1) {
      for (const row of rows.splice(rowCount)) inBatch.delete(row.id)
      for (const [stream, head] of headsBefore.reverse()) {
        if (head) heads.set(stream, head)
        else heads.delete(stream)
      }
      outcomes.push(...unit.map(() => refused))
    } else outcomes.push(...planned)
  }
  return { rows, outcomes }
}

type PlannedOutcome = { ok: true; result: () => AppendResult } | { ok: false; error: Error }

function planAppend(
  append: Pick<PendingAppend, 'streamId' | 'events' | 'expected'>,
  heads: Map<string, { revision: number; position: Position }>,
  stored: Map<string, StoredId>,
  inBatch: Map<string, PlannedRow>,
  rows: PlannedRow[],
): PlannedOutcome {
  const ids = append.events.map((e) => e.id)
  const already = ids.map((id) => stored.get(id) ?? inBatch.get(id))
  const found = already.filter((x) => x !== undefined)
  // a retry of an append that is stored (or queued just before in this batch): the original result
  if (ids.length > 0 && found.length === ids.length && found.every((x) => x.streamId === append.streamId)) {
    return { ok: true as const, result: () => resultOf(already as { revision: number; position?: Position }[]) }
  }
  if (found.length > 0) {
    return { ok: false as const, error: new DuplicateEventIdError(append.streamId, ids.filter((_, i) => already[i])) }
  }
  const head = heads.get(append.streamId)
  const current = head ? head.revision : -1
  if (!revisionMatches(append.expected, current)) {
    return { ok: false as const, error: new WrongExpectedRevisionError(append.streamId, append.expected, head ? current : 'no_stream') }
  }
  if (ids.length === 0) {
    const position = head?.position ?? START
    return { ok: true as const, result: () => ({ nextRevision: current, position }) }
  }
  const mine = append.events.map((e, i) => {
    const row: PlannedRow = { streamId: append.streamId, revision: current + 1 + i, ...e }
    inBatch.set(e.id, row)
    rows.push(row)
    return row
  })
  const last = mine.at(-1)!
  heads.set(append.streamId, { revision: last.revision, position: START })
  return { ok: true as const, result: () => resultOf(mine) }
}

function resultOf(events: { revision: number; position?: Position }[]): AppendResult {
  let nextRevision = -1
  let position = START
  for (const e of events) {
    if (e.revision > nextRevision) nextRevision = e.revision
    if (e.position !== undefined && e.position > position) position = e.position
  }
  return { nextRevision, position }
}

export function revisionMatches(expected: ExpectedRevision, current: number): boolean {
  switch (expected) {
    case 'any':
      return true
    case 'no_stream':
      return current === -1
    case 'stream_exists':
      return current >= 0
    default:
      return expected === current
  }
}

function toRow(event: NewEvent): PendingAppend['events'][number] {
  const id = storedId(event)
  const data = JSON.stringify(event.data ?? null)
  const metadata = JSON.stringify(event.metadata ?? {})
  assertStorable(event.type, data)
  assertStorable(event.type, metadata)
  return { id, type: event.type, data, metadata }
}

function toRecorded(row: Record<string, unknown>): RecordedEvent {
  return {
    id: row.event_id as string,
    streamId: row.stream_id as string,
    revision: Number(row.revision),
    position: BigInt(row.position as string),
    type: row.type as string,
    data: row.data,
    metadata: row.metadata as EventMetadata,
    recordedAt: row.recorded_at as Date,
  }
}
