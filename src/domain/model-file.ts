import { unzipSync } from 'fflate'
import onnxProto from 'onnx-proto'
import type { TensorInfo } from './model.js'

const { onnx } = onnxProto

export interface ModelFileInfo {
  format: 'onnx' | 'torchscript'
  /** The graph's inputs (without its initializers) and outputs; empty for TorchScript, which has no declared signature. */
  inputs: TensorInfo[]
  outputs: TensorInfo[]
}

export class ModelFileError extends Error {}

const ZIP_MAGIC = [0x50, 0x4b, 0x03, 0x04]

/** What the bytes are, by their content: a zip archive (TorchScript) or else a candidate ONNX protobuf. */
export function sniffFormat(bytes: Uint8Array): 'onnx' | 'torchscript' {
  return ZIP_MAGIC.every((b, i) => bytes[i] === b) ? 'torchscript' : 'onnx'
}

/** Checks that the bytes are a model of the format and reads its signature. Throws ModelFileError. */
export function inspectModelFile(bytes: Uint8Array, format: 'onnx' | 'torchscript'): ModelFileInfo {
  if (bytes.length === 0) throw new ModelFileError('the model file is empty')
  return format === 'onnx' ? inspectOnnx(bytes) : inspectTorchScript(bytes)
}

const ONNX_TYPES: Record<number, string> = {
  1: 'float32', 2: 'uint8', 3: 'int8', 4: 'uint16', 5: 'int16', 6: 'int32', 7: 'int64', 8: 'string', 9: 'bool',
  10: 'float16', 11: 'float64', 12: 'uint32', 13: 'uint64', 16: 'bfloat16',
}

function inspectOnnx(bytes: Uint8Array): ModelFileInfo {
  if (sniffFormat(bytes) === 'torchscript') throw new ModelFileError('the file is a zip archive (TorchScript?), not an ONNX model')
  let model: InstanceType<typeof onnx.ModelProto>
  try {
    model = onnx.ModelProto.decode(bytes)
  } catch (error) {
    throw new ModelFileError(`not an ONNX model: ${(error as Error).message}`)
  }
  const graph = model.graph
  // Random bytes sometimes decode as a protobuf; a real model has an IR version, an opset and a graph.
  if (!model.irVersion || model.opsetImport.length === 0) throw new ModelFileError('not an ONNX model: no IR version or opset')
  if (!graph || !graph.node?.length) throw new ModelFileError('not an ONNX model: it has no graph nodes')
  const initializers = new Set((graph.initializer ?? []).map((i) => i.name))
  const inputs = (graph.input ?? []).filter((i) => !initializers.has(i.name)).map(tensorInfo)
  const outputs = (graph.output ?? []).map(tensorInfo)
  if (inputs.length === 0 || outputs.length === 0) throw new ModelFileError('the ONNX graph declares no inputs or no outputs')
  return { format: 'onnx', inputs, outputs }
}

function tensorInfo(value: onnxProto.onnx.IValueInfoProto): TensorInfo {
  const tensor = value.type?.tensorType
  const dims = tensor?.shape?.dim
  return {
    name: value.name ?? '',
    type: ONNX_TYPES[tensor?.elemType ?? 0] ?? 'unknown',
    shape: dims ? dims.map((d) => (d.dimValue != null && Number(d.dimValue) > 0 ? Number(d.dimValue) : -1)) : null,
  }
}

/**
 * A TorchScript file (`torch.jit.save`) is a zip archive with a pickled `data.pkl` and the model's
 * `code/` under one top folder, plus a `version` record.
 */
function inspectTorchScript(bytes: Uint8Array): ModelFileInfo {
  if (sniffFormat(bytes) !== 'torchscript') throw new ModelFileError('not a TorchScript archive: it is not a zip file')
  const names: string[] = []
  try {
    unzipSync(bytes, {
      filter: (file) => {
        names.push(file.name)
        return false
      },
    })
  } catch (error) {
    throw new ModelFileError(`not a TorchScript archive: ${(error as Error).message}`)
  }
  const has = (suffix: RegExp) => names.some((n) => suffix.test(n))
  if (!has(/^[^/]+\/data\.pkl$/)) throw new ModelFileError('not a TorchScript archive: no <archive>/data.pkl')
  if (!has(/^[^/]+\/code\//) && !has(/^[^/]+\/constants\.pkl$/)) throw new ModelFileError('not a TorchScript archive: no code/ or constants.pkl')
  if (!has(/^[^/]+\/(\.data\/)?version$/)) throw new ModelFileError('not a TorchScript archive: no version record')
  return { format: 'torchscript', inputs: [], outputs: [] }
}
