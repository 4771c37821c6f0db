import { TrainerError } from './errors.js'
import type { TrainableModel } from './graph.js'
import type { Labels, LossKind } from './loss.js'
import type { Optimizer } from './optimizer.js'

/** The loss a model is trained with by default: cross-entropy for a classifier (ending in Softmax over 2+ classes), else MSE. */
export function defaultLoss(model: Pick<TrainableModel, 'endsInSoftmax' | 'outputSize'>): LossKind {
  return model.endsInSoftmax && model.outputSize > 1 ? 'cross_entropy' : 'mse'
}

/** One step of gradient descent on a batch; returns the batch's mean loss before the step. */
export function trainStep(model: TrainableModel, optimizer: Optimizer, x: Float32Array, labels: Labels, loss: LossKind = defaultLoss(model)): number {
  const { loss: value } = model.run(x, labels, loss, true)
  if (!Number.isFinite(value)) throw new TrainerError(`the loss diverged (${value}); try a lower learning rate`)
  optimizer.step(model)
  return value
}

export interface Evaluation {
  /** The mean loss over all samples. */
  loss: number
  /**
   * Cross-entropy: the share of samples whose largest output is at their label. MSE: the share of samples
   * whose every output is within `tolerance` (default 0.5) of its target, which for whole-number targets is
   * the share predicted exactly once rounded.
   */
  accuracy: number
}

export interface EvaluateOptions {
  /** Default: the model's (defaultLoss). */
  loss?: LossKind
  /** MSE only: how close an output must be to count as right. Default 0.5. */
  tolerance?: number
  /** Samples per forward pass, bounding the memory it takes. Default 512. */
  batchSize?: number
}

/** The loss and accuracy of the model on a labelled set, without touching its weights. */
export function evaluate(model: TrainableModel, x: Float32Array, labels: Labels, options: EvaluateOptions = {}): Evaluation {
  const loss = options.loss ?? defaultLoss(model)
  const tolerance = options.tolerance ?? 0.5
  const { inputSize, outputSize } = model
  const samples = x.length / inputSize
  if (!Number.isInteger(samples) || samples < 1) throw new TrainerError(`the input holds ${x.length} floats, not a whole set of samples of ${inputSize}`)
  const perLabel = loss === 'mse' ? outputSize : 1
  if (labels.length !== samples * perLabel) throw new TrainerError(`${labels.length} labels for ${samples} samples (${perLabel} per sample)`)
  const batchSize = options.batchSize ?? 512
  let totalLoss = 0
  let right = 0
  for (let start = 0; start < samples; start += batchSize) {
    const count = Math.min(batchSize, samples - start)
    const batchLabels = labels.subarray(start * perLabel, (start + count) * perLabel)
    const { loss: batchLoss, outputs } = model.run(x.subarray(start * inputSize, (start + count) * inputSize), batchLabels, loss, false)
    totalLoss += batchLoss * count
    right += loss === 'mse' ? withinTolerance(outputs, batchLabels, count, outputSize, tolerance) : argmaxHits(outputs, batchLabels, count, outputSize)
  }
  return { loss: totalLoss / samples, accuracy: right / samples }
}

function argmaxHits(outputs: Float32Array, labels: Labels, rows: number, cols: number): number {
  let hits = 0
  for (let i = 0, o = 0; i < rows; i++, o += cols) {
    let best = 0
    for (let j = 1; j < cols; j++) if (outputs[o + j]! > outputs[o + best]!) best = j
    if (best === labels[i]) hits++
  }
  return hits
}

function withinTolerance(outputs: Float32Array, targets: Labels, rows: number, cols: number, tolerance: number): number {
  let hits = 0
  for (let i = 0, o = 0; i < rows; i++, o += cols) {
    let ok = true
    for (let j = 0; j < cols && ok; j++) ok = Math.abs(outputs[o + j]! - targets[o + j]!) < tolerance
    if (ok) hits++
  }
  return hits
}
