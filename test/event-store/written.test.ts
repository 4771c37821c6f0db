import t from 'tap'
import { WrittenEvents, type WrittenRow } from '../../src/event-store/written.js'

const row = (n: number, data = `{"n":${n}}`): WrittenRow => ({ position: BigInt(n) << 20n, streamId: `s-${n}`, revision: 0, id: `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`, type: 'T', data, metadata: '{}' })
const at = new Date('2026-01-01T00:00:00Z')

t.test('an event kept is given back as a read would give it; one at another stream or type is not taken', async (t) => {
  const written = new WrittenEvents()
  written.add([row(1, '{"a":[1,2.5,null],"s":"ü\\n"}')])
  t.same(written.take(1n << 20n, 's-1', 'T', at), { id: row(1).id, streamId: 's-1', revision: 0, position: 1n << 20n, type: 'T', data: { a: [1, 2.5, null], s: 'ü\n' }, metadata: {}, recordedAt: at })
  t.equal(written.take(1n << 20n, 's-2', 'T', at), undefined, 'another stream at that position: read from the log')
  t.equal(written.take(1n << 20n, 's-1', 'U', at), undefined, 'another type')
  t.equal(written.take(2n << 20n, 's-2', 'T', at), undefined, 'not written here')
  const a = written.take(1n << 20n, 's-1', 'T', at)!
  ;(a.data as { a: number[] }).a.push(9)
  t.same((written.take(1n << 20n, 's-1', 'T', at)!.data as { a: number[] }).a, [1, 2.5, null], 'each take parses afresh: a consumer that changes its event changes no other')
})

t.test('bounded: the oldest written are forgotten first, by count and by size; a large event is not kept', async (t) => {
  const written = new WrittenEvents({ maxEvents: 3, maxChars: 40, maxEventChars: 20 })
  written.add([row(1), row(2), row(3), row(4)])
  t.equal(written.oldest(), 2n << 20n, 'by count')
  t.equal(written.take(1n << 20n, 's-1', 'T', at), undefined)
  t.ok(written.take(4n << 20n, 's-4', 'T', at))
  written.add([row(5, `{"x":"${'y'.repeat(30)}"}`)])
  t.equal(written.take(5n << 20n, 's-5', 'T', at), undefined, 'too large to keep')
  written.add([row(6, '{"x":"yyyyyyyyyy"}'), row(7, '{"x":"yyyyyyyyyy"}')])
  t.equal(written.oldest(), 6n << 20n, 'by size: the older ones went')
  for (let n = 8; n < 100; n++) written.add([row(n)])
  t.equal(written.oldest(), 97n << 20n, 'and so on, for ever')
  t.ok(written.take(99n << 20n, 's-99', 'T', at))
})
