/**
 * The image pool's task (image-pool.ts), run in a worker thread: a business input `{"image": ...}` decoded,
 * resized and normalised into the model's tensor data. A client mistake comes back as a value (errors lose
 * their class crossing threads); anything else is thrown, a bug to report as such.
 */
import type { MessagePort } from 'node:worker_threads'
import { DomainError } from '../domain/errors.js'
import { type ImagePlan, imageTensor } from './image.js'

export interface DecodeTask {
  input: unknown
  field: string
  plan: ImagePlan
  maxPixels: number
  /** Share of the time a decoding thread may work (IMAGE_DECODE_DUTY); 1: no rests. */
  duty: number
}

export type DecodeResult = { ok: true; data: Float64Array } | { ok: false; code: string; message: string }

/**
 * A decoding thread works at most `duty` of the time: after an image that took d ms, the next waits until
 * d * (1 / duty - 1) ms have passed. Image batches get slower; the cores stay shared with the event loop and
 * the devices (a thread's nice value counts only within its process's scheduling group, and the devices run
 * in groups of their own).
 */
let restUntil = 0
const pause = new Int32Array(new SharedArrayBuffer(4))

export function decode(task: DecodeTask & { started?: MessagePort }): DecodeResult {
  const rest = restUntil - performance.now()
  if (rest > 0) Atomics.wait(pause, 0, 0, rest)
  task.started?.postMessage('started')
  const began = performance.now()
  try {
    const tensor = imageTensor(task.input, task.field, task.plan, task.maxPixels)
    // a typed array crosses back as one copy of its bytes, not value by value
    return { ok: true, data: Float64Array.from(tensor.data) }
  } catch (error) {
    if (error instanceof DomainError) return { ok: false, code: error.code, message: error.message }
    throw error
  } finally {
    const took = performance.now() - began
    restUntil = performance.now() + took * (1 / task.duty - 1)
  }
}
