/**
 * What LambdaAdapters and the Lambda handler send each other, as zod schemas. Tensors travel as base64
 * float64 (little-endian): exact, and under half the bytes of JSON numbers, which matters under Lambda's
 * 6 MB payload limit (a 3x224x224 image tensor is 1.6 MB this way, ~3 MB as JSON).
 */
import { z } from 'zod'
import { POSTPROCESSING, PREPROCESSING } from '../domain/model.js'
import type { Tensor } from '../protocol/frames.js'
import type { AdapterModel } from './runtime.js'

export const WireTensor = z.object({ shape: z.array(z.number().int().min(0)).min(1), f64: z.string() })
export type WireTensor = z.infer<typeof WireTensor>

const Json = z.record(z.string(), z.unknown())
/** The model fields the adapters read; the adapter itself is named on the request. */
const WireModel = z.object({
  model_id: z.string(),
  input_shape: z.array(z.number().int()).nullable(),
  output_shape: z.array(z.number().int()).nullable(),
  input_schema: Json.nullable(),
  labels: z.array(z.string()).nullable(),
  adapter_options: Json.nullable(),
})

export const PreprocessRequest = z.object({
  adapter: z.enum(PREPROCESSING),
  model: WireModel,
  inputs: z.array(z.unknown()),
  /** Each input's name for error messages, e.g. `inputs.3`. */
  fields: z.array(z.string()),
})
export type PreprocessRequest = z.infer<typeof PreprocessRequest>

export const PostprocessRequest = z.object({ adapter: z.enum(POSTPROCESSING), model: WireModel, outputs: z.array(WireTensor) })
export type PostprocessRequest = z.infer<typeof PostprocessRequest>

/** A client mistake (or a model configuration the adapter refuses): an answer, not a function error. */
const ErrorReply = z.object({ error: z.object({ code: z.string(), message: z.string() }) })
export const PreprocessReply = z.union([z.object({ tensors: z.array(WireTensor) }), ErrorReply])
export type PreprocessReply = z.infer<typeof PreprocessReply>
export const PostprocessReply = z.union([z.object({ results: z.array(z.unknown()) }), ErrorReply])
export type PostprocessReply = z.infer<typeof PostprocessReply>

export function wireModel(model: AdapterModel): z.infer<typeof WireModel> {
  const { model_id, input_shape, output_shape, input_schema, labels, adapter_options } = model
  return { model_id, input_shape, output_shape, input_schema, labels, adapter_options }
}

export function encodeTensor(tensor: Tensor): WireTensor {
  const bytes = Buffer.alloc(tensor.data.length * 8)
  tensor.data.forEach((v, i) => bytes.writeDoubleLE(v, i * 8))
  return { shape: tensor.shape, f64: bytes.toString('base64') }
}

export function decodeTensor(wire: WireTensor): Tensor {
  const bytes = Buffer.from(wire.f64, 'base64')
  if (bytes.length % 8 !== 0) throw new Error(`tensor data of ${bytes.length} bytes is not float64`)
  const data = Array.from({ length: bytes.length / 8 }, (_, i) => bytes.readDoubleLE(i * 8))
  return { data, shape: wire.shape }
}

/** Bytes of encodeTensor's JSON for a tensor of `values` values and this shape. */
export function wireTensorBytes(values: number, shape: number[]): number {
  return Math.ceil((values * 8) / 3) * 4 + JSON.stringify(shape).length + '{"shape":,"f64":""}'.length
}
