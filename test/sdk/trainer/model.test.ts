import onnxProto from 'onnx-proto'
import * as ort from 'onnxruntime-node'
import t from 'tap'
import {
  checkTrainable, defaultLoss, exportOnnx, loadTrainable, TrainerError, UnsupportedOperatorError,
} from '../../../src/sdk/trainer/index.js'
import { denseOnnxModel, mlpOnnxModel } from '../../helpers/onnx.js'

const { onnx } = onnxProto

/** `bytes` with the graph changed by `edit`. */
function edited(bytes: Uint8Array, edit: (graph: onnxProto.onnx.IGraphProto) => void): Uint8Array {
  const model = onnx.ModelProto.decode(bytes)
  edit(model.graph!)
  return onnx.ModelProto.encode(model).finish()
}

/** The same model with every initializer as little-endian raw bytes instead of floatData. */
function withRawData(bytes: Uint8Array): Uint8Array {
  return edited(bytes, (graph) => {
    for (const tensor of graph.initializer!) {
      tensor.rawData = new Uint8Array(Float32Array.from(tensor.floatData!).buffer)
      tensor.floatData = []
    }
  })
}

async function ortOutput(bytes: Uint8Array, x: Float32Array, dims: number[]): Promise<Float32Array> {
  const session = await ort.InferenceSession.create(bytes)
  const result = await session.run({ input: new ort.Tensor('float32', x, dims) })
  await session.release()
  return result.output!.data as Float32Array
}

const close = (a: Float32Array, b: Float32Array, tolerance = 1e-5) => a.length === b.length && a.every((v, i) => Math.abs(v - b[i]!) <= tolerance)

function thrown(run: () => unknown): unknown {
  try {
    run()
  } catch (error) {
    return error
  }
  return undefined
}

const sample = (size: number) => Float32Array.from({ length: size }, (_, i) => Math.sin(i * 0.37))

t.test('a Conv node is refused, named, by checkTrainable and by loadTrainable', async (t) => {
  const conv = edited(denseOnnxModel({ imageShape: [1, 4, 4], outputs: 3 }), (graph) => {
    graph.node!.unshift(onnx.NodeProto.create({ opType: 'Conv', input: ['input', 'K'], output: ['conv'], name: 'conv' }))
    graph.node![1]!.input = ['conv']
    graph.initializer!.push(onnx.TensorProto.create({ name: 'K', dims: [1, 1, 1, 1], dataType: 1, floatData: [1] }))
  })
  const check = checkTrainable(conv)
  t.match(check, { ok: false, operator: 'Conv', message: /^operator Conv is not supported by the trainer \(supported: Gemm, MatMul, Add, Relu, Sigmoid, Tanh, Softmax, Flatten\)$/ })
  const error = thrown(() => loadTrainable(conv))
  t.ok(error instanceof UnsupportedOperatorError, 'an UnsupportedOperatorError')
  t.match(error, { operator: 'Conv', message: check.ok ? '' : check.message })
})

t.test('an operator of another domain is refused with its domain', async (t) => {
  const fused = edited(denseOnnxModel(), (graph) => Object.assign(graph.node![0]!, { opType: 'FusedGemm', domain: 'com.microsoft' }))
  t.match(checkTrainable(fused), { ok: false, operator: 'com.microsoft.FusedGemm' })
})

t.test('models the trainer cannot take are refused with why, without throwing from checkTrainable', async (t) => {
  const cases: Array<[string, Uint8Array, RegExp]> = [
    ['bytes that are not ONNX', Uint8Array.of(0xff, 0xff, 0xff, 0x01), /^not an ONNX model/],
    ['an int64 initializer', edited(denseOnnxModel(), (g) => g.initializer!.push(onnx.TensorProto.create({ name: 'shape', dims: [1], dataType: 7, int64Data: [2] }))), /initializer shape has ONNX data type 7; the trainer takes float32 only/],
    ['weights that do not fit the input', edited(denseOnnxModel({ inputs: 4 }), (g) => (g.input![0]!.type!.tensorType!.shape!.dim![1] = { dimValue: 5 })), /^node gemm: Gemm cannot multiply \[2, 5\] by \[4, 2\]/],
    ['a sample size that is not known', edited(denseOnnxModel(), (g) => (g.input![0]!.type!.tensorType!.shape!.dim![1] = { dimParam: 'F' })), /graph input input must have a shape \[batch, \.\.\.\] with known sample dims, got \[\?, \?\]/],
    ['a node reading an undefined tensor', edited(denseOnnxModel(), (g) => (g.node![1]!.input = ['nowhere'])), /node softmax reads nowhere, which no earlier node or initializer defines/],
    ['two outputs', edited(denseOnnxModel(), (g) => g.output!.push(g.output![0]!)), /one input and one output, this one has 1 and 2/],
    ['initializer data of the wrong size', edited(denseOnnxModel(), (g) => g.initializer![1]!.floatData!.push(1)), /initializer B has 3 values for dims \[2\]/],
  ]
  for (const [name, bytes, message] of cases) {
    const check = checkTrainable(bytes)
    t.match(check, { ok: false, message }, name)
    t.notOk('operator' in check, `${name}: no operator named`)
    t.throws(() => loadTrainable(bytes), { constructor: TrainerError, message }, name)
  }
})

t.test('the existing dense models load, and run as onnxruntime does', async (t) => {
  const cases = [
    { bytes: denseOnnxModel({ inputs: 10, outputs: 3 }), dims: [4, 10], softmax: true, loss: 'cross_entropy' },
    { bytes: denseOnnxModel({ imageShape: [1, 4, 4], outputs: 5 }), dims: [4, 1, 4, 4], softmax: true, loss: 'cross_entropy' },
    { bytes: denseOnnxModel({ inputs: 6, outputs: 1, softmax: false }), dims: [4, 6], softmax: false, loss: 'mse' },
  ]
  for (const c of cases) {
    t.same(checkTrainable(c.bytes), { ok: true })
    const model = loadTrainable(c.bytes)
    const size = c.dims.slice(1).reduce((a, b) => a * b, 1)
    t.equal(model.inputSize, size)
    t.equal(model.endsInSoftmax, c.softmax)
    t.equal(defaultLoss(model), c.loss)
    const x = sample(4 * size)
    t.ok(close(model.forward(x), await ortOutput(c.bytes, x, c.dims)), `forward of [${c.dims}] equals onnxruntime's`)
  }
})

t.test('initializers in rawData load as floatData ones do, and export back as raw bytes onnxruntime runs', async (t) => {
  const floats = mlpOnnxModel({ inputs: 5, hidden: 8, outputs: 3, seed: 4 })
  const raw = withRawData(floats)
  const x = sample(5 * 6)
  const model = loadTrainable(raw)
  t.same(model.getWeights(), loadTrainable(floats).getWeights(), 'the same weights')
  const changed = Object.fromEntries(Object.entries(model.getWeights()).map(([name, w]) => [name, w.map((v, i) => v * 0.5 + (i % 3) * 0.01)]))
  model.setWeights(changed)
  const exported = exportOnnx(model)
  const tensor = onnx.ModelProto.decode(exported).graph!.initializer![0]!
  t.ok(tensor.rawData!.length > 0 && tensor.floatData!.length === 0, 'written as raw bytes')
  t.ok(close(await ortOutput(exported, x, [6, 5]), model.forward(x)), 'onnxruntime runs the exported weights as the trainer does')
})

t.test('exportOnnx of floatData initializers writes floatData and leaves no raw bytes', async (t) => {
  const bytes = mlpOnnxModel({ inputs: 3, hidden: 4, outputs: 2, seed: 9 })
  const weights = Object.fromEntries(Object.entries(loadTrainable(bytes).getWeights()).map(([name, w]) => [name, w.map((v) => -v)]))
  const exported = onnx.ModelProto.decode(exportOnnx(bytes, weights))
  for (const tensor of exported.graph!.initializer!) {
    t.notOk(Object.hasOwn(tensor, 'rawData'), `${tensor.name}: no raw bytes`)
    t.same(Float32Array.from(tensor.floatData!), weights[tensor.name!], `${tensor.name}: the new values`)
  }
  t.same(exported.graph!.node, onnx.ModelProto.decode(bytes).graph!.node, 'the nodes as they were')
})

t.test('getWeights copies; setWeights replaces every weight, refusing a wrong name, size or value', async (t) => {
  const model = loadTrainable(mlpOnnxModel({ inputs: 4, hidden: 5, outputs: 3 }))
  const x = sample(8)
  const before = Float32Array.from(model.forward(x))
  const weights = model.getWeights()
  t.same(Object.keys(weights), ['W1', 'B1', 'W2', 'B2'])
  weights.W1!.fill(0)
  t.same(model.forward(x), before, 'changing a copy changes nothing')
  const version = model.weightsVersion
  model.setWeights(weights)
  t.equal(model.weightsVersion, version + 1, 'the weights version moves')
  t.notSame(model.forward(x), before, 'the new weights are used')
  const refused: Array<[Record<string, Float32Array>, RegExp]> = [
    [{ ...weights, extra: new Float32Array(1) }, /weight extra is not an initializer of the model/],
    [{ W1: weights.W1!, B1: weights.B1!, W2: weights.W2! }, /weight B2 is missing/],
    [{ ...weights, B2: new Float32Array(4) }, /weight B2 has 4 values, the model takes 3/],
    [{ ...weights, B1: Float32Array.of(0, 0, Number.NaN, 0, 0) }, /weight B1 has a non-finite value at 2/],
  ]
  for (const [bad, message] of refused) {
    t.throws(() => model.setWeights(bad), { constructor: TrainerError, message })
    t.throws(() => exportOnnx(model, bad), { constructor: TrainerError, message })
  }
  t.equal(model.weightsVersion, version + 1, 'a refused setWeights changes nothing')
})
