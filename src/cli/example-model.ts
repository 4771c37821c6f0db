import { writeFile } from 'node:fs/promises'
import { mlpOnnxModel } from '../benchmarks/models.js'
import { parse, UsageError, wholeNumber } from './args.js'

/**
 * `dcp example-model [FILE]`: writes a small ONNX classifier to try dcp with, when no model is at hand: input
 * `[N, inputs]` (N dynamic) -> Gemm -> Relu -> Gemm -> Softmax -> output `[N, classes]`, fixed weights (the same
 * file every time for the same options). The defaults, 10 inputs and 2 classes, fit the README's and the
 * spec's example requests. Exit 1 when the file cannot be written; it is not overwritten unless `--force`.
 */
export async function exampleModelCommand(args: string[]): Promise<number> {
  const { values, positionals } = parse(args, {
    inputs: { type: 'string' },
    classes: { type: 'string' },
    force: { type: 'boolean' },
  })
  if (positionals.length > 1) throw new UsageError('dcp example-model takes at most one file name')
  const file = positionals[0] ?? 'my_model.onnx'
  const inputs = wholeNumber('inputs', values.inputs, 1, 10_000) ?? 10
  const classes = wholeNumber('classes', values.classes, 2, 10_000) ?? 2
  const model = mlpOnnxModel({ inputs, hidden: Math.max(16, Math.min(256, inputs * 2)), outputs: classes, seed: 42 })
  try {
    await writeFile(file, model, { flag: values.force ? 'w' : 'wx' })
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code
    console.error(`dcp example-model: cannot write ${file}: ${code === 'EEXIST' ? 'it exists (--force overwrites it)' : (error as Error).message}`)
    return 1
  }
  console.log(`wrote ${file} (${model.length} bytes): an ONNX classifier, input [N, ${inputs}] float32 -> output [N, ${classes}] class probabilities`)
  return 0
}
