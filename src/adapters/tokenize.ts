/**
 * text_tokens: `{"text": "..."}` -> a [1, L] tensor of token ids, L the last dimension of input_shape. Words
 * and punctuation marks are the tokens; ids come from the model's vocabulary or, without one, from hashing.
 */
import type { Tensor } from '../protocol/frames.js'
import { fitsShape, fieldError, modelError, showShape, type AdapterOptions } from './options.js'
import type { AdapterModel } from './runtime.js'

const DEFAULT_VOCAB_SIZE = 30522
const PAD = 0
const UNK = 1
/** Ids below this are reserved by the hashing tokenizer: 0 pads, 1 is unknown. */
const RESERVED = 2

export interface TextPlan {
  length: number
  lowercase: boolean
  padId: number
  /** Word -> id; absent: hash the words. */
  vocabulary: Map<string, number> | undefined
  unkId: number
  vocabSize: number
  shape: number[]
}

export function textPlan(model: AdapterModel, options: AdapterOptions): TextPlan {
  const declared = model.input_shape
  const length = declared?.length === 2 ? (declared[1] as number) : -1
  if (!declared || length < 1) {
    throw modelError(`input_shape ${showShape(declared)}: text_tokens needs a fixed sequence length as the last of two dimensions; set input_shape, e.g. [1, 128]`)
  }
  const shape = [1, length]
  if (!fitsShape(shape, declared)) throw modelError(`input_shape ${showShape(declared)}: text_tokens sends one text per tensor; set the batch dimension to 1 or -1`)
  return {
    length,
    lowercase: options.lowercase ?? true,
    padId: options.pad_id ?? PAD,
    vocabulary: options.vocabulary ? vocabularyIds(options.vocabulary) : undefined,
    unkId: options.unk_id ?? UNK,
    vocabSize: options.vocab_size ?? DEFAULT_VOCAB_SIZE,
    shape,
  }
}

/** A word listed twice keeps its first index. */
function vocabularyIds(words: string[]): Map<string, number> {
  const ids = new Map<string, number>()
  words.forEach((word, id) => {
    if (!ids.has(word)) ids.set(word, id)
  })
  return ids
}

export function textTensor(input: unknown, field: string, plan: TextPlan): Tensor {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) throw fieldError(field, 'must be an object {"text": "..."}')
  const text = (input as Record<string, unknown>).text
  if (text === undefined) throw fieldError(`${field}.text`, 'required')
  if (typeof text !== 'string') throw fieldError(`${field}.text`, `must be a string, got ${text === null ? 'null' : typeof text}`)
  const ids = tokenize(text, plan.lowercase).slice(0, plan.length).map((word) => tokenId(word, plan))
  while (ids.length < plan.length) ids.push(plan.padId)
  return { data: ids, shape: plan.shape }
}

/** Runs of letters, digits and `_` are words; any other visible character is a token of its own. */
export function tokenize(text: string, lowercase: boolean): string[] {
  const normal = lowercase ? text.toLowerCase() : text
  return normal.match(/[\p{L}\p{M}\p{N}_]+|[^\s\p{L}\p{M}\p{N}_]/gu) ?? []
}

function tokenId(word: string, plan: TextPlan): number {
  if (plan.vocabulary) return plan.vocabulary.get(word) ?? plan.unkId
  return RESERVED + (fnv1a(word) % (plan.vocabSize - RESERVED))
}

/** 32-bit FNV-1a over the word's UTF-8 bytes: stable across processes and languages. */
export function fnv1a(word: string): number {
  let hash = 0x811c9dc5
  for (const byte of Buffer.from(word, 'utf8')) {
    hash ^= byte
    hash = Math.imul(hash, 0x01000193)
  }
  return hash >>> 0
}
