import onnxProto from 'onnx-proto'
import { TrainerError } from './errors.js'
import { checkWeights, type TrainableModel, type Weights } from './graph.js'
import { decodeModel, readFloats, writeFloats } from './onnx-graph.js'

const { onnx } = onnxProto
const FLOAT = 1

/**
 * The ONNX model with `weights` written into its float initializers (each in the form it came in: raw bytes
 * or floatData), everything else as it was: onnxruntime runs it as is. Given a model, its weights by default.
 */
export function exportOnnx(model: TrainableModel, weights?: Weights): Uint8Array
export function exportOnnx(modelBytes: Uint8Array, weights: Weights): Uint8Array
export function exportOnnx(source: Uint8Array | TrainableModel, weights?: Weights): Uint8Array {
  const bytes = source instanceof Uint8Array ? source : source.source
  const values = weights ?? (source instanceof Uint8Array ? undefined : source.getWeights())
  if (!values) throw new TrainerError('exportOnnx needs the weights to write')
  const proto = decodeModel(bytes)
  const initializers = (proto.graph?.initializer ?? []).filter((t) => t.dataType === FLOAT)
  checkWeights(initializers.map((t) => ({ name: t.name ?? '', values: readFloats(t) })), values)
  for (const tensor of initializers) writeFloats(tensor, values[tensor.name ?? '']!)
  return onnx.ModelProto.encode(proto).finish()
}
