import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import t from 'tap'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import { eventCounts } from '../../src/projections/event-counts.js'
import { Projections } from '../../src/projections/projections.js'
import { freshDatabase } from '../helpers/database.js'

const writer = fileURLToPath(new URL('./crash-writer.ts', import.meta.url))

t.test('SIGKILL mid-append: every acknowledged event survives, positions are unique, the projection equals its rebuild', async (t) => {
  const database = await freshDatabase(t)
  const child = spawn(process.execPath, ['--import', 'tsx', writer, database.url, '10000'], { stdio: ['ignore', 'pipe', 'inherit'] })
  const acked: { stream: string; revision: number; id: string }[] = []
  let done = false
  let buffer = ''
  let killAt = 0
  child.stdout.setEncoding('utf8')
  child.stdout.on('data', (chunk: string) => {
    buffer += chunk
    const lines = buffer.split('\n')
    buffer = lines.pop()!
    for (const line of lines) {
      if (line === 'done') done = true
      const [word, stream, revision, id] = line.split(' ')
      if (word === 'ack') acked.push({ stream: stream!, revision: Number(revision), id: id! })
    }
    // a random moment once writing is well under way
    if (!killAt && acked.length > 0) {
      killAt = 1
      setTimeout(() => child.kill('SIGKILL'), 100 + Math.floor(Math.random() * 500))
    }
  })
  const exit = await new Promise<NodeJS.Signals | null>((resolve) => child.on('exit', (_, signal) => resolve(signal)))
  t.equal(exit, 'SIGKILL', 'the writer was killed')
  t.notOk(done, `killed before it finished (${acked.length} of 10000 acknowledged)`)
  t.ok(acked.length > 0, 'some appends were acknowledged before the kill')

  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  const { rows } = await database.pool.query<{ event_id: string; stream_id: string; revision: string; position: string }>(
    'select event_id::text, stream_id, revision, position from events order by position',
  )
  const stored = new Map(rows.map((r) => [r.event_id, r]))
  const lost = acked.filter((a) => stored.get(a.id)?.stream_id !== a.stream || Number(stored.get(a.id)?.revision) !== a.revision)
  t.same(lost, [], 'every acknowledged event is stored where it was acknowledged')
  t.equal(new Set(rows.map((r) => r.position)).size, rows.length, 'no duplicate positions')
  const byStream = new Map<string, number[]>()
  for (const r of rows) byStream.set(r.stream_id, [...(byStream.get(r.stream_id) ?? []), Number(r.revision)])
  for (const [stream, revisions] of byStream) t.same(revisions, [...revisions.keys()], `${stream}: revisions contiguous in position order`)

  // restart: the projection resumes from its checkpoint, then must equal a replay of the whole log
  const projections = new Projections({ db: database.db, store, retryMs: 20 }, [eventCounts])
  projections.start()
  t.teardown(() => projections.stop())
  await projections.waitFor(await store.headPosition(), 20_000)
  const report = await projections.audit('event_counts')
  t.ok(report.ok, `the resumed projection equals its rebuild (${JSON.stringify(report.tables[0]?.differences.slice(0, 2))})`)
  const counted = await database.pool.query<{ n: string }>('select sum(count)::text as n from rm_event_counts.event_counts')
  t.equal(Number(counted.rows[0]!.n), rows.length, 'the projection counted every stored event once')
})
