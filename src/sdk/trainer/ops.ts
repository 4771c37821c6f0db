import { TrainerError } from './errors.js'
import { asMatrix, type Dims, expectInputs, type Kernel, showDims, sizeOf } from './kernel.js'

/** An op of one input whose output has its input's dims. */
function elementwise(
  op: 'Relu' | 'Sigmoid' | 'Tanh',
  forward: (x: Float32Array, y: Float32Array, size: number) => void,
  backward: (x: Float32Array, y: Float32Array, dy: Float32Array, gx: Float32Array, size: number) => void,
): Kernel {
  return {
    op,
    outputDims(inputs) {
      expectInputs(op, inputs, 1)
      return [...inputs[0]!]
    },
    forward: (x, _dims, y) => forward(x[0]!, y, y.length),
    backward: (x, _dims, y, dy, gx) => {
      if (gx[0]) backward(x[0]!, y, dy, gx[0], y.length)
    },
  }
}

export const relu = (): Kernel =>
  elementwise(
    'Relu',
    (x, y, size) => {
      for (let i = 0; i < size; i++) y[i] = x[i]! > 0 ? x[i]! : 0
    },
    (x, _y, dy, gx, size) => {
      for (let i = 0; i < size; i++) if (x[i]! > 0) gx[i]! += dy[i]!
    },
  )

export const sigmoid = (): Kernel =>
  elementwise(
    'Sigmoid',
    (x, y, size) => {
      for (let i = 0; i < size; i++) y[i] = 1 / (1 + Math.exp(-x[i]!))
    },
    (_x, y, dy, gx, size) => {
      for (let i = 0; i < size; i++) gx[i]! += dy[i]! * y[i]! * (1 - y[i]!)
    },
  )

export const tanh = (): Kernel =>
  elementwise(
    'Tanh',
    (x, y, size) => {
      for (let i = 0; i < size; i++) y[i] = Math.tanh(x[i]!)
    },
    (_x, y, dy, gx, size) => {
      for (let i = 0; i < size; i++) gx[i]! += dy[i]! * (1 - y[i]! * y[i]!)
    },
  )

/** Add with numpy broadcasting over tensors of rank 2 or less: a bias row [n] over [N, n], a column [N, 1], same shapes. */
export function add(): Kernel {
  const shape = (dims: readonly Dims[]) => {
    const [a, b] = [asMatrix('Add', dims[0]!), asMatrix('Add', dims[1]!)]
    const fit = (p: number, q: number) => (p === q || q === 1 ? p : p === 1 ? q : -1)
    const rows = fit(a[0], b[0])
    const cols = fit(a[1], b[1])
    if (rows < 0 || cols < 0) throw new TrainerError(`Add cannot broadcast ${showDims(dims[0]!)} with ${showDims(dims[1]!)}`)
    // Row and column strides of each operand, 0 along a broadcast dim.
    const stride = ([r, c]: [number, number]) => ({ row: r === 1 ? 0 : c, col: c === 1 ? 0 : 1 })
    return { rows, cols, a: stride(a), b: stride(b), rank: Math.max(dims[0]!.length, dims[1]!.length) }
  }
  return {
    op: 'Add',
    outputDims(inputs) {
      expectInputs('Add', inputs, 2)
      const { rows, cols, rank } = shape(inputs)
      return rank === 2 ? [rows, cols] : rank === 1 ? [cols] : []
    },
    forward(x, dims, y) {
      const { rows, cols, a, b } = shape(dims)
      const [xa, xb] = [x[0]!, x[1]!]
      for (let i = 0; i < rows; i++) {
        const o = i * cols
        const ao = i * a.row
        const bo = i * b.row
        for (let j = 0; j < cols; j++) y[o + j] = xa[ao + j * a.col]! + xb[bo + j * b.col]!
      }
    },
    backward(_x, dims, _y, dy, gx) {
      const { rows, cols, a, b } = shape(dims)
      if (gx[0]) addBack(dy, gx[0], rows, cols, a)
      if (gx[1]) addBack(dy, gx[1], rows, cols, b)
    },
  }
}

/** Sums dy over the dims the operand was broadcast along. */
function addBack(dy: Float32Array, g: Float32Array, rows: number, cols: number, s: { row: number; col: number }): void {
  for (let i = 0; i < rows; i++) {
    const o = i * cols
    const go = i * s.row
    for (let j = 0; j < cols; j++) g[go + j * s.col]! += dy[o + j]!
  }
}

/**
 * Softmax over the last axis (opset 13 and later), or, before opset 13, over the input coerced to 2-D at
 * `axis` ([d0 * .. * d(axis-1), the rest]); for a 2-D input with axis 1 both are the same.
 */
export function softmax(axis: number, coerced: boolean): Kernel {
  const shape = (dims: Dims) => {
    const rank = dims.length
    const at = axis < 0 ? axis + rank : axis
    if (at < 0 || at >= rank) throw new TrainerError(`Softmax axis ${axis} is out of range for ${showDims(dims)}`)
    if (!coerced && at !== rank - 1) throw new TrainerError(`Softmax over axis ${axis} of ${showDims(dims)} is not supported (the last axis only)`)
    const cols = sizeOf(dims.slice(at))
    return { rows: sizeOf(dims) / cols, cols }
  }
  return {
    op: 'Softmax',
    axis,
    outputDims(inputs) {
      expectInputs('Softmax', inputs, 1)
      shape(inputs[0]!)
      return [...inputs[0]!]
    },
    forward(x, dims, y) {
      const { rows, cols } = shape(dims[0]!)
      for (let i = 0; i < rows; i++) softmaxRow(x[0]!, y, i * cols, cols)
    },
    backward(_x, dims, y, dy, gx) {
      const g = gx[0]
      if (!g) return
      const { rows, cols } = shape(dims[0]!)
      // dx = y * (dy - <dy, y>), row by row.
      for (let i = 0, o = 0; i < rows; i++, o += cols) {
        let dot = 0
        for (let j = 0; j < cols; j++) dot += dy[o + j]! * y[o + j]!
        for (let j = 0; j < cols; j++) g[o + j]! += y[o + j]! * (dy[o + j]! - dot)
      }
    },
  }
}

/** `y[o..o+cols) = softmax(x[o..o+cols))`, shifted by the row's max so that exp cannot overflow. */
export function softmaxRow(x: Float32Array, y: Float32Array, o: number, cols: number): void {
  let max = -Infinity
  for (let j = 0; j < cols; j++) if (x[o + j]! > max) max = x[o + j]!
  let sum = 0
  for (let j = 0; j < cols; j++) sum += y[o + j] = Math.exp(x[o + j]! - max)
  for (let j = 0; j < cols; j++) y[o + j]! /= sum
}

/** Flatten at `axis`: a reshape to [d0 * .. * d(axis-1), the rest]; the data is unchanged. */
export function flatten(axis: number): Kernel {
  return {
    op: 'Flatten',
    outputDims(inputs) {
      expectInputs('Flatten', inputs, 1)
      const dims = inputs[0]!
      const at = axis < 0 ? axis + dims.length : axis
      if (at < 0 || at > dims.length) throw new TrainerError(`Flatten axis ${axis} is out of range for ${showDims(dims)}`)
      return [sizeOf(dims.slice(0, at)), sizeOf(dims.slice(at))]
    },
    forward: (x, _dims, y) => y.set(x[0]!),
    backward(_x, _dims, _y, dy, gx) {
      const g = gx[0]
      if (g) for (let i = 0; i < dy.length; i++) g[i]! += dy[i]!
    },
  }
}
