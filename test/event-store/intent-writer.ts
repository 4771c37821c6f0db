/**
 * Child process of intents.test.ts: writes sets of four new streams with `appendAll` through the Postgres
 * store's single-stream path (as on EventStoreDB), one stream append after another (separate commits), and
 * prints `ack <set>` for every set `appendAll` confirmed. The parent kills it with SIGKILL at a random moment.
 */
import { writeSync } from 'node:fs'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import { appendAll } from '../../src/event-store/port.js'
import { connect } from '../../src/postgres/database.js'
import { withoutAppendMany } from './without-append-many.js'

const [url, prefix] = process.argv.slice(2)
const database = connect(url!, { max: 4 })
const store = withoutAppendMany(new PostgresEventStore(database.pool), { serial: true })

for (let set = 0; set < 10_000; set++) {
  await appendAll(
    store,
    Array.from({ length: 4 }, (_, j) => ({
      streamId: `${prefix}-${set}-${j}`,
      events: [{ type: 'Part', data: { set, j, k: 0 } }, { type: 'Part', data: { set, j, k: 1 } }],
      options: { expectedRevision: 'no_stream' as const },
    })),
  )
  writeSync(1, `ack ${set}\n`)
}
writeSync(1, 'done\n')
await store.close()
await database.close()
