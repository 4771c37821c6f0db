import t from 'tap'
import { decodeWeights, encodeWeights, mixAsync, roundReady, weightedAverage, weightsFromBase64, weightsToBase64, WeightsError, type Weights } from '../../src/domain/fedavg.js'

const w = (tensors: Record<string, number[]>): Weights => Object.fromEntries(Object.entries(tensors).map(([name, values]) => [name, Float32Array.from(values)]))
const plain = (weights: Weights) => Object.fromEntries(Object.entries(weights).map(([name, values]) => [name, [...values]]))
const bits = (values: Float32Array) => [...new Uint32Array(values.buffer, values.byteOffset, values.length)]
const refused = (message: RegExp) => ({ constructor: WeightsError, message })

t.test('the average weighs each update by the samples it trained on', async (t) => {
  const average = weightedAverage([
    { weights: w({ b: [4], a: [0, 4] }), samples: 1 },
    { weights: w({ a: [4, 8], b: [0] }), samples: 3 },
  ])
  t.same(plain(average), { a: [3, 7], b: [1] })
  t.ok(average.a instanceof Float32Array)
  t.same(Object.keys(average), ['a', 'b'], 'tensors sorted by name')
  t.same(plain(weightedAverage([{ weights: w({ a: [1.5] }), samples: 0 }, { weights: w({ a: [2.5] }), samples: 7 }])), { a: [2.5] }, 'an update of 0 samples counts for nothing')
})

t.test('updates that do not fit together, or saw no samples, are refused with what is wrong', async (t) => {
  t.throws(() => weightedAverage([]), refused(/^no updates to average$/))
  t.throws(() => weightedAverage([{ weights: w({ a: [1] }), samples: 1 }, { weights: w({ b: [1], c: [2] }), samples: 1 }]), refused(/^update 1 has other tensors than update 0: missing "a"; unexpected "b", "c"$/))
  t.throws(() => weightedAverage([{ weights: w({ a: [1, 2] }), samples: 1 }, { weights: w({ a: [1] }), samples: 1 }]), refused(/^update 1: tensor "a" has 1 values, update 0 2$/))
  t.throws(() => weightedAverage([{ weights: w({ a: [1] }), samples: -2 }]), refused(/^update 0: samples must be a finite number >= 0, got -2$/))
  t.throws(() => weightedAverage([{ weights: w({ a: [1] }), samples: 0 }, { weights: w({ a: [3] }), samples: 0 }]), refused(/saw 0 samples in total/))
})

t.test('an async update moves the global weights by alpha / (1 + staleness) of the way', async (t) => {
  const global = w({ a: [0, 8], b: [1] })
  const update = w({ a: [8, 0], b: [1] })
  const fresh = mixAsync(global, update, { samples: 10, staleness: 0, maxStaleness: 5 })
  t.same(fresh, { weights: w({ a: [4, 4], b: [1] }), applied: true, mix: 0.5 }, 'alpha defaults to 0.5')
  const stale = mixAsync(global, update, { samples: 10, staleness: 3, maxStaleness: 5 })
  t.equal(stale.mix, 0.125)
  t.same(plain(stale.weights), { a: [1, 7], b: [1] })
  t.same(plain(mixAsync(global, update, { samples: 1, staleness: 0, alpha: 1, maxStaleness: 0 }).weights), plain(update), 'alpha 1, fresh: the update replaces the weights')
  t.same(plain(global), { a: [0, 8], b: [1] }, 'the global weights are not changed in place')
})

t.test('an update staler than maxStaleness, or of no samples, is dropped', async (t) => {
  const global = w({ a: [1] })
  const update = w({ a: [2] })
  const dropped = mixAsync(global, update, { samples: 5, staleness: 4, maxStaleness: 3 })
  t.equal(dropped.applied, false)
  t.equal(dropped.mix, 0)
  t.equal(dropped.weights, global)
  t.equal(mixAsync(global, update, { samples: 5, staleness: 3, maxStaleness: 3 }).applied, true, 'at maxStaleness it still counts')
  t.equal(mixAsync(global, update, { samples: 0, staleness: 0, maxStaleness: 3 }).applied, false)
  t.throws(() => mixAsync(global, w({ a: [1, 2] }), { samples: 1, staleness: 0, maxStaleness: 1 }), refused(/^the update: tensor "a" has 2 values, the global weights 1$/))
  t.throws(() => mixAsync(global, update, { samples: 1, staleness: 0, alpha: 0, maxStaleness: 1 }), refused(/^alpha must be in \(0, 1\], got 0$/))
  t.throws(() => mixAsync(global, update, { samples: 1, staleness: -1, maxStaleness: 1 }), refused(/^staleness must be a finite number >= 0/))
})

t.test('a full sync round waits for every device, a semi sync round for a quorum; a deadline closes either with what came', async (t) => {
  const cases: Array<[Parameters<typeof roundReady>[0], Parameters<typeof roundReady>[1], boolean]> = [
    ['full_sync', { expected: 4, received: 3, deadlinePassed: false }, false],
    ['full_sync', { expected: 4, received: 4, deadlinePassed: false }, true],
    ['full_sync', { expected: 4, received: 1, deadlinePassed: true }, true],
    ['full_sync', { expected: 4, received: 0, deadlinePassed: true }, false],
    ['semi_sync', { expected: 5, received: 2, deadlinePassed: false }, false],
    ['semi_sync', { expected: 5, received: 3, deadlinePassed: false }, true],
    ['semi_sync', { expected: 4, received: 2, deadlinePassed: false }, true],
    ['semi_sync', { expected: 4, received: 2, deadlinePassed: false, quorum: 3 }, false],
    ['semi_sync', { expected: 2, received: 2, deadlinePassed: false, quorum: 9 }, true],
    ['semi_sync', { expected: 4, received: 1, deadlinePassed: true }, true],
    ['semi_sync', { expected: 0, received: 0, deadlinePassed: true }, false],
  ]
  for (const [mode, round, ready] of cases) t.equal(roundReady(mode, round), ready, `${mode} ${JSON.stringify(round)}`)
})

t.test('weights survive encoding bit for bit, NaN payloads, -0, infinities and subnormals included', async (t) => {
  const special = new Float32Array(new Uint32Array([0x7fc00001, 0xffa12345, 0x80000000, 0x7f800000, 0xff800000, 0x00000001, 0x7f7fffff, 0x3f800000]).buffer)
  const random = Float32Array.from({ length: 1000 }, (_, i) => Math.sin(i * 12.9898) * 43758.5453)
  const weights: Weights = { 'fc.weight': random, special, empty: new Float32Array(0), 'ünï/cödé': Float32Array.of(1), ['__proto__']: Float32Array.of(2) }
  const decoded = decodeWeights(encodeWeights(weights))
  t.same(Object.keys(decoded).sort(), Object.keys(weights).sort())
  for (const name of Object.keys(weights)) t.same(bits(decoded[name]!), bits(weights[name]!), name)
  t.equal(Object.getPrototypeOf(decoded), Object.prototype, 'a tensor named __proto__ is just a name')

  const viaBase64 = weightsFromBase64(weightsToBase64(weights))
  for (const name of Object.keys(weights)) t.same(bits(viaBase64[name]!), bits(weights[name]!), `${name} via base64`)
  t.same(decodeWeights(encodeWeights({})), {})
})

t.test('equal weights encode to equal bytes, whatever the order of their names and wherever their floats lie', async (t) => {
  const backing = new Float32Array([9, 1, 2, 3, 9])
  const a = encodeWeights({ x: backing.subarray(1, 4), y: Float32Array.of(5) })
  const b = encodeWeights({ y: Float32Array.of(5), x: Float32Array.of(1, 2, 3) })
  t.same(a, b)
  // a decoder must not assume the bytes start at an aligned offset of their buffer
  const shifted = new Uint8Array(a.length + 1)
  shifted.set(a, 1)
  t.same(plain(decodeWeights(shifted.subarray(1))), { x: [1, 2, 3], y: [5] })
})

t.test('the layout is what the protocol documents, for SDKs in other languages', async (t) => {
  const bytes = encodeWeights({ b: Float32Array.of(0.5, -2), a: Float32Array.of(1) })
  t.equal(bytes.toString('latin1', 0, 4), 'DCPW')
  const headerLength = bytes.readUInt32LE(4)
  t.same(JSON.parse(bytes.toString('utf8', 8, 8 + headerLength)), { version: 1, tensors: [{ name: 'a', length: 1 }, { name: 'b', length: 2 }] })
  const dataStart = Math.ceil((8 + headerLength) / 4) * 4
  t.equal(bytes.length, dataStart + 12)
  t.same([bytes.readFloatLE(dataStart), bytes.readFloatLE(dataStart + 4), bytes.readFloatLE(dataStart + 8)], [1, 0.5, -2])
})

t.test('bytes that are not weights are refused, saying why', async (t) => {
  const good = encodeWeights({ a: Float32Array.of(1, 2) })
  const withHeader = (header: string, data = Buffer.alloc(0)) => {
    const h = Buffer.from(header)
    const out = Buffer.alloc(Math.ceil((8 + h.length) / 4) * 4 + data.length)
    out.write('DCPW', 0, 'latin1')
    out.writeUInt32LE(h.length, 4)
    h.copy(out, 8)
    data.copy(out, out.length - data.length)
    return out
  }
  t.throws(() => decodeWeights(Buffer.from('{"a":[1,2]}')), refused(/^not dcp weights/))
  t.throws(() => decodeWeights(good.subarray(0, good.length - 1)), refused(/^the header describes \d+ bytes, there are \d+$/))
  t.throws(() => decodeWeights(Buffer.concat([good, Buffer.alloc(4)])), refused(/^the header describes/))
  t.throws(() => decodeWeights(withHeader('{"version":1,')), refused(/^bad header: /))
  t.throws(() => decodeWeights(withHeader('{"version":2,"tensors":[]}')), refused(/^bad header: /))
  t.throws(() => decodeWeights(withHeader('{"version":1,"tensors":[{"name":"a","length":1},{"name":"a","length":1}]}', Buffer.alloc(8))), refused(/^tensor "a" appears twice$/))
  const overlong = Buffer.from(good)
  overlong.writeUInt32LE(1 << 30, 4)
  t.throws(() => decodeWeights(overlong), refused(/^header of \d+ bytes runs past the end/))
  t.throws(() => weightsFromBase64('not weights'), refused(/^not dcp weights/))
})
