import { TrainerError } from './errors.js'
import { asMatrix, type Dims, expectInputs, type Kernel, showDims } from './kernel.js'

/**
 * `out (+)= alpha * op(a) · op(b)` with `out` [m, n] and inner size k. `op` transposes when its flag is set:
 * `a` is then stored [k, m] (else [m, k]) and `b` [n, k] (else [k, n]). Loops keep the innermost access
 * contiguous; all row-major Float32Arrays.
 */
export function matmul(
  out: Float32Array, a: Float32Array, b: Float32Array, m: number, k: number, n: number,
  transA: boolean, transB: boolean, alpha: number, accumulate: boolean,
): void {
  if (!accumulate) out.fill(0, 0, m * n)
  if (!transB) {
    // out[i, :] += a'(i, p) * b[p, :]: a row of b at a time.
    for (let i = 0; i < m; i++) {
      const o = i * n
      for (let p = 0; p < k; p++) {
        const aip = alpha * (transA ? a[p * m + i]! : a[i * k + p]!)
        if (aip === 0) continue // after a Relu, many are
        const bo = p * n
        for (let j = 0; j < n; j++) out[o + j]! += aip * b[bo + j]!
      }
    }
    return
  }
  // b' (p, j) = b[j, p]: out[i, j] is a dot product of a'(i, :) with row j of b.
  for (let i = 0; i < m; i++) {
    const o = i * n
    for (let j = 0; j < n; j++) {
      const bo = j * k
      let sum = 0
      if (transA) for (let p = 0; p < k; p++) sum += a[p * m + i]! * b[bo + p]!
      else for (let p = 0, ao = i * k; p < k; p++) sum += a[ao + p]! * b[bo + p]!
      out[o + j]! += alpha * sum
    }
  }
}

export interface GemmAttributes {
  alpha: number
  beta: number
  transA: boolean
  transB: boolean
}

/** Gemm: `Y = alpha * A' B' + beta * C`, C broadcast to [M, N] (a scalar, a row, a column or the full matrix). */
export function gemmKernel(attributes: GemmAttributes, op: 'Gemm' | 'MatMul' = 'Gemm'): Kernel {
  const { alpha, beta, transA, transB } = attributes
  const shape = (dims: readonly Dims[]) => {
    const [a0, a1] = matrix(op, dims[0]!)
    const [b0, b1] = matrix(op, dims[1]!)
    const [m, k] = transA ? [a1, a0] : [a0, a1]
    const [k2, n] = transB ? [b1, b0] : [b0, b1]
    if (k !== k2) throw new TrainerError(`${op} cannot multiply ${showDims(dims[0]!)} by ${showDims(dims[1]!)}${transA || transB ? ` (transA=${+transA}, transB=${+transB})` : ''}`)
    return { m, k, n }
  }
  // How C is read at (i, j): its row and column strides, 0 along a broadcast dim.
  const strides = (c: Dims, m: number, n: number) => {
    const [rows, cols] = asMatrix(op, c)
    if ((rows !== 1 && rows !== m) || (cols !== 1 && cols !== n)) throw new TrainerError(`${op} cannot broadcast C ${showDims(c)} to [${m}, ${n}]`)
    return { row: rows === 1 ? 0 : cols, col: cols === 1 ? 0 : 1 }
  }
  return {
    op,
    outputDims(inputs) {
      expectInputs(op, inputs, 2, op === 'Gemm' ? 3 : 2)
      const { m, n } = shape(inputs)
      if (inputs[2]) strides(inputs[2], m, n)
      return [m, n]
    },
    forward(x, dims, y) {
      const { m, k, n } = shape(dims)
      const c = x[2]
      if (c) {
        const s = strides(dims[2]!, m, n)
        for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) y[i * n + j] = beta * c[i * s.row + j * s.col]!
      }
      matmul(y, x[0]!, x[1]!, m, k, n, transA, transB, alpha, c !== undefined)
    },
    backward(x, dims, _y, dy, gx) {
      const { m, k, n } = shape(dims)
      const [a, b] = [x[0]!, x[1]!]
      const [ga, gb, gc] = [gx[0], gx[1], gx[2]]
      // dA' = alpha dY B'^T and dB' = alpha A'^T dY; a transposed operand takes the transpose of its gradient.
      if (ga) {
        if (!transA) matmul(ga, dy, b, m, n, k, false, !transB, alpha, true)
        else matmul(ga, b, dy, k, n, m, transB, true, alpha, true)
      }
      if (gb) {
        if (!transB) matmul(gb, a, dy, k, m, n, !transA, false, alpha, true)
        else matmul(gb, dy, a, n, m, k, true, transA, alpha, true)
      }
      if (gc) {
        const s = strides(dims[2]!, m, n)
        for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) gc[i * s.row + j * s.col]! += beta * dy[i * n + j]!
      }
    },
  }
}

function matrix(op: string, dims: Dims): [number, number] {
  if (dims.length !== 2) throw new TrainerError(`${op} takes 2-D tensors here, got ${showDims(dims)}`)
  return [dims[0]!, dims[1]!]
}
