import { sql, type Transaction } from 'kysely'

/**
 * Load, fold, save: the rows of one read-model table that a batch of events touches, loaded with one
 * statement, changed in memory event by event (in log order, so the result is what applying the events one
 * at a time would give), and written back with one statement. A batch costs a few statements whatever its
 * size, instead of one or two per event.
 *
 * Tables are named unqualified: the runner's `search_path` points at the copy being written (live, rebuild
 * or audit shadow). A row must carry every column of its table (`save` writes whole rows).
 */
export class RowSet<Row extends Record<string, unknown>> {
  private readonly rows = new Map<string, Row>()
  private readonly loaded = new Set<string>()
  /** Keys loaded and not found: not in the table (the runner is its one writer), so their rows go in by a plain INSERT. */
  private readonly absent = new Set<string>()
  private readonly dirty = new Set<string>()

  /** `parse` turns a row as the driver returns it into a Row (e.g. a bigint column's string into a number). */
  constructor(private readonly table: string, private readonly key: keyof Row & string, private readonly parse: (row: Row) => Row = (row) => row) {}

  /** Loads the stored rows of these keys (those not loaded yet); one statement. */
  async load(trx: Transaction<any>, keys: Iterable<string>): Promise<void> {
    const wanted = [...new Set(keys)].filter((k) => !this.loaded.has(k))
    if (wanted.length === 0) return
    for (const k of wanted) this.loaded.add(k)
    const { rows } = await sql<Row>`select * from ${sql.table(this.table)} where ${sql.ref(this.key)} = any(${wanted}::text[])`.execute(trx)
    for (const row of rows) if (!this.rows.has(String(row[this.key]))) this.rows.set(String(row[this.key]), this.parse(row))
    const found = new Set(rows.map((row) => String(row[this.key])))
    for (const k of wanted) if (!found.has(k)) this.absent.add(k)
  }

  get(key: string): Row | undefined {
    return this.rows.get(key)
  }

  /** Adds the row unless one with its key exists (loaded or added); true when added. */
  insert(row: Row): boolean {
    const key = String(row[this.key])
    if (this.rows.has(key)) return false
    this.rows.set(key, row)
    this.dirty.add(key)
    return true
  }

  /** Adds the row or replaces the one with its key. */
  put(row: Row): void {
    const key = String(row[this.key])
    this.rows.set(key, row)
    this.dirty.add(key)
  }

  /** Changes the row of this key in place, when there is one; returns it. */
  update(key: string, change: Partial<Row>): Row | undefined {
    const row = this.rows.get(key)
    if (!row) return undefined
    Object.assign(row, change)
    this.dirty.add(key)
    return row
  }

  /**
   * Writes every added or changed row, in one statement: a row whose key was loaded and not found by a plain
   * INSERT (most rows of a busy read model are new, and an INSERT ... ON CONFLICT costs Postgres a
   * speculative insertion for each), any other over the stored row. The two never share a key.
   */
  async save(trx: Transaction<any>): Promise<void> {
    if (this.dirty.size === 0) return
    const fresh: Row[] = []
    const other: Row[] = []
    for (const k of this.dirty) (this.absent.has(k) ? fresh : other).push(this.rows.get(k)!)
    for (const k of this.dirty) this.absent.delete(k)
    this.dirty.clear()
    const columns = Object.keys((fresh[0] ?? other[0])!)
    const list = sql.join(columns.map((c) => sql.ref(c)))
    const updates = columns.filter((c) => c !== this.key).map((c) => sql`${sql.ref(c)} = excluded.${sql.ref(c)}`)
    const rowsOf = (rows: Row[]) => sql`select ${list} from jsonb_populate_recordset(null::${sql.table(this.table)}, ${JSON.stringify(rows)}::jsonb)`
    const insert = sql`insert into ${sql.table(this.table)} (${list})`
    const upsert = sql`${insert} ${rowsOf(other)} on conflict (${sql.ref(this.key)}) do ${updates.length > 0 ? sql`update set ${sql.join(updates)}` : sql`nothing`}`
    if (other.length === 0) await sql`${insert} ${rowsOf(fresh)}`.execute(trx)
    else if (fresh.length === 0) await upsert.execute(trx)
    else await sql`with fresh as (${insert} ${rowsOf(fresh)}) ${upsert}`.execute(trx)
  }
}
