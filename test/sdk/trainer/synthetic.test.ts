import t from 'tap'
import { loadTrainable, syntheticTask, syntheticTaskFor, TrainerError } from '../../../src/sdk/trainer/index.js'
import { denseOnnxModel, mlpOnnxModel } from '../../helpers/onnx.js'

t.test('the same seeds give the same samples; another stream or task seed, others', async (t) => {
  const task = syntheticTask({ inputs: 8, outputs: 3, seed: 42 })
  const again = syntheticTask({ inputs: 8, outputs: 3, seed: 42 })
  t.same(again.sample(50, 7), task.sample(50, 7), 'same task and stream seeds')
  t.same(again.validationSet(40), task.validationSet(40), 'same validation set')
  t.notSame(task.sample(50, 8).x, task.sample(50, 7).x, 'another stream')
  t.notSame(syntheticTask({ inputs: 8, outputs: 3, seed: 43 }).sample(50, 7).x, task.sample(50, 7).x, 'another task')
  t.notSame(task.validationSet(50).x, task.sample(50, 0).x, 'the validation set is not stream 0')
  t.same(task.sample(100, 7).x.subarray(0, 8 * 50), task.sample(50, 7).x, 'a longer draw starts with the shorter one')
})

t.test('classification: one class index per sample, every class drawn about as often', async (t) => {
  const task = syntheticTask({ inputs: 5, outputs: 4, seed: 1 })
  t.equal(task.kind, 'classification')
  const { count, x, labels } = task.sample(4000, 3)
  t.equal(count, 4000)
  t.equal(x.length, 4000 * 5)
  t.ok(labels instanceof Int32Array, 'Int32Array labels')
  const counts = [0, 0, 0, 0]
  for (const label of labels) counts[label]!++
  t.ok(counts.every((c) => c > 900 && c < 1100), `balanced classes: ${counts}`)
})

t.test('classification: each class sits around its own center, the centers at least `separation` apart', async (t) => {
  for (const [inputs, outputs, separation] of [[2, 5, 4], [16, 4, 4], [3, 3, 8]] as const) {
    const task = syntheticTask({ inputs, outputs, seed: 9, separation })
    const { x, labels } = task.sample(6000, 1)
    // The mean of a class's samples estimates its center (noise is N(0, 1) per input: within ~0.1 here).
    const means = Array.from({ length: outputs }, () => new Float64Array(inputs))
    const counts = new Array<number>(outputs).fill(0)
    labels.forEach((label, i) => {
      counts[label]!++
      for (let j = 0; j < inputs; j++) means[label]![j]! += x[i * inputs + j]!
    })
    means.forEach((m, c) => m.forEach((v, j) => (m[j] = v / counts[c]!)))
    let spread = 0
    labels.forEach((label, i) => {
      for (let j = 0; j < inputs; j++) spread += (x[i * inputs + j]! - means[label]![j]!) ** 2
    })
    t.ok(Math.abs(spread / (6000 * inputs) - 1) < 0.05, `[${inputs}, ${outputs}]: unit noise around the centers (variance ${(spread / (6000 * inputs)).toFixed(3)})`)
    let closest = Infinity
    for (let a = 0; a < outputs; a++) for (let b = a + 1; b < outputs; b++) closest = Math.min(closest, Math.hypot(...means[a]!.map((v, j) => v - means[b]![j]!)))
    t.ok(closest > separation - 0.3, `[${inputs}, ${outputs}]: the closest centers are ${closest.toFixed(2)} apart (separation ${separation})`)
  }
})

t.test('regression: targets are one fixed linear map of the inputs, [count, outputs]', async (t) => {
  const task = syntheticTask({ inputs: 3, outputs: 2, seed: 5, kind: 'regression' })
  t.equal(syntheticTask({ inputs: 3, outputs: 1, seed: 5 }).kind, 'regression', 'the default for one output')
  const { x, labels } = task.sample(50, 1)
  if (!(labels instanceof Float32Array)) throw new Error('regression targets must be a Float32Array')
  t.equal(labels.length, 100, '2 targets per sample')
  // Recover the map from the first samples by least squares on [x, 1]: it must predict all the others.
  const solve = linearFit(x, labels, 3, 2, 10)
  const worst = Array.from({ length: 50 }, (_, i) =>
    Math.max(...[0, 1].map((k) => Math.abs(solve(x.subarray(i * 3, i * 3 + 3), k) - labels[i * 2 + k]!))),
  ).reduce((a, b) => Math.max(a, b))
  t.ok(worst < 1e-3, `a linear map fitted on 10 samples predicts all 50 (worst error ${worst.toExponential(2)})`)
  const scale = Math.sqrt(labels.reduce((s, v) => s + v * v, 0) / labels.length)
  t.ok(scale > 0.3 && scale < 3, `targets are about unit-sized (rms ${scale.toFixed(2)})`)
})

t.test('syntheticTaskFor fits the model: its sizes, and classification for a Softmax classifier', async (t) => {
  const classifier = syntheticTaskFor(loadTrainable(denseOnnxModel({ imageShape: [1, 3, 3], outputs: 4 })), 1)
  t.match(classifier, { kind: 'classification', inputs: 9, outputs: 4 })
  const regression = syntheticTaskFor(loadTrainable(mlpOnnxModel({ inputs: 4, hidden: 3, outputs: 2, softmax: false })), 1)
  t.match(regression, { kind: 'regression', inputs: 4, outputs: 2 })
})

t.test('sizes and seeds that make no task are refused', async (t) => {
  t.throws(() => syntheticTask({ inputs: 0, outputs: 2, seed: 1 }), TrainerError)
  t.throws(() => syntheticTask({ inputs: 2, outputs: 1, seed: 1, kind: 'classification' }), /2 classes or more/)
  t.throws(() => syntheticTask({ inputs: 2, outputs: 2, seed: 0.5 }).sample(1, 1), /a seed must be a safe integer/)
  const task = syntheticTask({ inputs: 2, outputs: 2, seed: -3 })
  t.same(task.sample(5, -(2 ** 40)), syntheticTask({ inputs: 2, outputs: 2, seed: -3 }).sample(5, -(2 ** 40)), 'negative and large seeds work')
  t.notSame(task.sample(5, 2 ** 40).x, task.sample(5, 0).x, 'the high bits of a seed count')
})

/** Least squares of targets on [x, 1] over the first `rows` samples (normal equations, Gauss-Jordan); a predictor. */
function linearFit(x: Float32Array, y: Float32Array, inputs: number, outputs: number, rows: number) {
  const n = inputs + 1
  const a = Array.from({ length: n }, () => new Float64Array(n + outputs))
  for (let r = 0; r < rows; r++) {
    const row = [...x.subarray(r * inputs, r * inputs + inputs), 1]
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < n; j++) a[i]![j]! += row[i]! * row[j]!
      for (let k = 0; k < outputs; k++) a[i]![n + k]! += row[i]! * y[r * outputs + k]!
    }
  }
  for (let i = 0; i < n; i++) {
    const pivot = a[i]![i]!
    for (let j = 0; j < n + outputs; j++) a[i]![j]! /= pivot
    for (let r = 0; r < n; r++) if (r !== i) {
      const f = a[r]![i]!
      for (let j = 0; j < n + outputs; j++) a[r]![j]! -= f * a[i]![j]!
    }
  }
  return (sample: Float32Array, k: number) => [...sample, 1].reduce((s, v, i) => s + v * a[i]![n + k]!, 0)
}

t.test('clusters per class: a task no linear model learns, and a 2-layer MLP does', async (t) => {
  const { createOptimizer, evaluate, trainStep } = await import('../../../src/sdk/trainer/index.js')
  const task = syntheticTask({ inputs: 8, outputs: 4, seed: 1234, clustersPerClass: 4 })
  t.same(task.sample(20, 3), syntheticTask({ inputs: 8, outputs: 4, seed: 1234, clustersPerClass: 4 }).sample(20, 3), 'deterministic')
  t.throws(() => syntheticTask({ inputs: 8, outputs: 4, seed: 1, clustersPerClass: 0 }), TrainerError)
  const validation = task.validationSet(1000)
  const accuracyAfter = (bytes: Buffer, steps: number) => {
    const model = loadTrainable(bytes)
    const optimizer = createOptimizer('adam', 0.01)
    for (let s = 0; s < steps; s++) {
      const batch = task.sample(32, s)
      trainStep(model, optimizer, batch.x, batch.labels, 'cross_entropy')
    }
    return evaluate(model, validation.x, validation.labels, { loss: 'cross_entropy' }).accuracy
  }
  const linear = accuracyAfter(denseOnnxModel({ inputs: 8, outputs: 4 }), 1500)
  const mlp = accuracyAfter(mlpOnnxModel({ inputs: 8, hidden: 32, outputs: 4, seed: 1 }), 1500)
  t.ok(linear < 0.8, `a linear model stays at ${linear}`)
  t.ok(mlp >= 0.9, `the MLP reaches ${mlp}`)
})
