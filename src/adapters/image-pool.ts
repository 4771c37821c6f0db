/**
 * Image decoding off the main thread: PNG and JPEG decoding and resizing take tens of ms a megapixel, and an
 * image batch decoded on the event loop held the HTTP server and the device hub for everyone. A pool of
 * worker threads (piscina) decodes instead, each image within a pixel budget (checked from the header, before
 * anything is allocated) and a time budget (counted from when a thread starts on it, not while it waits for
 * one: a thread past it is terminated and replaced).
 */
import { availableParallelism } from 'node:os'
import { MessageChannel, type MessagePort } from 'node:worker_threads'
import { Piscina } from 'piscina'
import { DomainError } from '../domain/errors.js'
import type { Tensor } from '../protocol/frames.js'
import { type ImagePlan, MAX_PIXELS } from './image.js'
import type { DecodeResult, DecodeTask } from './image-worker.js'

export interface ImagePoolOptions {
  /** Worker threads at most (default: the cores less one, 1 to 4); started on demand, ended after 30 s idle. */
  threads?: number
  /** ms one image may take to decode once a thread runs it (default 10000). */
  timeoutMs?: number
  /** Pixels an image may have (default 25,000,000). */
  maxPixels?: number
  /** Share of the time a decoding thread may work, (0, 1] (default 0.5): it rests after each image in proportion. */
  duty?: number
}

export const IMAGE_DEFAULTS = {
  threads: Math.max(1, Math.min(4, availableParallelism() - 1)),
  timeoutMs: 10_000,
  maxPixels: MAX_PIXELS,
  duty: 0.5,
} as const

const WORKER = new URL('./image-worker.mjs', import.meta.url).href

export class ImagePool {
  private pool: Piscina<DecodeTask & { started: MessagePort }, DecodeResult> | undefined
  private readonly threads: number
  private readonly timeoutMs: number
  private readonly maxPixels: number
  private readonly duty: number

  constructor(options: ImagePoolOptions = {}) {
    this.threads = options.threads ?? IMAGE_DEFAULTS.threads
    this.timeoutMs = options.timeoutMs ?? IMAGE_DEFAULTS.timeoutMs
    this.maxPixels = options.maxPixels ?? IMAGE_DEFAULTS.maxPixels
    this.duty = options.duty ?? IMAGE_DEFAULTS.duty
  }

  /** The business input `{"image": ...}` -> the model's tensor, decoded on a worker thread. */
  async tensor(input: unknown, field: string, plan: ImagePlan): Promise<Tensor> {
    this.pool ??= new Piscina({ filename: WORKER, minThreads: 0, maxThreads: this.threads, idleTimeout: 30_000 })
    const abort = new AbortController()
    // the worker says when it starts on the image: the time budget counts from then
    const { port1, port2 } = new MessageChannel()
    let timer: NodeJS.Timeout | undefined
    port1.once('message', () => (timer = setTimeout(() => abort.abort(), this.timeoutMs)))
    try {
      const result = await this.pool.run({ input, field, plan, maxPixels: this.maxPixels, duty: this.duty, started: port2 }, { signal: abort.signal, transferList: [port2] })
      if (!result.ok) throw new DomainError(result.code, result.message)
      return { data: Array.from(result.data), shape: plan.shape }
    } catch (error) {
      if (abort.signal.aborted) throw new DomainError('TIMEOUT', `${field}.image: not decoded within ${this.timeoutMs} ms, the time one image may take; send a smaller image`)
      throw error
    } finally {
      clearTimeout(timer)
      port1.close()
    }
  }

  async close(): Promise<void> {
    await this.pool?.destroy()
    this.pool = undefined
  }
}
