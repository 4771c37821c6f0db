/**
 * The AWS Lambda function, deployed twice: as dcmp-preprocess and as dcmp-postprocess (docs/adapters.md says
 * how). It runs the same transforms as InProcessAdapters. A client mistake is an answer
 * (`{"error": {"code", "message"}}`), so the caller can give the same 400 as in-process; anything else
 * throws, which Lambda reports as a function error.
 */
import type { z } from 'zod'
import { DomainError } from '../domain/errors.js'
import { postprocessAll } from './postprocess.js'
import { preprocessAll } from './preprocess.js'
import type { AdapterModel } from './runtime.js'
import { decodeTensor, encodeTensor, PostprocessRequest, PreprocessRequest, type PostprocessReply, type PreprocessReply } from './wire.js'

export async function handler(event: unknown): Promise<PreprocessReply | PostprocessReply> {
  try {
    const isPre = typeof event === 'object' && event !== null && 'inputs' in event
    return isPre ? preprocess(parse(PreprocessRequest, event)) : postprocess(parse(PostprocessRequest, event))
  } catch (error) {
    if (error instanceof DomainError) return { error: { code: error.code, message: error.message } }
    throw error
  }
}

/** An event we cannot read is the caller's bug, not the client's: it throws (a function error). */
function parse<T>(schema: z.ZodType<T>, event: unknown): T {
  const parsed = schema.safeParse(event)
  if (parsed.success) return parsed.data
  throw new TypeError(`not an adapter request: ${parsed.error.issues.map((i) => `${i.path.join('.') || 'event'}: ${i.message}`).join('; ')}`)
}

function preprocess(request: PreprocessRequest): PreprocessReply {
  const model: AdapterModel = { ...request.model, preprocessing: request.adapter, postprocessing: null }
  const tensors = preprocessAll(model, request.inputs, (i) => request.fields[i] ?? `inputs.${i}`)
  return { tensors: tensors.map(encodeTensor) }
}

function postprocess(request: PostprocessRequest): PostprocessReply {
  const model: AdapterModel = { ...request.model, preprocessing: null, postprocessing: request.adapter }
  return { results: postprocessAll(model, request.outputs.map(decodeTensor)) }
}
