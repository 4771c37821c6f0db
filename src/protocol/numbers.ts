import { z } from 'zod'

/**
 * Is every element of the array a finite number (an integer with `int`, at least `min` when given)? One tight
 * loop: tensors hold thousands of values, and zod's `z.array(z.number())` checks each through its generic
 * machinery at several times the cost (a 1,024-input task's event or result frame was parsed at ~14 ns a
 * value, several times over on its way through the hub, the scheduler and the projections).
 */
export function isNumberArray(value: unknown, options: { int?: boolean; min?: number } = {}): value is number[] {
  if (!Array.isArray(value)) return false
  const min = options.min ?? -Infinity
  for (let i = 0; i < value.length; i++) {
    const x: unknown = value[i]
    if (typeof x !== 'number' || !Number.isFinite(x) || x < min || (options.int && !Number.isInteger(x))) return false
  }
  return true
}

/**
 * A zod schema for an array of finite numbers checked by `isNumberArray` (lengths by `min`/`max`). For
 * schemas no JSON Schema is generated from (device frames, stored events); the HTTP API keeps zod's own
 * arrays, which its OpenAPI document describes.
 */
export function numberArray(options: { int?: boolean; atLeast?: number; min?: number; max?: number } = {}) {
  const what = `an array of ${options.int ? 'integers' : 'numbers'}${options.atLeast !== undefined ? ` of at least ${options.atLeast}` : ''}`
  return z.custom<number[]>(
    (value) =>
      isNumberArray(value, { ...(options.int ? { int: true } : {}), ...(options.atLeast !== undefined ? { min: options.atLeast } : {}) }) &&
      value.length >= (options.min ?? 0) &&
      value.length <= (options.max ?? Infinity),
    { message: `expected ${what}${options.min !== undefined || options.max !== undefined ? `, ${options.min ?? 0} to ${options.max ?? 'any number of'} long` : ''}` },
  )
}
