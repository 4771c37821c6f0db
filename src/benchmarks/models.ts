import onnxProto from 'onnx-proto'

const { onnx } = onnxProto
const FLOAT = 1

/**
 * A 2-layer perceptron, built in memory: `input [N, inputs] -> Gemm(W1, B1) -> activation -> Gemm(W2, B2)
 * -> Softmax -> output [N, outputs]`, with deterministic Xavier-scaled weights and small biases. `useMatMul`
 * writes each Gemm as MatMul + Add; `softmax: false` leaves the raw outputs (a regression). Default activation: Relu.
 */
export function mlpOnnxModel(options: {
  inputs: number
  hidden: number
  outputs: number
  seed?: number
  activation?: 'Relu' | 'Sigmoid' | 'Tanh'
  softmax?: boolean
  useMatMul?: boolean
}): Buffer {
  const { inputs, hidden, outputs } = options
  let seed = (options.seed ?? 1) >>> 0 || 1
  // xorshift32, uniform in [-1, 1)
  const random = () => {
    seed ^= seed << 13
    seed ^= seed >>> 17
    seed ^= seed << 5
    return (seed >>> 0) / 2 ** 31 - 1
  }
  const weights = (name: string, fanIn: number, fanOut: number) => {
    const limit = Math.sqrt(6 / (fanIn + fanOut))
    return onnx.TensorProto.create({ name, dims: [fanIn, fanOut], dataType: FLOAT, floatData: Array.from({ length: fanIn * fanOut }, () => limit * random()) })
  }
  const bias = (name: string, size: number) => onnx.TensorProto.create({ name, dims: [size], dataType: FLOAT, floatData: Array.from({ length: size }, () => 0.1 * random()) })
  const value = (name: string, dims: (number | string)[]) =>
    onnx.ValueInfoProto.create({
      name,
      type: { tensorType: { elemType: FLOAT, shape: { dim: dims.map((d) => (typeof d === 'number' ? { dimValue: d } : { dimParam: d })) } } },
    })
  const layer = (x: string, w: string, b: string, y: string) =>
    options.useMatMul
      ? [
          { opType: 'MatMul', input: [x, w], output: [`${y}_mm`], name: `${y}_matmul` },
          { opType: 'Add', input: [`${y}_mm`, b], output: [y], name: `${y}_add` },
        ]
      : [{ opType: 'Gemm', input: [x, w, b], output: [y], name: `${y}_gemm` }]
  const softmax = options.softmax !== false
  const model = onnx.ModelProto.create({
    irVersion: 8,
    producerName: 'dcp-tests',
    opsetImport: [{ domain: '', version: 17 }],
    graph: {
      name: 'mlp',
      node: [
        ...layer('input', 'W1', 'B1', 'hidden'),
        { opType: options.activation ?? 'Relu', input: ['hidden'], output: ['activated'], name: 'activation' },
        ...layer('activated', 'W2', 'B2', softmax ? 'logits' : 'output'),
        ...(softmax ? [{ opType: 'Softmax', input: ['logits'], output: ['output'], name: 'softmax', attribute: [{ name: 'axis', type: 2, i: 1 }] }] : []),
      ],
      initializer: [weights('W1', inputs, hidden), bias('B1', hidden), weights('W2', hidden, outputs), bias('B2', outputs)],
      input: [value('input', ['N', inputs])],
      output: [value('output', ['N', outputs])],
    },
  })
  return Buffer.from(onnx.ModelProto.encode(model).finish())
}
