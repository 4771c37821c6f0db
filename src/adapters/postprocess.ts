/**
 * Post-processing: a model's raw output tensor -> a business result. One result per output tensor.
 * top_k_labels: `{"predictions": [{"label","index","score"}, ...]}`; binary_classification:
 * `{"label","positive","score"}`; regression: `{"value"}` or `{"values"}`; passthrough: the tensor.
 */
import type { Tensor } from '../protocol/frames.js'
import { fieldError, modelError, readOptions, showShape, type AdapterOptions } from './options.js'
import type { AdapterModel } from './runtime.js'

const DEFAULT_TOP_K = 5
const DEFAULT_THRESHOLD = 0.5
/** How far from 1 the sum of a row may be and still be read as probabilities. */
const SUM_TOLERANCE = 1e-3

export interface Prediction {
  label: string
  index: number
  score: number
}

type Postprocess = (output: Tensor, field: string) => unknown

/** The transform for this model, its configuration checked once (VALIDATION_ERROR says what to set). */
export function planPostprocess(model: AdapterModel): Postprocess {
  const options = readOptions(model.adapter_options)
  const adapter = model.postprocessing ?? 'passthrough'
  switch (adapter) {
    case 'top_k_labels':
      return topKPlan(model, options)
    case 'binary_classification':
      return binaryPlan(model, options)
    case 'regression':
      return (output, field) => regression(output, field)
    case 'passthrough':
      return (output) => output
    default: {
      const unknown: never = adapter
      throw modelError(`postprocessing ${JSON.stringify(unknown)} is not an adapter`)
    }
  }
}

export function postprocessAll(model: AdapterModel, outputs: Tensor[]): unknown[] {
  const transform = planPostprocess(model)
  return outputs.map((output, i) => transform(output, `outputs.${i}`))
}

function topKPlan(model: AdapterModel, options: AdapterOptions): Postprocess {
  const labels = model.labels ?? []
  const k = options.top_k ?? DEFAULT_TOP_K
  return (output, field) => {
    const width = output.shape.at(-1) ?? 0
    if (width < 1 || output.data.length === 0 || output.data.length % width !== 0) {
      throw fieldError(field, `${output.data.length} values of shape ${showShape(output.shape)} are no rows of class scores; top_k_labels needs an output such as [1, classes]`)
    }
    const rows = Array.from({ length: output.data.length / width }, (_, r) => topK(output.data.slice(r * width, (r + 1) * width), k, labels))
    return { predictions: rows.length === 1 ? rows[0] : rows }
  }
}

/**
 * Labels that do not match the declared classes: worth refusing when the model is configured, but not a
 * reason to fail a result (a missing label reads `class_<i>`).
 */
export function labelsProblem(model: AdapterModel): string | null {
  const classes = model.output_shape?.at(-1) ?? -1
  if (model.postprocessing !== 'top_k_labels' || !model.labels || classes < 1 || model.labels.length === classes) return null
  return `model labels has ${model.labels.length} names but output_shape ${showShape(model.output_shape)} has ${classes} classes; give one label per class`
}

/** The k best classes of one row of scores, best first (ties: lower index first). */
export function topK(row: number[], k: number, labels: string[]): Prediction[] {
  const probabilities = isDistribution(row) ? row : softmax(row)
  return probabilities
    .map((score, index) => ({ label: labels[index] ?? `class_${index}`, index, score }))
    .sort((a, b) => b.score - a.score || a.index - b.index)
    .slice(0, Math.min(k, row.length))
}

/** Probabilities already: every value in [0,1] and a sum of 1 (within 1e-3). Otherwise logits. */
export function isDistribution(row: number[]): boolean {
  const sum = row.reduce((a, b) => a + b, 0)
  return row.every((v) => v >= 0 && v <= 1) && Math.abs(sum - 1) <= SUM_TOLERANCE
}

export function softmax(row: number[]): number[] {
  const max = row.reduce((a, b) => Math.max(a, b), -Infinity)
  const exps = row.map((v) => Math.exp(v - max))
  const sum = exps.reduce((a, b) => a + b, 0)
  return exps.map((e) => e / sum)
}

const sigmoid = (x: number) => 1 / (1 + Math.exp(-x))

function binaryPlan(model: AdapterModel, options: AdapterOptions): Postprocess {
  // -1 dimensions may be 1; fixed ones multiply to at least this many values.
  const fixed = (model.output_shape ?? []).filter((d) => d > 0).reduce((a, d) => a * d, 1)
  if (fixed > 2) {
    throw modelError(`output_shape ${showShape(model.output_shape)}: binary_classification needs 1 value (a probability or a logit) or 2 (one per class); use top_k_labels for more classes`)
  }
  const threshold = options.threshold ?? DEFAULT_THRESHOLD
  const positiveLabel = model.labels?.[1] ?? 'positive'
  const negativeLabel = model.labels?.[0] ?? 'negative'
  return (output, field) => {
    const p = positiveProbability(output, field)
    const positive = p >= threshold
    return { label: positive ? positiveLabel : negativeLabel, positive, score: p }
  }
}

/** 1 value: a probability, or a logit (sigmoid) when outside [0,1]. 2 values: class 1's share (softmax unless probabilities). */
function positiveProbability(output: Tensor, field: string): number {
  const [a, b] = output.data
  if (output.data.length === 1 && a !== undefined) return a >= 0 && a <= 1 ? a : sigmoid(a)
  if (output.data.length === 2 && b !== undefined) return (isDistribution(output.data) ? output.data : softmax(output.data))[1] as number
  throw fieldError(field, `${output.data.length} values (shape ${showShape(output.shape)}): binary_classification needs 1 or 2; set the model's postprocessing to top_k_labels or regression`)
}

function regression(output: Tensor, field: string): unknown {
  if (output.data.length === 0) throw fieldError(field, 'no values to return for regression')
  return output.data.length === 1 ? { value: output.data[0] } : { values: output.data }
}
