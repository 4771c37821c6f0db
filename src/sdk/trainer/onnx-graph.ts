import onnxProto from 'onnx-proto'
import { SUPPORTED_OPERATORS, type SupportedOperator, TrainerError, UnsupportedOperatorError } from './errors.js'
import { type Kernel, sizeOf } from './kernel.js'
import { gemmKernel } from './matmul.js'
import { add, flatten, relu, sigmoid, softmax, tanh } from './ops.js'

const { onnx } = onnxProto
const FLOAT = 1

export type ModelProto = InstanceType<typeof onnx.ModelProto>
type NodeProto = onnxProto.onnx.INodeProto
type TensorProto = onnxProto.onnx.ITensorProto

export interface GraphNode {
  name: string
  kernel: Kernel
  /** The tensors it reads (an omitted optional input, named '', is left out) and the one it writes. */
  inputs: string[]
  output: string
}

export interface Initializer {
  name: string
  dims: number[]
  data: Float32Array
}

/** A dense graph the trainer can run: one input [batch, ...], one output, float32 initializers, nodes in order. */
export interface ParsedGraph {
  input: { name: string; dims: number[] }
  output: string
  initializers: Initializer[]
  nodes: GraphNode[]
}

export function decodeModel(bytes: Uint8Array): ModelProto {
  try {
    return onnx.ModelProto.decode(bytes)
  } catch (error) {
    throw new TrainerError(`not an ONNX model: ${(error as Error).message}`)
  }
}

/** Reads the graph of `model`, refusing any operator, type or structure the trainer cannot train. */
export function parseGraph(model: ModelProto): ParsedGraph {
  const graph = model.graph
  if (!graph?.node?.length) throw new TrainerError('the ONNX model has no graph nodes')
  // 1. operators first, so that a model with an unsupported op is refused for it, not for a side effect of it
  for (const node of graph.node) operatorOf(node)
  // 2. weights, the input and the output
  const initializers = (graph.initializer ?? []).map(readInitializer)
  const weights = new Set(initializers.map((i) => i.name))
  const inputs = (graph.input ?? []).filter((i) => !weights.has(i.name ?? ''))
  const outputs = graph.output ?? []
  if (inputs.length !== 1 || outputs.length !== 1) {
    throw new TrainerError(`the trainer takes a graph of one input and one output, this one has ${inputs.length} and ${outputs.length}`)
  }
  const input = graphInput(inputs[0]!)
  // 3. nodes, each reading only tensors defined before it (ONNX graphs are topologically sorted)
  const defined = new Set([input.name, ...weights])
  const opset = defaultOpset(model)
  const nodes = graph.node.map((node, index): GraphNode => {
    const name = node.name || `#${index} ${node.opType}`
    const nodeInputs = (node.input ?? []).filter((i) => i !== '')
    for (const i of nodeInputs) if (!defined.has(i)) throw new TrainerError(`node ${name} reads ${i}, which no earlier node or initializer defines`)
    if (node.output?.length !== 1 || !node.output[0]) throw new TrainerError(`node ${name} must have one output`)
    const output = node.output[0]
    if (defined.has(output)) throw new TrainerError(`node ${name} writes ${output}, which is already defined`)
    defined.add(output)
    return { name, kernel: kernelFor(node, opset), inputs: nodeInputs, output }
  })
  const output = outputs[0]!.name ?? ''
  if (!nodes.some((n) => n.output === output)) throw new TrainerError(`the graph output ${output} is not computed by any node`)
  return { input, output, initializers, nodes }
}

function operatorOf(node: NodeProto): SupportedOperator {
  const domain = node.domain ?? ''
  const op = node.opType ?? ''
  const known = (SUPPORTED_OPERATORS as readonly string[]).includes(op)
  if (!known || (domain !== '' && domain !== 'ai.onnx')) throw new UnsupportedOperatorError(domain && domain !== 'ai.onnx' ? `${domain}.${op}` : op)
  return op as SupportedOperator
}

function kernelFor(node: NodeProto, opset: number): Kernel {
  const int = (name: string, fallback: number) => Number(attribute(node, name)?.i ?? fallback)
  const float = (name: string, fallback: number) => attribute(node, name)?.f ?? fallback
  const op = operatorOf(node)
  switch (op) {
    case 'Gemm':
      return gemmKernel({ alpha: float('alpha', 1), beta: float('beta', 1), transA: int('transA', 0) !== 0, transB: int('transB', 0) !== 0 })
    case 'MatMul':
      return gemmKernel({ alpha: 1, beta: 1, transA: false, transB: false }, 'MatMul')
    case 'Add':
      return add()
    case 'Relu':
      return relu()
    case 'Sigmoid':
      return sigmoid()
    case 'Tanh':
      return tanh()
    case 'Softmax':
      // Before opset 13 Softmax coerced its input to 2-D at `axis` (default 1); since, it is over `axis` (default -1).
      return opset < 13 ? softmax(int('axis', 1), true) : softmax(int('axis', -1), false)
    case 'Flatten':
      return flatten(int('axis', 1))
    default: {
      const unknown: never = op
      throw new UnsupportedOperatorError(unknown)
    }
  }
}

function attribute(node: NodeProto, name: string): onnxProto.onnx.IAttributeProto | undefined {
  return (node.attribute ?? []).find((a) => a.name === name)
}

function defaultOpset(model: ModelProto): number {
  const entry = model.opsetImport.find((o) => !o.domain || o.domain === 'ai.onnx')
  return Number(entry?.version ?? 0)
}

function graphInput(value: onnxProto.onnx.IValueInfoProto): { name: string; dims: number[] } {
  const tensor = value.type?.tensorType
  const name = value.name ?? ''
  if (tensor?.elemType !== FLOAT) throw new TrainerError(`the graph input ${name} must be float32`)
  const dims = (tensor.shape?.dim ?? []).map((d) => (d.dimValue != null && Number(d.dimValue) > 0 ? Number(d.dimValue) : -1))
  // The first dim is the batch, whatever it says; the others make one sample and must be known.
  if (dims.length < 2 || dims.slice(1).some((d) => d < 0)) {
    throw new TrainerError(`the graph input ${name} must have a shape [batch, ...] with known sample dims, got [${dims.map((d) => (d < 0 ? '?' : d)).join(', ')}]`)
  }
  return { name, dims }
}

function readInitializer(tensor: TensorProto): Initializer {
  const name = tensor.name ?? ''
  if (tensor.dataType !== FLOAT) throw new TrainerError(`initializer ${name} has ONNX data type ${tensor.dataType}; the trainer takes float32 only`)
  if (tensor.dataLocation === onnx.TensorProto.DataLocation.EXTERNAL) throw new TrainerError(`initializer ${name} is stored outside the model file`)
  return { name, dims: (tensor.dims ?? []).map(Number), data: readFloats(tensor) }
}

/** The values of a float32 tensor, from `rawData` (little-endian) when it has any, else from `floatData`. */
export function readFloats(tensor: TensorProto): Float32Array {
  const size = sizeOf((tensor.dims ?? []).map(Number))
  const raw = tensor.rawData
  let data: Float32Array
  if (raw && raw.length > 0) {
    if (raw.length !== size * 4) throw new TrainerError(`initializer ${tensor.name} has ${raw.length} bytes of raw data for ${size} floats`)
    const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength)
    data = new Float32Array(size)
    for (let i = 0; i < size; i++) data[i] = view.getFloat32(i * 4, true)
  } else {
    data = Float32Array.from(tensor.floatData ?? [])
    if (data.length !== size) throw new TrainerError(`initializer ${tensor.name} has ${data.length} values for dims [${(tensor.dims ?? []).join(', ')}]`)
  }
  return data
}

/** Writes `values` into a float32 initializer in the form it came in (raw bytes or floatData), clearing the other. */
export function writeFloats(tensor: TensorProto, values: Float32Array): void {
  if (tensor.rawData && tensor.rawData.length > 0) {
    const raw = new Uint8Array(values.length * 4)
    const view = new DataView(raw.buffer)
    for (let i = 0; i < values.length; i++) view.setFloat32(i * 4, values[i]!, true)
    tensor.rawData = raw
    tensor.floatData = []
  } else {
    tensor.floatData = Array.from(values)
    // An empty rawData still counts as set for onnxruntime (a proto2 field): it must not be written at all.
    Reflect.deleteProperty(tensor, 'rawData')
  }
}
