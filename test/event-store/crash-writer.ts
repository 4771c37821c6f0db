/**
 * Child process of crash.test.ts: appends events from concurrent writers while the event_counts
 * projection follows them, printing `ack <stream> <revision> <id>` for every append the store confirmed.
 * The parent kills it with SIGKILL at a random moment. Stdout is a pipe, so each line is written before
 * the next append is acknowledged.
 */
import { randomUUID } from 'node:crypto'
import { writeSync } from 'node:fs'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import { connect } from '../../src/postgres/database.js'
import { eventCounts } from '../../src/projections/event-counts.js'
import { Projections } from '../../src/projections/projections.js'

const [url, totalArg] = process.argv.slice(2)
const total = Number(totalArg)
const database = connect(url!, { max: 10 })
const store = new PostgresEventStore(database.pool)
const projections = new Projections({ db: database.db, store, retryMs: 20 }, [eventCounts])
projections.start()

const writers = 16
let issued = 0
await Promise.all(
  Array.from({ length: writers }, async (_, w) => {
    for (let revision = 0; issued < total; revision++) {
      issued++
      const id = randomUUID()
      await store.append(`task-${w}`, [{ id, type: 'TaskCompleted', data: { writer: w, revision, cpu_ms: revision % 97 } }], {
        expectedRevision: revision === 0 ? 'no_stream' : revision - 1,
      })
      writeSync(1, `ack task-${w} ${revision} ${id}\n`)
    }
  }),
)
writeSync(1, 'done\n')
await projections.stop()
await store.close()
await database.close()
