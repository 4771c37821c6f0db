import { sql } from 'kysely'
import type { RecordedEvent } from '../event-store/port.js'
import type { Projection } from './projection.js'

/**
 * How many events of each type each kind of stream holds (`device`, `model`, ...: the stream id up to
 * its first `-`), and the position of the last one. Used by health and status pages, and the simplest
 * example of a projection.
 */
export const eventCounts: Projection = {
  name: 'event_counts',
  version: 1,
  tables: [{ name: 'event_counts', primaryKey: ['category', 'type'] }],

  async createTables(db) {
    await db.schema
      .createTable('event_counts')
      .addColumn('category', 'text', (c) => c.notNull())
      .addColumn('type', 'text', (c) => c.notNull())
      .addColumn('count', 'bigint', (c) => c.notNull())
      .addColumn('last_position', 'bigint', (c) => c.notNull())
      .addPrimaryKeyConstraint('event_counts_pk', ['category', 'type'])
      .execute()
  },

  async apply(trx, events) {
    const rows = [...countByKey(events).values()]
    await trx
      .insertInto('event_counts')
      .values(rows)
      .onConflict((oc) =>
        oc.columns(['category', 'type']).doUpdateSet({
          count: sql`event_counts.count + excluded.count`,
          last_position: sql`greatest(event_counts.last_position, excluded.last_position)`,
        }),
      )
      .execute()
  },
}

export function categoryOf(streamId: string): string {
  const dash = streamId.indexOf('-')
  return dash < 0 ? streamId : streamId.slice(0, dash)
}

function countByKey(events: RecordedEvent[]) {
  const rows = new Map<string, { category: string; type: string; count: number; last_position: string }>()
  for (const e of events) {
    const category = categoryOf(e.streamId)
    const key = `${category}\u0001${e.type}`
    const row = rows.get(key) ?? { category, type: e.type, count: 0, last_position: '0' }
    row.count++
    row.last_position = e.position.toString()
    rows.set(key, row)
  }
  return rows
}
