import onnxProto from 'onnx-proto'
import * as ort from 'onnxruntime-node'
import t, { type Test } from 'tap'
import { type Labels, loadTrainable, type LossKind } from '../../../src/sdk/trainer/index.js'

const { onnx } = onnxProto
const FLOAT = 1

interface Node {
  op: string
  inputs: string[]
  output: string
  attributes?: Record<string, number>
}

interface Spec {
  /** Sample dims after the batch. */
  input: number[]
  nodes: Node[]
  /** Initializer dims by name; values drawn from the seed. */
  weights: Record<string, number[]>
  outputs: number
  opset?: number
  seed?: number
}

/** An ONNX model of `spec`'s nodes from `input` to the last node's output, with random weights in [-1, 1). */
function graph(spec: Spec): Uint8Array {
  let seed = spec.seed ?? 7
  const random = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 31) - 1
  const value = (name: string, dims: (number | string)[]) =>
    onnx.ValueInfoProto.create({
      name,
      type: { tensorType: { elemType: FLOAT, shape: { dim: dims.map((d) => (typeof d === 'number' ? { dimValue: d } : { dimParam: d })) } } },
    })
  const model = onnx.ModelProto.create({
    irVersion: 8,
    opsetImport: [{ domain: '', version: spec.opset ?? 17 }],
    graph: {
      name: 'test',
      node: spec.nodes.map((n, i) => ({
        opType: n.op,
        input: n.inputs,
        output: [n.output],
        name: `n${i}`,
        attribute: Object.entries(n.attributes ?? {}).map(([name, v]) => (name === 'alpha' || name === 'beta' ? { name, type: 1, f: v } : { name, type: 2, i: v })),
      })),
      initializer: Object.entries(spec.weights).map(([name, dims]) =>
        onnx.TensorProto.create({ name, dims, dataType: FLOAT, floatData: Array.from({ length: dims.reduce((a, b) => a * b, 1) }, random) }),
      ),
      input: [value('input', ['N', ...spec.input])],
      output: [value(spec.nodes.at(-1)!.output, ['N', spec.outputs])],
    },
  })
  return onnx.ModelProto.encode(model).finish()
}

const BATCH = 5

function batch(inputs: number, seed = 3): Float32Array {
  let s = seed
  return Float32Array.from({ length: BATCH * inputs }, () => Math.sin((s += 1.7) * 12.9898) * 1.5)
}

const classes = (outputs: number) => Int32Array.from({ length: BATCH }, (_, i) => (i * 3 + 1) % outputs)
const targets = (outputs: number) => Float32Array.from({ length: BATCH * outputs }, (_, i) => Math.cos(i) * 0.8)

/**
 * Every weight's analytic gradient against the central finite difference of the loss (the step actually
 * taken, after float32 rounding). Elementwise and relative: |fd - grad| <= 1e-2 * max(|fd|, |grad|) + NOISE,
 * where NOISE is the finite difference's own rounding floor (a float32 loss of about 1 is known to ~1e-7, over a
 * step of 2e-3). An absolute 1e-3 let a gradient below 1e-3 be anything, its sign included.
 */
const NOISE = 1e-4
function checkGradients(t: Test, bytes: Uint8Array, x: Float32Array, labels: Labels, loss: LossKind) {
  const model = loadTrainable(bytes)
  model.run(x, labels, loss, true)
  const analytic = model.parameters.map((p) => Float64Array.from(p.gradient))
  const eps = 1e-3
  let checked = 0
  let largest = 0
  const failures: string[] = []
  model.parameters.forEach((p, k) => {
    for (let i = 0; i < p.values.length; i++) {
      const v = p.values[i]!
      const [up, down] = [Math.fround(v + eps), Math.fround(v - eps)]
      p.values[i] = up
      const lossUp = model.run(x, labels, loss, false).loss
      p.values[i] = down
      const lossDown = model.run(x, labels, loss, false).loss
      p.values[i] = v
      const fd = (lossUp - lossDown) / (up - down)
      const grad = analytic[k]![i]!
      largest = Math.max(largest, Math.abs(grad))
      checked++
      if (Math.abs(fd - grad) > 1e-2 * Math.max(Math.abs(fd), Math.abs(grad)) + NOISE) failures.push(`${p.name}[${i}]: analytic ${grad}, numeric ${fd}`)
    }
  })
  t.same(failures, [], `${checked} gradients match finite differences`)
  t.ok(largest > 1e-2, `the gradients are not trivially small (largest ${largest.toExponential(2)})`)
}

/** The trainer's forward against onnxruntime's on the same batch. */
async function checkForward(t: Test, bytes: Uint8Array, x: Float32Array, inputDims: number[]) {
  const session = await ort.InferenceSession.create(bytes)
  const result = await session.run({ input: new ort.Tensor('float32', x, [BATCH, ...inputDims]) })
  const expected = result[session.outputNames[0]!]!.data as Float32Array
  await session.release()
  const actual = loadTrainable(bytes).forward(x)
  const worst = expected.reduce((max, e, i) => Math.max(max, Math.abs(e - actual[i]!)), 0)
  t.equal(actual.length, expected.length, 'as many outputs as onnxruntime')
  t.ok(worst < 1e-5, `forward equals onnxruntime's (largest difference ${worst.toExponential(2)})`)
}

interface Case extends Spec {
  name: string
  losses: LossKind[]
}

const cases: Case[] = [
  {
    name: 'Gemm (A·B + C) -> Relu -> Gemm -> Softmax, C a 1-D bias',
    input: [4],
    nodes: [
      { op: 'Gemm', inputs: ['input', 'W1', 'B1'], output: 'h' },
      { op: 'Relu', inputs: ['h'], output: 'a' },
      { op: 'Gemm', inputs: ['a', 'W2', 'B2'], output: 'logits' },
      { op: 'Softmax', inputs: ['logits'], output: 'output', attributes: { axis: 1 } },
    ],
    weights: { W1: [4, 6], B1: [6], W2: [6, 3], B2: [3] },
    outputs: 3,
    losses: ['cross_entropy', 'mse'],
  },
  {
    name: 'Gemm transB with alpha and beta, C a [1, n] row -> Sigmoid',
    input: [4],
    nodes: [
      { op: 'Gemm', inputs: ['input', 'W', 'C'], output: 'z', attributes: { transB: 1, alpha: 0.7, beta: 1.3 } },
      { op: 'Sigmoid', inputs: ['z'], output: 'output' },
    ],
    weights: { W: [3, 4], C: [1, 3] },
    outputs: 3,
    losses: ['mse', 'cross_entropy'],
  },
  ...[0, 1].map((transB): Case => ({
    name: `Gemm transB on the input (C a [h, 1] column) -> Tanh -> Gemm transA${transB ? ' transB' : ''} (C a scalar)`,
    input: [4],
    nodes: [
      { op: 'Gemm', inputs: ['W1', 'input', 'C1'], output: 'hT', attributes: { transB: 1, beta: 0.5 } },
      { op: 'Tanh', inputs: ['hT'], output: 'aT' },
      { op: 'Gemm', inputs: ['aT', 'W2', 'C2'], output: 'output', attributes: { transA: 1, transB, alpha: 1.5, beta: 2 } },
    ],
    weights: { W1: [6, 4], C1: [6, 1], W2: transB ? [3, 6] : [6, 3], C2: [] },
    outputs: 3,
    losses: ['mse', 'cross_entropy'],
  })),
  {
    name: 'Gemm transA and transB on a weight and the input',
    input: [4],
    nodes: [
      { op: 'Gemm', inputs: ['W1', 'input'], output: 'hT', attributes: { transA: 1, transB: 1 } },
      { op: 'Sigmoid', inputs: ['hT'], output: 'aT' },
      { op: 'Gemm', inputs: ['aT', 'W2', 'B2'], output: 'output', attributes: { transA: 1 } },
    ],
    weights: { W1: [4, 5], W2: [5, 2], B2: [2] },
    outputs: 2,
    losses: ['mse'],
  },
  {
    name: 'MatMul + Add (bias first, 1-D) -> Relu -> MatMul + Add ([1, n] bias), logits out',
    input: [5],
    nodes: [
      { op: 'MatMul', inputs: ['input', 'W1'], output: 'm1' },
      { op: 'Add', inputs: ['B1', 'm1'], output: 'h' },
      { op: 'Relu', inputs: ['h'], output: 'a' },
      { op: 'MatMul', inputs: ['a', 'W2'], output: 'm2' },
      { op: 'Add', inputs: ['m2', 'B2'], output: 'output' },
    ],
    weights: { W1: [5, 7], B1: [7], W2: [7, 4], B2: [1, 4] },
    outputs: 4,
    losses: ['cross_entropy', 'mse'],
  },
  {
    name: 'Add of two same-shape tensors (a skip connection) and a Softmax inside the graph',
    input: [3],
    nodes: [
      { op: 'Gemm', inputs: ['input', 'W1', 'B1'], output: 'h' },
      { op: 'Tanh', inputs: ['h'], output: 'a' },
      { op: 'Add', inputs: ['h', 'a'], output: 'skip' },
      { op: 'Softmax', inputs: ['skip'], output: 'p', attributes: { axis: -1 } },
      { op: 'Gemm', inputs: ['p', 'W2', 'B2'], output: 'output' },
    ],
    weights: { W1: [3, 4], B1: [4], W2: [4, 3], B2: [3] },
    outputs: 3,
    losses: ['mse', 'cross_entropy'],
  },
  {
    name: 'Flatten of a [N, 2, 3] input and of an activation, Softmax by the opset 11 default axis',
    input: [2, 3],
    nodes: [
      { op: 'Flatten', inputs: ['input'], output: 'flat', attributes: { axis: 1 } },
      { op: 'Gemm', inputs: ['flat', 'W1', 'B1'], output: 'h' },
      { op: 'Relu', inputs: ['h'], output: 'a' },
      { op: 'Flatten', inputs: ['a'], output: 'a2' },
      { op: 'Gemm', inputs: ['a2', 'W2', 'B2'], output: 'logits' },
      { op: 'Softmax', inputs: ['logits'], output: 'output' },
    ],
    weights: { W1: [6, 5], B1: [5], W2: [5, 3], B2: [3] },
    outputs: 3,
    opset: 11,
    losses: ['cross_entropy', 'mse'],
  },
]

for (const c of cases) {
  t.test(c.name, async (t) => {
    const bytes = graph(c)
    const inputs = c.input.reduce((a, b) => a * b, 1)
    const x = batch(inputs)
    await checkForward(t, bytes, x, c.input)
    for (const loss of c.losses) {
      await t.test(loss, async (t) => checkGradients(t, bytes, x, loss === 'mse' ? targets(c.outputs) : classes(c.outputs), loss))
    }
  })
}

t.test('the reported losses: the mean over the batch of -log p[label], and of the squared errors', async (t) => {
  const bytes = graph(cases[0]!)
  const model = loadTrainable(bytes)
  const x = batch(4)
  const labels = classes(3)
  const p = Float64Array.from(model.forward(x))
  const crossEntropy = -Array.from(labels).reduce((sum, label, i) => sum + Math.log(p[i * 3 + label]!), 0) / BATCH
  t.ok(Math.abs(model.run(x, labels, 'cross_entropy', false).loss - crossEntropy) < 1e-5, 'cross-entropy (fused with the Softmax) is the mean -log p')
  const y = targets(3)
  const mse = p.reduce((sum, v, i) => sum + (v - y[i]!) ** 2, 0) / p.length
  t.ok(Math.abs(model.run(x, y, 'mse', true).loss - mse) < 1e-6, 'mse is the mean over every output')
})

t.test('cross-entropy stays finite and its gradient bounded for huge logits', async (t) => {
  const model = loadTrainable(graph({ ...cases[0]!, seed: 11 }))
  for (const p of model.parameters) p.values.forEach((v, i) => (p.values[i] = v * 400))
  const { loss } = model.run(batch(4), classes(3), 'cross_entropy', true)
  t.ok(Number.isFinite(loss) && loss > 0, `loss ${loss} is finite`)
  t.ok(model.parameters.every((p) => p.gradient.every(Number.isFinite)), 'every gradient is finite')
})

t.test('labels that do not fit the outputs are refused', async (t) => {
  const model = loadTrainable(graph(cases[0]!))
  t.throws(() => model.run(batch(4), Int32Array.of(0, 1, 3, 0, 1), 'cross_entropy', true), /label 3 of sample 2 is not a class index in \[0, 3\)/)
  t.throws(() => model.run(batch(4), Int32Array.of(0, 1), 'cross_entropy', true), /2 labels for 5 samples/)
  t.throws(() => model.run(batch(4), new Float32Array(14), 'mse', true), /14 targets for 15 outputs/)
  t.throws(() => model.forward(new Float32Array(7)), /7 floats, not a whole batch of samples of 4/)
})
