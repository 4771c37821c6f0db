import { z } from 'zod'

/**
 * The largest float32 (3.4028234663852886e38). Tensors are float32 on the devices: a value beyond it becomes
 * Infinity there, and the results NaN (sent back as JSON null). Inputs beyond it are refused where they come in.
 */
export const FLOAT32_MAX = 3.4028234663852886e38
export const FLOAT32_MESSAGE = 'must be within the float32 range (±3.4028235e38)'

/**
 * Is every element of the array a finite number (an integer with `int`, at least `min` when given, within
 * ±FLOAT32_MAX with `float32`)? One tight
 * loop: tensors hold thousands of values, and zod's `z.array(z.number())` checks each through its generic
 * machinery at several times the cost (a 1,024-input task's event or result frame was parsed at ~14 ns a
 * value, several times over on its way through the hub, the scheduler and the projections).
 */
export function isNumberArray(value: unknown, options: { int?: boolean; min?: number; float32?: boolean } = {}): value is number[] {
  if (!Array.isArray(value)) return false
  const min = options.min ?? -Infinity
  const limit = options.float32 ? FLOAT32_MAX : Infinity
  for (let i = 0; i < value.length; i++) {
    const x: unknown = value[i]
    if (typeof x !== 'number' || !Number.isFinite(x) || x < min || x > limit || x < -limit || (options.int && !Number.isInteger(x))) return false
  }
  return true
}

/** Where (the index) and why an array is not one `isNumberArray` takes with these options; undefined when it is. */
export function numberArrayProblem(value: unknown, options: { float32?: boolean } = {}): string | undefined {
  if (!Array.isArray(value)) return 'not an array'
  for (let i = 0; i < value.length; i++) {
    const x: unknown = value[i]
    if (typeof x !== 'number' || !Number.isFinite(x)) return `value ${i}: ${x === null ? 'null (NaN or Infinity on the device)' : `not a finite number (${typeof x})`}`
    if (options.float32 && (x > FLOAT32_MAX || x < -FLOAT32_MAX)) return `value ${i}: ${x} is out of float32 range`
  }
  return undefined
}

/**
 * A zod schema for an array of finite numbers checked by `isNumberArray` (lengths by `min`/`max`). For
 * schemas no JSON Schema is generated from (device frames, stored events); the HTTP API keeps zod's own
 * arrays, which its OpenAPI document describes.
 */
export function numberArray(options: { int?: boolean; atLeast?: number; min?: number; max?: number; float32?: boolean } = {}) {
  const what = `an array of ${options.int ? 'integers' : options.float32 ? 'float32 numbers' : 'numbers'}${options.atLeast !== undefined ? ` of at least ${options.atLeast}` : ''}`
  return z.custom<number[]>(
    (value) =>
      isNumberArray(value, { ...(options.int ? { int: true } : {}), ...(options.float32 ? { float32: true } : {}), ...(options.atLeast !== undefined ? { min: options.atLeast } : {}) }) &&
      value.length >= (options.min ?? 0) &&
      value.length <= (options.max ?? Infinity),
    { message: `expected ${what}${options.min !== undefined || options.max !== undefined ? `, ${options.min ?? 0} to ${options.max ?? 'any number of'} long` : ''}` },
  )
}
