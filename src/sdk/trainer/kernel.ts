import type { SupportedOperator } from './errors.js'
import { TrainerError } from './errors.js'

/** A tensor's dimensions. The trainer works on 2-D (or lower) tensors, except through elementwise ops and Flatten. */
export type Dims = readonly number[]

/**
 * One node's forward and backward. Buffers are owned by the caller and reused between steps, so kernels
 * allocate nothing: `forward` overwrites `y`; `backward` *adds* dL/dx into `gx[i]` (several consumers of one
 * tensor add up there), and skips the inputs whose gradient is not needed (`null`).
 */
export interface Kernel {
  readonly op: SupportedOperator
  /** Softmax only: the axis it normalizes over, as the node says (-1 for the last). */
  readonly axis?: number
  /** The output's dims for these input dims; throws TrainerError when they do not fit together. */
  outputDims(inputs: readonly Dims[]): number[]
  forward(x: readonly Float32Array[], dims: readonly Dims[], y: Float32Array): void
  backward(x: readonly Float32Array[], dims: readonly Dims[], y: Float32Array, dy: Float32Array, gx: readonly (Float32Array | null)[]): void
}

export const sizeOf = (dims: Dims): number => dims.reduce((a, b) => a * b, 1)

export const showDims = (dims: Dims): string => `[${dims.join(', ')}]`

/** A tensor of rank 0, 1 or 2 seen as [rows, cols]: a 1-D [n] is one row, as broadcasting aligns dims on the right. */
export function asMatrix(op: string, dims: Dims): [number, number] {
  if (dims.length > 2) throw new TrainerError(`${op} takes tensors of rank 2 or less here, got ${showDims(dims)}`)
  return [dims.length === 2 ? dims[0]! : 1, dims.length >= 1 ? dims[dims.length - 1]! : 1]
}

export function expectInputs(op: string, inputs: readonly Dims[], min: number, max = min): void {
  if (inputs.length < min || inputs.length > max) {
    throw new TrainerError(`${op} takes ${min === max ? min : `${min} to ${max}`} inputs, got ${inputs.length}`)
  }
}
