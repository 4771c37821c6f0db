import onnxProto from 'onnx-proto'
import { zipSync } from 'fflate'

const { onnx } = onnxProto
const FLOAT = 1

/**
 * A real ONNX model, built in memory: `input [N, inputs] -> Gemm(W, B) -> Softmax -> output [N, outputs]`,
 * with deterministic weights. onnxruntime runs it as is. `imageShape` ([C, H, W]) takes `[N, C, H, W]`
 * and flattens it first (inputs = C*H*W); `softmax: false` leaves the raw Gemm output (a regression).
 */
export function denseOnnxModel(options: { inputs?: number; outputs?: number; seed?: number; imageShape?: [number, number, number]; softmax?: boolean } = {}): Buffer {
  const inputs = options.imageShape ? options.imageShape.reduce((a, b) => a * b, 1) : (options.inputs ?? 10)
  const outputs = options.outputs ?? 2
  let seed = options.seed ?? 1
  const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31) - 0.5
  const tensor = (name: string, dims: number[]) =>
    onnx.TensorProto.create({ name, dims, dataType: FLOAT, floatData: Array.from({ length: dims.reduce((a, b) => a * b, 1) }, random) })
  const value = (name: string, dims: (number | string)[]) =>
    onnx.ValueInfoProto.create({
      name,
      type: {
        tensorType: {
          elemType: FLOAT,
          shape: { dim: dims.map((d) => (typeof d === 'number' ? { dimValue: d } : { dimParam: d })) },
        },
      },
    })
  const model = onnx.ModelProto.create({
    irVersion: 8,
    producerName: 'dcp-tests',
    opsetImport: [{ domain: '', version: 17 }],
    graph: {
      name: 'dense',
      node: [
        ...(options.imageShape ? [{ opType: 'Flatten', input: ['input'], output: ['flat'], name: 'flatten', attribute: [{ name: 'axis', type: 2, i: 1 }] }] : []),
        { opType: 'Gemm', input: [options.imageShape ? 'flat' : 'input', 'W', 'B'], output: [options.softmax === false ? 'output' : 'logits'], name: 'gemm' },
        ...(options.softmax === false ? [] : [{ opType: 'Softmax', input: ['logits'], output: ['output'], name: 'softmax', attribute: [{ name: 'axis', type: 2, i: 1 }] }]),
      ],
      initializer: [tensor('W', [inputs, outputs]), tensor('B', [outputs])],
      input: [value('input', options.imageShape ? ['N', ...options.imageShape] : ['N', inputs])],
      output: [value('output', ['N', outputs])],
    },
  })
  return Buffer.from(onnx.ModelProto.encode(model).finish())
}

/** A zip laid out as `torch.jit.save` writes it (the contents are placeholders: no torch here). */
export function torchScriptArchive(name = 'model'): Buffer {
  const text = (s: string) => new TextEncoder().encode(s)
  return Buffer.from(
    zipSync({
      [`${name}/data.pkl`]: text('\u0080\u0002}q\u0000.'),
      [`${name}/code/__torch__/model.py`]: text('class Model(Module):\n  def forward(self, x):\n    return x\n'),
      [`${name}/constants.pkl`]: text('\u0080\u0002).'),
      [`${name}/version`]: text('3\n'),
    }),
  )
}

export { mlpOnnxModel } from '../../src/benchmarks/models.js'
