import t from 'tap'
import { aggregate, clipBound, clipToNorm, deltaNorm, median, mixRobust, type Robustness, trimCount, trimmedMean } from '../../src/domain/aggregation.js'
import type { Weights } from '../../src/domain/fedavg.js'

const w = (tensors: Record<string, number[]>): Weights => Object.fromEntries(Object.entries(tensors).map(([name, values]) => [name, Float32Array.from(values)]))
const plain = (weights: Weights) => Object.fromEntries(Object.entries(weights).map(([name, values]) => [name, [...values]]))
const rule = (r: Partial<Robustness>): Robustness => ({ aggregation: 'fedavg', trim_fraction: 0.2, clip_norm: null, clip_factor: null, ...r })

t.test('trimmed mean drops ceil(fraction · n) values from each side of every coordinate, leaving at least one', async (t) => {
  t.same([1, 2, 3, 4, 5, 6, 10].map((n) => trimCount(n, 0.2)), [0, 0, 1, 1, 1, 2, 2])
  t.equal(trimCount(4, 0), 0, 'fraction 0: the plain mean')
  t.equal(trimCount(3, 0.45), 1, 'never all of them')
  // the liar's -100 and the high 9 are dropped: (1 + 2) / 2 at the first coordinate; (5 + 6) / 2 at the second
  const updates = [w({ a: [1, 5] }), w({ a: [2, 6] }), w({ a: [9, 4] }), w({ a: [-100, 100] })]
  t.same(plain(trimmedMean(updates, 0.25)), { a: [1.5, 5.5] })
  t.same(plain(trimmedMean(updates, 0)), { a: [-22, 28.75] }, 'nothing trimmed: the unweighted mean')
})

t.test('the median is coordinate-wise, the mean of the middle two of an even count', async (t) => {
  t.same(plain(median([w({ a: [1, 7], b: [0] }), w({ a: [3, -1], b: [2] }), w({ a: [100, 5], b: [1] })])), { a: [3, 5], b: [1] })
  t.same(plain(median([w({ a: [1] }), w({ a: [2] }), w({ a: [10] }), w({ a: [-1000] })])), { a: [1.5] })
})

t.test("clipping scales an update's change from the base down to the bound, and leaves a shorter one alone", async (t) => {
  const base = w({ a: [1, 1] })
  const far = w({ a: [4, 5] }) // change (3, 4): norm 5
  t.equal(deltaNorm(base, far), 5)
  t.same(plain(clipToNorm(base, far, 5, 2.5)), { a: [2.5, 3] }, 'half of the change')
  t.equal(clipToNorm(base, far, 5, 10), far, 'within the bound: unchanged')
  t.equal(clipBound([1, 3, 100], { clip_norm: null, clip_factor: 2 }), 6, 'adaptive: 2 × the median norm')
  t.equal(clipBound([1, 3, 100], { clip_norm: 4, clip_factor: 2 }), 4, 'the smaller of the two bounds')
  t.equal(clipBound([1, 3, 100], { clip_norm: null, clip_factor: null }), null, 'no bound')
})

t.test('a round: fedavg weighs by samples; the robust rules clip each update, then give each one vote', async (t) => {
  const base = w({ a: [0, 0] })
  // three honest updates near (1, 1), one liar at (-30, -40) claiming a thousand times the samples
  const updates = [
    { weights: w({ a: [1, 1] }), samples: 10 },
    { weights: w({ a: [1, 2] }), samples: 10 },
    { weights: w({ a: [2, 1] }), samples: 10 },
    { weights: w({ a: [-30, -40] }), samples: 10_000 },
  ]
  const fedavg = aggregate(base, updates, rule({}))
  t.ok(fedavg.weights.a![0]! < -29, `fedavg follows the liar: ${[...fedavg.weights.a!]}`)
  t.equal(fedavg.clipBound, null)

  const trimmed = aggregate(base, updates, rule({ aggregation: 'trimmed_mean', clip_factor: 2 }))
  // norms √2, √5, √5, 50: median √5, bound 2√5; only the liar is clipped, to (-3, -4)·2√5/5
  t.equal(trimmed.clipBound, 2 * Math.sqrt(5))
  t.same(trimmed.clipped, [false, false, false, true])
  t.same(trimmed.norms.map((n) => Math.round(n * 1000) / 1000), [1.414, 2.236, 2.236, 50])
  // one of four trimmed from each side: the middle two of each coordinate
  t.same(plain(trimmed.weights), { a: [1, 1] })
  const med = aggregate(base, updates, rule({ aggregation: 'median' }))
  t.same(plain(med.weights), { a: [1, 1] })
  t.same(med.clipped, [false, false, false, false], 'no clip factor: no clipping')
})

t.test('async: a robust job clips the update by the recent norms and mixes at most half of it in', async (t) => {
  const global = w({ a: [0, 0] })
  const liar = w({ a: [300, 400] }) // change norm 500
  const robust = mixRobust(global, liar, { samples: 640, staleness: 0, alpha: 0.9, maxStaleness: 20, rule: rule({ aggregation: 'trimmed_mean', clip_factor: 2 }), recentNorms: [1, 1, 2] })
  // bound 2 × median(1, 1, 2, 500) = 3: the change becomes (1.8, 2.4), mixed in at 0.5
  t.equal(robust.clipBound, 3)
  t.ok(robust.clipped)
  t.equal(robust.mix, 0.5)
  t.same(plain(robust.weights).a!.map((v) => Math.round(v * 1e5) / 1e5), [0.9, 1.2])
  const fedavg = mixRobust(global, liar, { samples: 640, staleness: 0, alpha: 0.9, maxStaleness: 20, rule: rule({}), recentNorms: [1, 1, 2] })
  t.equal(fedavg.mix, 0.9, 'fedavg keeps its alpha')
  t.notOk(fedavg.clipped)
})
