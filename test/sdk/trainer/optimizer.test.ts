import t from 'tap'
import { createOptimizer, loadTrainable, type TrainableModel, trainStep } from '../../../src/sdk/trainer/index.js'
import { mlpOnnxModel } from '../../helpers/onnx.js'

const BATCH = 16
const x = Float32Array.from({ length: BATCH * 6 }, (_, i) => Math.sin(i * 0.61) * 2)
const labels = Int32Array.from({ length: BATCH }, (_, i) => (i * 7) % 3)
const model = () => loadTrainable(mlpOnnxModel({ inputs: 6, hidden: 10, outputs: 3, activation: 'Tanh', seed: 5 }))
const snapshot = (m: TrainableModel) => m.parameters.map((p) => Float32Array.from(p.values))
const gradients = (m: TrainableModel) => m.parameters.map((p) => Float32Array.from(p.gradient))

for (const [kind, rate] of [['sgd', 0.5], ['adam', 0.05]] as const) {
  t.test(`${kind}: steps on a fixed batch bring its loss down`, async (t) => {
    const m = model()
    const optimizer = createOptimizer(kind, rate)
    const losses = Array.from({ length: 100 }, () => trainStep(m, optimizer, x, labels, 'cross_entropy'))
    t.ok(losses[1]! < losses[0]!, `the first step lowers the loss (${losses[0]} -> ${losses[1]})`)
    t.ok(losses.at(-1)! < losses[0]! / 3, `100 steps take it below a third (${losses[0]} -> ${losses.at(-1)})`)
  })
}

t.test('sgd moves each weight by -lr * gradient', async (t) => {
  const m = model()
  const before = snapshot(m)
  m.run(x, labels, 'cross_entropy', true)
  const grads = gradients(m)
  createOptimizer('sgd', 0.1).step(m)
  const moved = m.parameters.every((p, k) => p.values.every((v, i) => Math.abs(v - (before[k]![i]! - 0.1 * grads[k]![i]!)) < 1e-6))
  t.ok(moved, 'w - 0.1 g for every weight')
})

t.test("adam's first step moves each weight by lr against the sign of its gradient (bias correction)", async (t) => {
  const m = model()
  const before = snapshot(m)
  trainStep(m, createOptimizer('adam', 1e-3), x, labels, 'cross_entropy')
  const grads = gradients(m)
  const off: string[] = []
  let checked = 0
  m.parameters.forEach((p, k) =>
    p.values.forEach((v, i) => {
      const g = grads[k]![i]!
      if (Math.abs(g) < 1e-4) return // there eps weighs in
      checked++
      const step = v - before[k]![i]!
      if (Math.abs(step + 1e-3 * Math.sign(g)) > 1e-3 * 1e-2) off.push(`${p.name}[${i}]: moved ${step} for gradient ${g}`)
    }),
  )
  t.ok(checked > 100, `${checked} weights checked`)
  t.same(off, [], 'each moved by lr, downhill')
})

t.test('adam forgets its moments when the weights are replaced from outside (a new federated round), or on reset', async (t) => {
  const start = model().getWeights()
  const fresh = model()
  trainStep(fresh, createOptimizer('adam', 0.01), x, labels, 'cross_entropy')
  const expected = fresh.getWeights()

  const m = model()
  const optimizer = createOptimizer('adam', 0.01)
  for (let i = 0; i < 5; i++) trainStep(m, optimizer, x, labels, 'cross_entropy')
  m.setWeights(start)
  trainStep(m, optimizer, x, labels, 'cross_entropy')
  t.same(m.getWeights(), expected, 'after setWeights, the step is a first step again')

  for (let i = 0; i < 5; i++) trainStep(m, optimizer, x, labels, 'cross_entropy')
  for (const p of m.parameters) p.values.set(start[p.name]!) // behind the model's back: only reset() tells
  optimizer.reset()
  trainStep(m, optimizer, x, labels, 'cross_entropy')
  t.same(m.getWeights(), expected, 'after reset() too')

  const kept = model()
  const carried = createOptimizer('adam', 0.01)
  for (let i = 0; i < 5; i++) trainStep(kept, carried, x, labels, 'cross_entropy')
  for (const p of kept.parameters) p.values.set(start[p.name]!)
  trainStep(kept, carried, x, labels, 'cross_entropy')
  t.notSame(kept.getWeights(), expected, 'without either, the moments carry over')
})

t.test('a learning rate that is not a positive number is refused', async (t) => {
  for (const rate of [0, -0.1, Number.NaN, Infinity]) t.throws(() => createOptimizer('sgd', rate), /the learning rate must be a positive number/)
})
