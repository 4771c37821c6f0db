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
}

export type DecodeResult = { ok: true; data: Float64Array } | { ok: false; code: string; message: string }

export function decode(task: DecodeTask & { started?: MessagePort }): DecodeResult {
  task.started?.postMessage('started')
  try {
    const tensor = imageTensor(task.input, task.field, task.plan, task.maxPixels)
    // a typed array crosses back as one copy of its bytes, not value by value
    return { ok: true, data: Float64Array.from(tensor.data) }
  } catch (error) {
    if (error instanceof DomainError) return { ok: false, code: error.code, message: error.message }
    throw error
  }
}
