/**
 * tabular: `{"features": {"age": 30, "income": 5000}}` (or the flat `{"age": 30, "income": 5000}`) -> a
 * [1, n] tensor, the features in the model's order.
 */
import type { Tensor } from '../protocol/frames.js'
import { FLOAT32_MAX, FLOAT32_MESSAGE } from '../protocol/numbers.js'
import { fitsShape, fieldError, modelError, showShape, type AdapterOptions } from './options.js'
import type { AdapterModel } from './runtime.js'

export interface TabularPlan {
  features: string[]
  shape: number[]
}

export function tabularPlan(model: AdapterModel, options: AdapterOptions): TabularPlan {
  const features = options.features ?? schemaFeatures(model.input_schema)
  if (!features || features.length === 0) {
    throw modelError('has no feature names: tabular needs adapter_options.features (["age", "income", ...]) or an input_schema with properties')
  }
  const twice = features.find((f, i) => features.indexOf(f) !== i)
  if (twice) throw modelError(`feature "${twice}" is named twice`)
  const shape = [1, features.length]
  if (model.input_shape && !fitsShape(shape, model.input_shape)) {
    throw modelError(`input_shape ${showShape(model.input_shape)} does not take ${features.length} features as [1, ${features.length}]; set input_shape to [-1, ${features.length}] or fix the feature list`)
  }
  return { features, shape }
}

/** Keys of `properties.features.properties` when the schema describes the wrapped form, else of `properties`. */
function schemaFeatures(schema: Record<string, unknown> | null): string[] | undefined {
  const properties = objectAt(schema, 'properties')
  const wrapped = objectAt(objectAt(properties, 'features'), 'properties')
  const names = wrapped ?? properties
  return names ? Object.keys(names) : undefined
}

function objectAt(value: unknown, key: string): Record<string, unknown> | undefined {
  if (typeof value !== 'object' || value === null) return undefined
  const inner = (value as Record<string, unknown>)[key]
  return typeof inner === 'object' && inner !== null && !Array.isArray(inner) ? (inner as Record<string, unknown>) : undefined
}

export function tabularTensor(input: unknown, field: string, plan: TabularPlan): Tensor {
  if (!isObject(input)) throw fieldError(field, 'must be an object {"features": {"name": number, ...}}')
  const wrapped = isObject(input.features)
  const values = wrapped ? (input.features as Record<string, unknown>) : input
  const prefix = wrapped ? `${field}.features` : field
  const unknown = Object.keys(values).find((name) => !plan.features.includes(name))
  if (unknown !== undefined) throw fieldError(`${prefix}.${unknown}`, `unknown feature; the model takes ${listed(plan.features)}`)
  const data = plan.features.map((name) => {
    const value = values[name]
    if (value === undefined) throw fieldError(`${prefix}.${name}`, 'missing')
    if (typeof value !== 'number' || !Number.isFinite(value)) throw fieldError(`${prefix}.${name}`, `must be a number, got ${value === null ? 'null' : typeof value}`)
    if (Math.abs(value) > FLOAT32_MAX) throw fieldError(`${prefix}.${name}`, FLOAT32_MESSAGE)
    return value
  })
  return { data, shape: plan.shape }
}

const isObject = (value: unknown): value is Record<string, unknown> => typeof value === 'object' && value !== null && !Array.isArray(value)

/** At most 20 names, so a wide model does not make a huge message. */
const listed = (names: string[]) => (names.length <= 20 ? names.join(', ') : `${names.slice(0, 20).join(', ')}, ... (${names.length} in all)`)
