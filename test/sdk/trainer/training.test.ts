import * as ort from 'onnxruntime-node'
import t from 'tap'
import {
  createOptimizer, evaluate, exportOnnx, loadTrainable, type OptimizerKind, syntheticTask, syntheticTaskFor, trainStep,
} from '../../../src/sdk/trainer/index.js'
import { mlpOnnxModel } from '../../helpers/onnx.js'

const BATCH = 32

/** `steps` steps on consecutive batches of one stream; returns the mean loss of the last 10. */
function train(model: ReturnType<typeof loadTrainable>, optimizer: OptimizerKind, rate: number, task: ReturnType<typeof syntheticTask>, stream: number, steps: number) {
  const data = task.sample(BATCH * steps, stream)
  const opt = createOptimizer(optimizer, rate)
  const { inputSize } = model
  const perLabel = data.labels.length / data.count
  let recent = 0
  for (let s = 0; s < steps; s++) {
    const loss = trainStep(model, opt, data.x.subarray(s * BATCH * inputSize, (s + 1) * BATCH * inputSize), data.labels.subarray(s * BATCH * perLabel, (s + 1) * BATCH * perLabel))
    if (s >= steps - 10) recent += loss / 10
  }
  return recent
}

t.test('a 2-layer MLP learns the 4-class synthetic task, and onnxruntime runs the exported model as the trainer does', async (t) => {
  for (const [optimizer, rate, useMatMul] of [['adam', 0.01, false], ['sgd', 0.1, true]] as const) {
    const model = loadTrainable(mlpOnnxModel({ inputs: 16, hidden: 32, outputs: 4, seed: 3, useMatMul }))
    const task = syntheticTaskFor(model, 2024)
    const validation = task.validationSet(1000)
    const before = evaluate(model, validation.x, validation.labels)
    train(model, optimizer, rate, task, 1, 150)
    const after = evaluate(model, validation.x, validation.labels)
    t.ok(before.accuracy < 0.6, `${optimizer}: untrained, accuracy ${before.accuracy}`)
    t.ok(after.accuracy >= 0.9, `${optimizer}: after 150 steps, validation accuracy ${after.accuracy} (loss ${before.loss.toFixed(3)} -> ${after.loss.toFixed(3)})`)

    const session = await ort.InferenceSession.create(exportOnnx(model))
    const x = validation.x.subarray(0, 200 * 16)
    const expected = (await session.run({ input: new ort.Tensor('float32', x, [200, 16]) })).output!.data as Float32Array
    await session.release()
    const actual = model.forward(x)
    const worst = expected.reduce((max, e, i) => Math.max(max, Math.abs(e - actual[i]!)), 0)
    t.ok(worst < 1e-5, `${optimizer}: onnxruntime's outputs equal the trainer's (largest difference ${worst.toExponential(2)})`)
    t.same(predictions(expected, 4), predictions(actual, 4), `${optimizer}: and so do its predictions`)
  }
})

t.test('federated averaging: devices train on their own streams, the averaged model gets past 90%', async (t) => {
  const bytes = mlpOnnxModel({ inputs: 10, hidden: 16, outputs: 5, seed: 8, activation: 'Sigmoid' })
  const global = loadTrainable(bytes)
  const devices = [0, 1, 2].map(() => loadTrainable(bytes))
  const task = syntheticTaskFor(global, 77)
  const validation = task.validationSet(1000)
  const accuracies: number[] = []
  for (let round = 0; round < 4; round++) {
    const weights = global.getWeights()
    const trained = devices.map((device, d) => {
      device.setWeights(weights)
      train(device, 'adam', 0.01, task, round * 10 + d, 20)
      return device.getWeights()
    })
    global.setWeights(Object.fromEntries(Object.keys(weights).map((name) => [name, average(trained.map((w) => w[name]!))])))
    accuracies.push(evaluate(global, validation.x, validation.labels).accuracy)
  }
  t.ok(accuracies[0]! < accuracies.at(-1)!, `accuracy rises over the rounds: ${accuracies}`)
  t.ok(accuracies.at(-1)! >= 0.9, `after 4 rounds of 3 devices × 20 steps: ${accuracies.at(-1)}`)
})

t.test('regression: an MLP without Softmax learns the linear synthetic task with MSE', async (t) => {
  const model = loadTrainable(mlpOnnxModel({ inputs: 6, hidden: 24, outputs: 1, softmax: false, activation: 'Tanh', seed: 2 }))
  const task = syntheticTaskFor(model, 5)
  t.equal(task.kind, 'regression')
  const validation = task.validationSet(500)
  const before = evaluate(model, validation.x, validation.labels)
  train(model, 'adam', 0.01, task, 1, 300)
  const after = evaluate(model, validation.x, validation.labels)
  t.ok(after.loss < before.loss / 10, `mse ${before.loss.toFixed(3)} -> ${after.loss.toFixed(4)}`)
  t.ok(after.accuracy >= 0.9 && after.accuracy > before.accuracy, `share within 0.5 of the target ${before.accuracy} -> ${after.accuracy}`)
})

t.test('a 16-32-4 MLP trains batches of 32 at thousands of steps a second', async (t) => {
  const model = loadTrainable(mlpOnnxModel({ inputs: 16, hidden: 32, outputs: 4 }))
  const data = syntheticTaskFor(model, 1).sample(BATCH * 50, 1)
  const batches = Array.from({ length: 50 }, (_, s) => [data.x.subarray(s * BATCH * 16, (s + 1) * BATCH * 16), data.labels.subarray(s * BATCH, (s + 1) * BATCH)] as const)
  const optimizer = createOptimizer('adam', 0.001)
  const run = (steps: number) => {
    const start = performance.now()
    for (let s = 0; s < steps; s++) trainStep(model, optimizer, batches[s % 50]![0], batches[s % 50]![1], 'cross_entropy')
    return (steps / (performance.now() - start)) * 1000
  }
  run(500) // warm up the JIT
  const rate = Math.max(run(1000), run(1000))
  // A loose bound: this runs next to other tests on a shared machine (about 3,000 a second on one slow core).
  t.ok(rate > 1000, `${Math.round(rate)} steps a second`)
})

/** The class of each row: the index of its largest output. */
function predictions(outputs: Float32Array, classes: number): number[] {
  return Array.from({ length: outputs.length / classes }, (_, i) => {
    const row = outputs.subarray(i * classes, (i + 1) * classes)
    return row.indexOf(Math.max(...row))
  })
}

function average(weights: Float32Array[]): Float32Array {
  const sum = new Float32Array(weights[0]!.length)
  for (const w of weights) w.forEach((v, i) => (sum[i]! += v / weights.length))
  return sum
}
