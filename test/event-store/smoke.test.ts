import t from 'tap'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import { freshDatabase } from '../helpers/database.js'

t.test('append and read', async (t) => {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  const r = await store.append('s-1', [{ type: 'A', data: { x: 1 } }], { expectedRevision: 'no_stream' })
  t.equal(r.nextRevision, 0)
  const results = await Promise.allSettled(Array.from({ length: 50 }, () => store.append('s-1', [{ type: 'B', data: {} }], { expectedRevision: 0 })))
  t.equal(results.filter((x) => x.status === 'fulfilled').length, 1)
  const all = await store.readAll()
  t.equal(all.length, 2)
})
