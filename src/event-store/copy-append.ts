import type pg from 'pg'

/** One event row as the append writes it; `data` and `metadata` are JSON text already. */
export interface CopyRow {
  streamId: string
  revision: number
  id: string
  type: string
  data: string
  metadata: string
}

/** The parts of pg's connection a submittable query drives (see pg/lib/connection.js). */
interface Connection {
  query(text: string): void
  sendCopyFromChunk(chunk: Buffer): void
  endCopyFrom(): void
  sendCopyFail(message: string): void
  stream: { cork?(): void; uncork?(): void }
}

const TEXT_SPECIAL = /[\\\t\n\r]/
const TEXT_ESCAPES: Record<string, string> = { '\\': '\\\\', '\t': '\\t', '\n': '\\n', '\r': '\\r' }

/** A value as a field of COPY's text format (only a backslash, tab, newline or carriage return needs escaping). */
function field(value: string): string {
  return TEXT_SPECIAL.test(value) ? value.replace(/[\\\t\n\r]/g, (c) => TEXT_ESCAPES[c]!) : value
}

/** What a CopyAppend gives: the position of its first row, and the id of the transaction it opened for the next batch. */
export interface CopyAppended {
  first: bigint
  /** The transaction left open on the connection for the next batch (`openNext`), or undefined. */
  next: bigint | undefined
}

export interface CopyAppendOptions {
  /** The id of the transaction open on the connection, to write in (one round trip); else one is opened. */
  xid?: bigint | undefined
  /** Roll back the transaction open on the connection first (its id is too old for these rows). */
  discard?: boolean
  /** Leave a new transaction open for the next batch (`next`). */
  openNext?: boolean
}

const COPY = 'copy events (position, stream_id, revision, event_id, type, data, metadata) from stdin'
const OPEN = 'begin; select pg_current_xact_id()::text as xid'

/**
 * Writes a batch of event rows with COPY and commits it, in one simple-protocol query, and gives the position
 * of the first. The positions are `(transaction id << 20) + n`, so the rows can only be written once the
 * transaction id is known:
 *
 * - `xid` given: the connection has a transaction open with that id (opened by the previous batch). The
 *   query `copy ...; commit` and its rows go in one write: one round trip. Postgres reads the rows once the
 *   COPY starts (and ignores them, as the protocol says, when the COPY failed before).
 * - no `xid`: `begin; select pg_current_xact_id(); copy ...; commit`. The id arrives before Postgres asks
 *   for the rows, which then go with their positions: two round trips.
 *
 * With `discard`, the query starts with `rollback`: the transaction open on the connection is not used (its
 * id is below a head the rows follow, see postgres.ts) and a fresh one is opened.
 *
 * With `openNext`, the query ends with `begin; select pg_current_xact_id()`: the connection is left in a new
 * transaction whose id (`next`) the next batch's rows are made with, so that batch takes one round trip. A
 * transaction left open holds readers below its position bound, so the caller either uses it at once or
 * rolls it back.
 *
 * COPY costs Postgres about half the CPU per row of an INSERT (measured here, 256-row batches: ~31 µs
 * against ~64 µs), and the append path is bound by it.
 *
 * An error (e.g. a unique violation: a stale head, an id already stored) rejects with pg's `DatabaseError`,
 * as a failed INSERT would, and leaves the connection in a failed transaction: the caller rolls it back. It
 * is a pg "submittable": pass it to `client.query()` and await `done`.
 */
export class CopyAppend {
  readonly text: string
  readonly done: Promise<CopyAppended>
  callback?: (error: Error | null) => void
  private resolve!: (result: CopyAppended) => void
  private reject!: (error: Error) => void
  private readonly lines: string[]
  /** Transaction ids in the order they arrive: this batch's (unless given), then the next one's. */
  private readonly xids: bigint[] = []
  private readonly xid: bigint | undefined
  private error?: Error
  private copied = false
  private committed = false
  private readonly discarding: boolean
  private settled = false

  constructor(rows: readonly CopyRow[], private readonly sequenceBits: bigint, options: CopyAppendOptions = {}) {
    // everything but the position, made before the round trip
    this.lines = rows.map((r) => `\t${field(r.streamId)}\t${r.revision}\t${r.id}\t${field(r.type)}\t${field(r.data)}\t${field(r.metadata)}\n`)
    this.xid = options.xid
    this.discarding = options.discard ?? false
    this.text = `${options.discard ? 'rollback; ' : ''}${options.xid === undefined ? `${OPEN}; ` : ''}${COPY}; commit${options.openNext ? `; ${OPEN}` : ''}`
    this.done = new Promise((resolve, reject) => {
      this.resolve = resolve
      this.reject = reject
    })
  }

  submit(connection: Connection): void {
    if (this.xid === undefined) {
      connection.query(this.text)
      return
    }
    connection.stream.cork?.()
    connection.query(this.text)
    this.sendRows(connection, this.xid)
    connection.stream.uncork?.()
  }

  handleRowDescription(): void {}

  handleDataRow(message: { fields: (string | null)[] }): void {
    this.xids.push(BigInt(message.fields[0]!))
  }

  handleCommandComplete(message: { text?: string }): void {
    // `commit` of a transaction that failed answers ROLLBACK, with no error of its own (a `discard` answers
    // ROLLBACK first, as asked)
    if (message.text === 'ROLLBACK' && !(this.discarding && !this.committed && this.xids.length === 0)) this.error ??= new Error('append: the transaction was rolled back')
    if (message.text === 'COMMIT') this.committed = true
  }

  handleEmptyQuery(): void {}
  handlePortalSuspended(): void {}
  handleCopyData(): void {}

  handleCopyInResponse(connection: Connection): void {
    if (this.copied) return // sent with the query
    const xid = this.xids[0]
    if (xid === undefined) {
      connection.sendCopyFail('no transaction id before the copy') // Postgres fails the transaction and answers with an error
      return
    }
    connection.stream.cork?.()
    this.sendRows(connection, xid)
    connection.stream.uncork?.()
  }

  private sendRows(connection: Connection, xid: bigint): void {
    const first = xid << this.sequenceBits
    let payload = ''
    for (let i = 0; i < this.lines.length; i++) payload += (first + BigInt(i)).toString() + this.lines[i]
    connection.sendCopyFromChunk(Buffer.from(payload, 'utf8'))
    connection.endCopyFrom()
    this.copied = true
  }

  handleError(error: Error): void {
    this.error ??= error
    // Postgres answers ReadyForQuery after an error, but pg forgets this query at the error: settle now
    this.settle()
  }

  handleReadyForQuery(): void {
    this.settle()
  }

  private settle(): void {
    if (this.settled) return
    this.settled = true
    const own = this.xid ?? this.xids[0]
    const error = this.error ?? (this.copied && this.committed && own !== undefined ? undefined : new Error('append: the copy did not run'))
    this.callback?.(error ?? null)
    if (error) this.reject(error)
    else this.resolve({ first: own! << this.sequenceBits, next: this.xids[this.xid === undefined ? 1 : 0] })
  }
}

/** Runs a CopyAppend on a client; resolves to the position of the batch's first row and the transaction opened for the next. */
export async function copyAppend(client: pg.PoolClient, rows: readonly CopyRow[], sequenceBits: bigint, options: CopyAppendOptions = {}): Promise<CopyAppended> {
  const copy = new CopyAppend(rows, sequenceBits, options)
  client.query(copy as unknown as pg.QueryConfig)
  return copy.done
}
