/**
 * Pre-processing: a business input (an image, a row of features, a text) -> the tensor the model takes, with
 * batch dimension 1. passthrough (or none) takes the tensor itself, `{"data": [...], "shape": [...]}`.
 */
import type { Tensor } from '../protocol/frames.js'
import { FLOAT32_MAX, FLOAT32_MESSAGE } from '../protocol/numbers.js'
import { imagePlan, imageTensor } from './image.js'
import { fieldError, fitsShape, modelError, readOptions, showShape } from './options.js'
import type { AdapterModel } from './runtime.js'
import { tabularPlan, tabularTensor } from './tabular.js'
import { textPlan, textTensor } from './tokenize.js'

type Preprocess = (input: unknown, field: string) => Tensor

interface Planned {
  transform: Preprocess
  /** Each tensor's shape, when the configuration fixes it (not for passthrough). */
  shape: number[] | undefined
}

/** The transform for this model, its configuration checked once (VALIDATION_ERROR says what to set). */
export function planPreprocess(model: AdapterModel): Planned {
  const options = readOptions(model.adapter_options)
  const adapter = model.preprocessing ?? 'passthrough'
  switch (adapter) {
    case 'image_classification': {
      const plan = imagePlan(model, options)
      return { transform: (input, field) => imageTensor(input, field, plan), shape: plan.shape }
    }
    case 'tabular': {
      const plan = tabularPlan(model, options)
      return { transform: (input, field) => tabularTensor(input, field, plan), shape: plan.shape }
    }
    case 'text_tokens': {
      const plan = textPlan(model, options)
      return { transform: (input, field) => textTensor(input, field, plan), shape: plan.shape }
    }
    case 'passthrough':
      return { transform: (input, field) => passthroughTensor(input, field, model.input_shape), shape: undefined }
    default: {
      const unknown: never = adapter
      throw modelError(`preprocessing ${JSON.stringify(unknown)} is not an adapter`)
    }
  }
}

export function preprocessAll(model: AdapterModel, inputs: unknown[], field: (i: number) => string): Tensor[] {
  const { transform } = planPreprocess(model)
  return inputs.map((input, i) => transform(input, field(i)))
}

/** `{"data": number[], "shape": int[]}`, the data filling the shape, the shape fitting the model's. */
export function passthroughTensor(input: unknown, field: string, declared: number[] | null): Tensor {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) throw fieldError(field, 'must be a tensor {"data": [numbers], "shape": [sizes]}')
  const { data, shape } = input as Record<string, unknown>
  if (!Array.isArray(shape) || shape.length === 0 || !shape.every((d) => Number.isInteger(d) && d >= 0)) {
    throw fieldError(`${field}.shape`, 'must be a non-empty array of sizes (integers >= 0)')
  }
  if (!Array.isArray(data)) throw fieldError(`${field}.data`, 'must be an array of numbers')
  const bad = data.findIndex((v) => typeof v !== 'number' || !Number.isFinite(v) || Math.abs(v) > FLOAT32_MAX)
  if (bad >= 0) throw fieldError(`${field}.data.${bad}`, typeof data[bad] === 'number' && Number.isFinite(data[bad]) ? FLOAT32_MESSAGE : 'must be a number')
  const size = (shape as number[]).reduce((a, b) => a * b, 1)
  if (size !== data.length) throw fieldError(`${field}.data`, `${data.length} values do not fill shape ${showShape(shape)} (${size})`)
  if (declared && !fitsShape(shape, declared)) throw fieldError(`${field}.shape`, `${showShape(shape)} does not match the model's input shape ${showShape(declared)}`)
  return { data: data as number[], shape: shape as number[] }
}
