import { TrainerError } from './errors.js'

/**
 * - `cross_entropy`: labels are class indices (one per sample); the loss is the mean over the batch of
 *   `-log softmax(logits)[label]`.
 * - `mse`: labels are targets, one per output value; the loss is the mean of the squared errors over all
 *   of them (batch × outputs), as PyTorch's MSELoss.
 */
export type LossKind = 'cross_entropy' | 'mse'

/** Class indices (cross-entropy; a Float32Array of whole numbers is taken too) or regression targets (mse). */
export type Labels = Int32Array | Float32Array

/**
 * The mean cross-entropy of `logits` [rows, cols] against class `labels`, computed by log-sum-exp so that it
 * is finite for any logits. When `grad` is given, it is set to dL/dlogits = (softmax - onehot) / rows.
 */
export function crossEntropy(logits: Float32Array, labels: Labels, rows: number, cols: number, grad: Float32Array | null): number {
  if (labels.length !== rows) throw new TrainerError(`cross-entropy takes one class label per sample: ${labels.length} labels for ${rows} samples`)
  let total = 0
  for (let i = 0, o = 0; i < rows; i++, o += cols) {
    const label = labels[i]!
    if (!Number.isInteger(label) || label < 0 || label >= cols) throw new TrainerError(`label ${label} of sample ${i} is not a class index in [0, ${cols})`)
    let max = -Infinity
    for (let j = 0; j < cols; j++) if (logits[o + j]! > max) max = logits[o + j]!
    let sum = 0
    for (let j = 0; j < cols; j++) sum += Math.exp(logits[o + j]! - max)
    total += Math.log(sum) + max - logits[o + label]!
    if (grad) {
      for (let j = 0; j < cols; j++) grad[o + j] = Math.exp(logits[o + j]! - max) / sum / rows
      grad[o + label]! -= 1 / rows
    }
  }
  return total / rows
}

/** The mean squared error of `outputs` against `targets` (same length); `grad`, when given, is set to dL/doutputs. */
export function meanSquaredError(outputs: Float32Array, targets: Labels, grad: Float32Array | null): number {
  const size = outputs.length
  if (targets.length !== size) throw new TrainerError(`mse takes one target per output value: ${targets.length} targets for ${size} outputs`)
  let total = 0
  for (let i = 0; i < size; i++) {
    const error = outputs[i]! - targets[i]!
    total += error * error
    if (grad) grad[i] = (2 * error) / size
  }
  return total / size
}
