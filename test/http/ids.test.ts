import t from 'tap'
import { derivedId, newId, newSecret } from '../../src/http/ids.js'

t.test('resource ids: prefix, 8 lowercase letters or digits, no repeats, every character about as likely', async (t) => {
  const ids = Array.from({ length: 20_000 }, () => newId('job'))
  t.ok(ids.every((id) => /^job_[a-z0-9]{8}$/.test(id)), 'the spec style')
  t.equal(new Set(ids).size, ids.length, 'no two alike')
  t.match(newId('model', 12), /^model_[a-z0-9]{12}$/)
  // 160,000 characters over 36 symbols: ~4,444 each; a biased draw (byte % 36) would put ~20% more on a..d
  const counts = new Map<string, number>()
  for (const id of ids) for (const c of id.slice(4)) counts.set(c, (counts.get(c) ?? 0) + 1)
  t.equal(counts.size, 36, 'all 36 characters appear')
  const expected = (ids.length * 8) / 36
  const worst = Math.max(...[...counts.values()].map((n) => Math.abs(n - expected) / expected))
  t.ok(worst < 0.08, `every character within 8% of its share (worst ${(worst * 100).toFixed(1)}%)`)
})

t.test('secrets: the prefix and 256 bits in base64url', async (t) => {
  const secret = newSecret('dcp_k_')
  t.match(secret, /^dcp_k_[A-Za-z0-9_-]{43}$/)
  t.not(newSecret('dcp_k_'), secret)
})

t.test('derived ids: the same for one seed and prefix, in the spec style, another for another seed or prefix', async (t) => {
  const seed = '0b9c4c1e-8f0e-4a43-9a57-3c1f1d2b7f10'
  t.match(derivedId('batch', seed), /^batch_[a-z0-9]{8}$/)
  t.equal(derivedId('batch', seed), derivedId('batch', seed))
  t.not(derivedId('batch', seed), derivedId('batch', `${seed}x`))
  t.not(derivedId('batch', seed).slice(6), derivedId('infer', seed).slice(6))
  const ids = Array.from({ length: 20_000 }, (_, i) => derivedId('job', `seed-${i}`))
  t.equal(new Set(ids).size, ids.length, 'no two alike')
})
