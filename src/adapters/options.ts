/**
 * `adapter_options`: the per-model settings the adapters read, one object shared by the pre- and the
 * post-processing adapter. Unknown keys are refused so that a typo (`topk`) does not silently fall back to a
 * default. A bad option is the model's mistake, reported as VALIDATION_ERROR with what to set.
 */
import { z } from 'zod'
import { DomainError } from '../domain/errors.js'

export const AdapterOptions = z.strictObject({
  /** image_classification: per-channel mean after scaling to [0,1] (default ImageNet's, or [0.5] for grayscale). */
  mean: z.array(z.number()).min(1).max(3).optional(),
  /** image_classification: per-channel standard deviation (default ImageNet's, or [0.5] for grayscale). */
  std: z.array(z.number().positive()).min(1).max(3).optional(),
  /** tabular: feature names in the model's input order (default: the keys of input_schema.properties). */
  features: z.array(z.string().min(1)).min(1).optional(),
  /** text_tokens: lowercase the text first (default true). */
  lowercase: z.boolean().optional(),
  /** text_tokens: the vocabulary, index = token id (default: a hashing tokenizer). */
  vocabulary: z.array(z.string()).min(1).optional(),
  /** text_tokens: id of a word missing from the vocabulary (default 1). */
  unk_id: z.number().int().min(0).optional(),
  /** text_tokens: id that pads a short text (default 0). */
  pad_id: z.number().int().min(0).optional(),
  /** text_tokens: ids of the hashing tokenizer, 0 and 1 reserved (default 30522). */
  vocab_size: z.number().int().min(3).max(2 ** 31).optional(),
  /** top_k_labels: predictions returned (default 5, at most the number of classes). */
  top_k: z.number().int().min(1).optional(),
  /** binary_classification: probability from which the positive label is chosen (default 0.5). */
  threshold: z.number().min(0).max(1).optional(),
})
export type AdapterOptions = z.infer<typeof AdapterOptions>

/** The model's adapter_options, checked; throws VALIDATION_ERROR naming the option. */
export function readOptions(options: Record<string, unknown> | null): AdapterOptions {
  const parsed = AdapterOptions.safeParse(options ?? {})
  if (parsed.success) return parsed.data
  const issue = parsed.error.issues[0]
  const where = issue?.path.length ? `.${issue.path.join('.')}` : ''
  throw modelError(`adapter_options${where}: ${issue?.message ?? 'invalid'}`)
}

/** The model's configuration cannot work with its adapter: the message says what to set. */
export function modelError(problem: string): DomainError {
  return new DomainError('VALIDATION_ERROR', `model ${problem}`)
}

/** Does `shape` fit the model's declared shape (-1: any size)? */
export function fitsShape(shape: number[], declared: number[]): boolean {
  return declared.length === shape.length && declared.every((d, i) => d === -1 || d === shape[i])
}

export const showShape = (shape: number[] | null) => (shape ? `[${shape.join(',')}]` : 'null')

/** A value is wrong where `field` says, e.g. `inputs.3.image` (the client's input) or `outputs.0` (the model's output). */
export function fieldError(field: string, message: string): DomainError {
  return new DomainError('VALIDATION_ERROR', `${field}: ${message}`)
}
