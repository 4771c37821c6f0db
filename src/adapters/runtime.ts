/**
 * The adapters port: business inputs -> tensors before inference, raw outputs -> business results after.
 * InProcessAdapters runs the transforms here; LambdaAdapters (lambda.ts) runs the same code in AWS Lambda.
 * adaptersFromEnv (config.ts) picks one.
 */
import { DomainError } from '../domain/errors.js'
import type { Tensor } from '../protocol/frames.js'
import { imagePlan } from './image.js'
import { ImagePool, type ImagePoolOptions } from './image-pool.js'
import { readOptions } from './options.js'
import { labelsProblem, planPostprocess, postprocessAll } from './postprocess.js'
import { planPreprocess, preprocessAll } from './preprocess.js'

/** What the adapters read of a model. */
export interface AdapterModel {
  model_id: string
  /** Declared model input shape, -1 = any size (e.g. [-1, 10] or [1, 3, 224, 224]). */
  input_shape: number[] | null
  output_shape: number[] | null
  /** JSON schema of the business input; tabular takes its feature names from it. */
  input_schema: Record<string, unknown> | null
  labels: string[] | null
  preprocessing: 'image_classification' | 'tabular' | 'text_tokens' | 'passthrough' | null
  postprocessing: 'top_k_labels' | 'binary_classification' | 'regression' | 'passthrough' | null
  /** Per-model settings (options.ts lists them and their defaults). */
  adapter_options: Record<string, unknown> | null
}

export interface Adapters {
  /** Business-format inputs -> tensors {data, shape} (shape with batch dim 1, fitting input_shape). `field(i)` names the input for error messages, e.g. 'input' or 'inputs.3'. */
  preprocess(model: AdapterModel, inputs: unknown[], field: (i: number) => string): Promise<Tensor[]>
  /** Raw output tensors -> business results. */
  postprocess(model: AdapterModel, outputs: Tensor[]): Promise<unknown[]>
  close?(): Promise<void>
}

/** The transforms run in this process; images are decoded on its worker threads (image-pool.ts). */
export class InProcessAdapters implements Adapters {
  private readonly images: ImagePool

  constructor(options: { image?: ImagePoolOptions } = {}) {
    this.images = new ImagePool(options.image)
  }

  async preprocess(model: AdapterModel, inputs: unknown[], field: (i: number) => string): Promise<Tensor[]> {
    if (model.preprocessing !== 'image_classification') return preprocessAll(model, inputs, field)
    const plan = imagePlan(model, readOptions(model.adapter_options))
    const settled = await Promise.allSettled(inputs.map((input, i) => this.images.tensor(input, field(i), plan)))
    // the first input that failed, as the in-process transform would name it
    const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected')
    if (failed) throw failed.reason
    return settled.map((r) => (r as PromiseFulfilledResult<Tensor>).value)
  }

  async postprocess(model: AdapterModel, outputs: Tensor[]): Promise<unknown[]> {
    return postprocessAll(model, outputs)
  }

  async close(): Promise<void> {
    await this.images.close()
  }
}

/**
 * Why this model's configuration cannot work with its adapters (what to set), or null. For model upload and
 * schema changes, to refuse a model that every inference would refuse.
 */
export function checkAdapterConfig(model: AdapterModel): string | null {
  try {
    planPreprocess(model)
    planPostprocess(model)
  } catch (error) {
    if (error instanceof DomainError) return error.message
    throw error
  }
  return labelsProblem(model)
}
