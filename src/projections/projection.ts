import type { Kysely, Transaction } from 'kysely'
import type { EventFilter, RecordedEvent } from '../event-store/port.js'

/**
 * A read model built from the log. Its tables live in their own Postgres schema (`rm_<name>`), and the
 * runner sets the transaction's `search_path` to it, so `createTables` and `apply` use unqualified table
 * names and the same code builds the live copy, a rebuild's fresh copy and an audit's shadow copy.
 *
 * `apply` must be deterministic (no clock, no random; times come from the events) and must not depend on
 * how the events are batched: replaying the same log must give the same rows, byte for byte.
 */
export interface Projection {
  /** Lowercase letters, digits and `_`. */
  name: string
  /** Bump when `createTables` or `apply` changes: the next start rebuilds the read model. */
  version: number
  /** The events it handles; the others are skipped before `apply`. */
  filter?: EventFilter
  /** Its tables and their primary keys, which the audit compares row by row. */
  tables: readonly { name: string; primaryKey: readonly string[] }[]
  createTables(db: Kysely<any>): Promise<void>
  apply(trx: Transaction<any>, events: RecordedEvent[]): Promise<void>
}

export const liveSchema = (name: string) => `rm_${name}`

export function checkProjectionName(name: string): void {
  if (!/^[a-z][a-z0-9_]{0,40}$/.test(name)) throw new Error(`projection name ${JSON.stringify(name)}: use lowercase letters, digits and _`)
}
