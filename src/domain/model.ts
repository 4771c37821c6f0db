import { z } from 'zod'
import type { Decider } from './decider.js'
import { VALIDATION_MODES } from './validation.js'
import { DomainError } from './errors.js'

/** The built-in adapters a model may name (their transforms come with inference). */
export const PREPROCESSING = ['image_classification', 'tabular', 'text_tokens', 'passthrough'] as const
export const POSTPROCESSING = ['top_k_labels', 'binary_classification', 'regression', 'passthrough'] as const
export const MODEL_FORMATS = ['onnx', 'torchscript'] as const

/** A tensor dimension: a size, or -1 where the model leaves it open (a dynamic batch size). */
const Shape = z.array(z.number().int().min(-1))
const Tensor = z.object({ name: z.string(), shape: Shape.nullable(), type: z.string() })
export type TensorInfo = z.infer<typeof Tensor>
const JsonObject = z.record(z.string(), z.unknown())

/**
 * Dynamic batching (issue #23): the most single-input requests of a model the dispatcher merges into one
 * device task (1: never merged), and how long a queued one may be held back, while a device is free, for
 * others to merge with (0: never held back; Triton's max_queue_delay_microseconds). A model's own null
 * means the default applies.
 */
export const DEFAULT_MAX_BATCH_SIZE = 32
export const MAX_BATCH_SIZE_RANGE = { min: 1, max: 4096 } as const
export const DEFAULT_MAX_QUEUE_DELAY_MS = 0
export const MAX_QUEUE_DELAY_MS_RANGE = { min: 0, max: 10_000 } as const

/** An integer within `range`, refused with one message that says the range. */
function boundedInt({ min, max }: { min: number; max: number }) {
  const error = `must be an integer from ${min} to ${max}`
  return z.number({ error }).int({ error, abort: true }).min(min, { error, abort: true }).max(max, { error })
}
export const MaxBatchSize = boundedInt(MAX_BATCH_SIZE_RANGE)
export const MaxQueueDelayMs = boundedInt(MAX_QUEUE_DELAY_MS_RANGE)

export const ModelDescription = z.object({
  model_id: z.string(),
  customer_id: z.string(),
  name: z.string(),
  format: z.enum(MODEL_FORMATS),
  size: z.number().int(),
  checksum: z.string(),
  input_shape: Shape.nullable(),
  output_shape: Shape.nullable(),
  inputs: z.array(Tensor),
  outputs: z.array(Tensor),
  input_schema: JsonObject.nullable(),
  output_schema: JsonObject.nullable(),
  labels: z.array(z.string()).nullable(),
  preprocessing: z.enum(PREPROCESSING).nullable(),
  postprocessing: z.enum(POSTPROCESSING).nullable(),
  /** Per-model settings of its adapters (docs/adapters.md), e.g. `top_k`, `threshold`, `vocabulary`, `mean`. */
  adapter_options: JsonObject.nullable().default(null),
  /** How results are checked when a request or project does not say (src/domain/validation.ts); null: the default. */
  validation: z.enum(VALIDATION_MODES).nullable().default(null),
  /** Relative tolerance within which two runs' outputs agree; null: the default (1e-4). */
  validation_tolerance: z.number().min(0).max(1).nullable().default(null),
  /** Dynamic batching; null (and absent, in events recorded before these existed): the default. */
  max_batch_size: MaxBatchSize.nullable().default(null),
  max_queue_delay_ms: MaxQueueDelayMs.nullable().default(null),
  uploaded_at: z.string(),
})
export type ModelDescription = z.infer<typeof ModelDescription>

/** The fields `PATCH /models/:id/schema` may change; absent means unchanged, null clears. */
export const SchemaChanges = z.object({
  input_schema: JsonObject.nullable().optional(),
  output_schema: JsonObject.nullable().optional(),
  labels: z.array(z.string()).nullable().optional(),
  preprocessing: z.enum(PREPROCESSING).nullable().optional(),
  postprocessing: z.enum(POSTPROCESSING).nullable().optional(),
  adapter_options: JsonObject.nullable().optional(),
  validation: z.enum(VALIDATION_MODES).nullable().optional(),
  validation_tolerance: z.number().min(0).max(1).nullable().optional(),
  max_batch_size: MaxBatchSize.nullable().optional(),
  max_queue_delay_ms: MaxQueueDelayMs.nullable().optional(),
})
export type SchemaChanges = z.infer<typeof SchemaChanges>

const ModelUploaded = z.object({ type: z.literal('ModelUploaded'), data: ModelDescription })
const ModelSchemaUpdated = z.object({
  type: z.literal('ModelSchemaUpdated'),
  data: z.object({ model_id: z.string(), customer_id: z.string(), changes: SchemaChanges, updated_at: z.string() }),
})
const ModelDeleted = z.object({ type: z.literal('ModelDeleted'), data: z.object({ model_id: z.string(), customer_id: z.string(), deleted_at: z.string() }) })
const ModelEvent = z.discriminatedUnion('type', [ModelUploaded, ModelSchemaUpdated, ModelDeleted])
export type ModelEvent = z.infer<typeof ModelEvent>
export const modelEventTypes = ModelEvent.options.map((o) => o.shape.type.value)

export type ModelCommand =
  | { type: 'UploadModel'; model: ModelDescription }
  | { type: 'UpdateModelSchema'; customerId: string; changes: SchemaChanges; at: string }
  | { type: 'DeleteModel'; customerId: string; at: string }

export interface ModelState {
  model: ModelDescription | undefined
  deleted: boolean
}

export const modelStream = (modelId: string) => `model-${modelId}`

export const modelDecider: Decider<ModelCommand, ModelEvent, ModelState> = {
  initialState: () => ({ model: undefined, deleted: false }),

  evolve(state, event) {
    switch (event.type) {
      case 'ModelUploaded':
        return { model: event.data, deleted: false }
      case 'ModelSchemaUpdated':
        return state.model ? { ...state, model: applyChanges(state.model, event.data.changes) } : state
      case 'ModelDeleted':
        return { ...state, deleted: true }
    }
  },

  decide(command, state) {
    switch (command.type) {
      case 'UploadModel':
        if (state.model) throw new DomainError('CONFLICT', `model ${command.model.model_id} already exists`)
        return [{ type: 'ModelUploaded', data: command.model }]
      case 'UpdateModelSchema': {
        const model = owned(state, command.customerId)
        return [{ type: 'ModelSchemaUpdated', data: { model_id: model.model_id, customer_id: model.customer_id, changes: command.changes, updated_at: command.at } }]
      }
      case 'DeleteModel': {
        const model = owned(state, command.customerId)
        return [{ type: 'ModelDeleted', data: { model_id: model.model_id, customer_id: model.customer_id, deleted_at: command.at } }]
      }
      default: {
        const unknown: never = command
        throw new Error(`unknown command ${JSON.stringify(unknown)}`)
      }
    }
  },

  parse: ({ type, data }) => ModelEvent.parse({ type, data }),
}

export function applyChanges(model: ModelDescription, changes: SchemaChanges): ModelDescription {
  const defined = Object.entries(changes).filter(([, v]) => v !== undefined)
  return { ...model, ...Object.fromEntries(defined) }
}

/** The batching settings that apply to a model: its own, or the defaults where it leaves them null. */
export function batchingOf(model: Pick<ModelDescription, 'max_batch_size' | 'max_queue_delay_ms'>) {
  return { max_batch_size: model.max_batch_size ?? DEFAULT_MAX_BATCH_SIZE, max_queue_delay_ms: model.max_queue_delay_ms ?? DEFAULT_MAX_QUEUE_DELAY_MS }
}

/** Another customer's model is reported as missing: its existence is not theirs to learn. */
function owned(state: ModelState, customerId: string): ModelDescription {
  if (!state.model || state.deleted || state.model.customer_id !== customerId) throw new DomainError('NOT_FOUND', 'model not found')
  return state.model
}
