import type {} from '@fastify/multipart'
import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'
import type { ZodTypeProvider } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { checkAdapterConfig } from '../adapters/runtime.js'
import type { PendingBlob } from '../blobs/blob-store.js'
import { DomainError } from '../domain/errors.js'
import { inspectModelFile, ModelFileError, sniffFormat } from '../domain/model-file.js'
import {
  applyChanges,
  batchingOf,
  DEFAULT_MAX_BATCH_SIZE,
  DEFAULT_MAX_QUEUE_DELAY_MS,
  MAX_BATCH_SIZE_RANGE,
  MAX_QUEUE_DELAY_MS_RANGE,
  MaxBatchSize,
  MaxQueueDelayMs,
  MODEL_FORMATS,
  type ModelDescription,
  modelDecider,
  modelStream,
  POSTPROCESSING,
  PREPROCESSING,
  SchemaChanges,
} from '../domain/model.js'
import { MAX_JSON_DEPTH, NUL_MESSAGE, nulField, unfitJson } from '../event-store/storable.js'
import { findModel, listModels, storageUsed } from '../projections/models.js'
import { customerOf } from './auth.js'
import { execute, type Services } from './context.js'
import { claimUpload, createdId } from './idempotency.js'
import { loadState } from '../commands/handle-command.js'
import { checkJsonSchema } from './json-schema.js'
import { pageQuery } from './pagination.js'
import { VALIDATION_MODES } from '../domain/validation.js'
import { AdapterOptions } from '../adapters/options.js'
import { page, Timestamp } from './responses.js'

const Shape = z.array(z.number().int().min(-1)).min(1).max(16)
const JsonObject = z.record(z.string(), z.unknown())

/** A multipart field whose value is JSON. */
const json = <T extends z.ZodType>(schema: T) =>
  z
    .string()
    .transform((text, ctx) => {
      let value: unknown
      try {
        value = JSON.parse(text)
      } catch {
        ctx.addIssue({ code: 'custom', message: 'must be JSON' })
        return z.NEVER
      }
      // as for JSON bodies (errors.ts): deeper nesting would overflow the stack where it is stored
      if (unfitJson(value, 'field', MAX_JSON_DEPTH)?.problem === 'depth') {
        ctx.addIssue({ code: 'custom', message: `nested more than ${MAX_JSON_DEPTH} levels deep (arrays and objects within each other); dcp takes at most ${MAX_JSON_DEPTH}` })
        return z.NEVER
      }
      return value
    })
    .pipe(schema)

const UploadFields = z.strictObject({
  name: z.string().trim().min(1).max(200).optional(),
  format: z.enum(MODEL_FORMATS).optional(),
  input_shape: json(Shape).optional(),
  output_shape: json(Shape).optional(),
  input_schema: json(JsonObject).optional(),
  output_schema: json(JsonObject).optional(),
  labels: json(z.array(z.string().max(1000)).max(100_000)).optional(),
  preprocessing: z.enum(PREPROCESSING).optional(),
  postprocessing: z.enum(POSTPROCESSING).optional(),
  adapter_options: json(JsonObject).optional(),
  validation: z.enum(VALIDATION_MODES).optional(),
  validation_tolerance: json(z.number().min(0).max(1)).optional(),
  max_batch_size: json(MaxBatchSize).optional(),
  max_queue_delay_ms: json(MaxQueueDelayMs).optional(),
})

const ModelParams = z.object({ id: z.string().min(1).max(64) })

/** What the dynamic batching settings mean, as the OpenAPI document says it. */
const BATCH_SIZE_TEXT = `dynamic batching: the most single-input requests of this model (same customer, waiting together) merged into one device task, an integer from ${MAX_BATCH_SIZE_RANGE.min} to ${MAX_BATCH_SIZE_RANGE.max} (1: never merged)`
const QUEUE_DELAY_TEXT = `dynamic batching: milliseconds a queued single-input request may be held back, while a device is free, for others to merge with, an integer from ${MAX_QUEUE_DELAY_MS_RANGE.min} to ${MAX_QUEUE_DELAY_MS_RANGE.max} (0: never held back)`

/** The body of `PATCH /models/:id/schema`: adapter_options with only the keys the adapters read. */
const SchemaBody = SchemaChanges.extend({
  adapter_options: AdapterOptions.nullable().optional().describe('the adapters\' settings (docs/adapters.md); null clears them'),
  max_batch_size: MaxBatchSize.nullable().optional().describe(`${BATCH_SIZE_TEXT}; null: back to the default, ${DEFAULT_MAX_BATCH_SIZE}`),
  max_queue_delay_ms: MaxQueueDelayMs.nullable().optional().describe(`${QUEUE_DELAY_TEXT}; null: back to the default, ${DEFAULT_MAX_QUEUE_DELAY_MS}`),
}).strict()

const TensorInfo = z.object({ name: z.string(), shape: z.array(z.number().int()).nullable().describe('-1 where the model leaves a dimension open'), type: z.string().describe('element type, e.g. float32') })
/** A model as `modelView` serves it. */
const ModelView = z.object({
  id: z.string(),
  name: z.string(),
  format: z.enum(MODEL_FORMATS),
  size: z.number().int().describe('bytes of the model file'),
  checksum: z.string().describe('sha256:<hex> of the model file'),
  uploaded_at: Timestamp,
  updated_at: Timestamp,
  input_shape: z.array(z.number().int()).nullable().describe('the input tensor shape, -1 = any size'),
  output_shape: z.array(z.number().int()).nullable(),
  inputs: z.array(TensorInfo).describe('the input tensors the model file declares'),
  outputs: z.array(TensorInfo).describe('the output tensors the model file declares'),
  preprocessing: z.enum(PREPROCESSING).nullable(),
  postprocessing: z.enum(POSTPROCESSING).nullable(),
  input_schema: JsonObject.nullable().describe('JSON Schema the inputs are checked against'),
  output_schema: JsonObject.nullable(),
  labels: z.array(z.string()).nullable(),
  adapter_options: AdapterOptions.nullable(),
  validation: z.enum(VALIDATION_MODES).nullable().describe("how results from contributed devices are checked when a request or project does not say; null: none"),
  validation_tolerance: z.number().nullable().describe('relative tolerance within which two runs agree; null: 1e-4'),
  max_batch_size: MaxBatchSize.describe(`${BATCH_SIZE_TEXT}; the model's own, else the default ${DEFAULT_MAX_BATCH_SIZE}`),
  max_queue_delay_ms: MaxQueueDelayMs.describe(`${QUEUE_DELAY_TEXT}; the model's own, else the default ${DEFAULT_MAX_QUEUE_DELAY_MS}`),
})

/** The multipart body of `POST /models`, as `readUpload` and `UploadFields` take it (JSON fields as JSON text). */
const jsonField = (description: string) => ({ type: 'string', description: `JSON: ${description}` })
const UPLOAD_BODY = {
  required: true,
  content: {
    'multipart/form-data': {
      schema: {
        type: 'object',
        properties: {
          model: { type: 'string', format: 'binary', description: 'the model file (.onnx, or TorchScript .pt/.pth)' },
          name: { type: 'string', minLength: 1, maxLength: 200, description: 'default: the file name without its extension' },
          format: { type: 'string', enum: [...MODEL_FORMATS], description: 'default: from the file name, else from its content' },
          input_shape: jsonField('the input shape, an array of 1 to 16 integers, -1 = any size, e.g. [1, 10]'),
          output_shape: jsonField('the output shape, e.g. [1, 2]'),
          input_schema: jsonField('a JSON Schema (object) the inputs are checked against'),
          output_schema: jsonField('a JSON Schema (object) of the outputs'),
          labels: jsonField('the label names, an array of strings, e.g. ["cat","dog"]'),
          preprocessing: { type: 'string', enum: [...PREPROCESSING] },
          postprocessing: { type: 'string', enum: [...POSTPROCESSING] },
          adapter_options: jsonField(`the adapters' settings, an object with any of ${Object.keys(AdapterOptions.shape).join(', ')} (docs/adapters.md)`),
          validation: { type: 'string', enum: [...VALIDATION_MODES] },
          validation_tolerance: jsonField('a number from 0 to 1'),
          max_batch_size: jsonField(`${BATCH_SIZE_TEXT}; default ${DEFAULT_MAX_BATCH_SIZE}`),
          max_queue_delay_ms: jsonField(`${QUEUE_DELAY_TEXT}; default ${DEFAULT_MAX_QUEUE_DELAY_MS}`),
        },
        required: ['model'],
        additionalProperties: false,
      },
    },
  },
}

/** A model whose adapters cannot work with it (no feature names for tabular, no fixed image size...) is refused up front. */
function checkAdapters(model: ModelDescription): void {
  const problem = checkAdapterConfig({ ...model, adapter_options: model.adapter_options ?? null })
  if (problem) throw new DomainError('VALIDATION_ERROR', problem)
}

export function zodMessage(error: z.ZodError): string {
  return error.issues.map((i) => `${i.path.length ? i.path.join('.') : 'field'}: ${i.message}`).join('; ')
}

/** The API's view of a model. */
export function modelView(m: ModelDescription & { updated_at?: string }) {
  return {
    id: m.model_id,
    name: m.name,
    format: m.format,
    size: m.size,
    checksum: m.checksum,
    uploaded_at: m.uploaded_at,
    updated_at: m.updated_at ?? m.uploaded_at,
    input_shape: m.input_shape,
    output_shape: m.output_shape,
    inputs: m.inputs,
    outputs: m.outputs,
    preprocessing: m.preprocessing,
    postprocessing: m.postprocessing,
    input_schema: m.input_schema,
    output_schema: m.output_schema,
    labels: m.labels,
    adapter_options: m.adapter_options ?? null,
    validation: m.validation ?? null,
    validation_tolerance: m.validation_tolerance ?? null,
    ...batchingOf(m),
  }
}

/** A shape the client gave must agree with the one the file declares, where the file fixes a size. */
function checkShape(field: string, given: number[] | undefined, declared: number[] | null | undefined): number[] | null {
  if (!given) return declared ?? null
  if (!declared) return given
  const agrees = given.length === declared.length && given.every((d, i) => declared[i] === -1 || d === -1 || d === declared[i])
  if (!agrees) throw new DomainError('VALIDATION_ERROR', `${field}: ${JSON.stringify(given)} does not match the model's ${JSON.stringify(declared)}`)
  return given
}

function formatFromName(filename: string | undefined): 'onnx' | 'torchscript' | undefined {
  if (!filename) return undefined
  if (/\.onnx$/i.test(filename)) return 'onnx'
  if (/\.(pt|pth|torchscript)$/i.test(filename)) return 'torchscript'
  return undefined
}

/**
 * The multipart parser fails with plain errors on a malformed body (a missing boundary, a cut-off part):
 * those are the client's. Errors of our own, fastify's (with a code) and the system's (disk full) are not.
 */
function asClientError(error: unknown): unknown {
  if (error instanceof DomainError || !(error instanceof Error)) return error
  if ((error as { code?: string }).code || (error as { syscall?: string }).syscall) return error
  return new DomainError('VALIDATION_ERROR', `malformed multipart/form-data body: ${error.message}`)
}

/** Reads the multipart request: the file streams into the blob store, the fields are collected. */
/** A multipart upload: its fields, and its one file (in field `field`) written to the blob store, not yet kept. */
/**
 * A customer's models and datasets (not deleted) may take at most `maxStorageBytes` together; an upload
 * past it is refused with 413 QUOTA_EXCEEDED (and its file discarded).
 */
async function checkQuota(services: Services, customerId: string, field: string, size: number): Promise<void> {
  const used = await storageUsed(services.db, customerId)
  const quota = services.limits.maxStorageBytes
  if (used + size > quota) {
    throw new DomainError('QUOTA_EXCEEDED', `${field}: ${size} bytes would take your models and datasets to ${used + size} bytes, past your storage quota of ${quota} bytes; delete some first`)
  }
}

export async function readUpload(request: FastifyRequest, services: Services, field = 'model') {
  const fields: Record<string, string> = {}
  let blob: PendingBlob | undefined
  let filename: string | undefined
  const maxBytes = services.limits.maxModelBytes
  const limits = { fileSize: maxBytes, files: 1, fields: 20, fieldSize: 4 * 1024 * 1024, parts: 21 }
  try {
    for await (const part of request.parts({ limits })) {
      if (part.type === 'file') {
        if (part.fieldname !== field) throw new DomainError('VALIDATION_ERROR', `${part.fieldname}: unexpected file; send the file as the "${field}" field`)
        blob = await services.blobs.write(part.file, { maxBytes })
        if (part.file.truncated) throw new DomainError('PAYLOAD_TOO_LARGE', `${field}: larger than the limit of ${maxBytes} bytes`)
        await checkQuota(services, customerOf(request), field, blob.size)
        filename = part.filename
      } else {
        // a part sent as application/json comes parsed from the multipart parser: its JSON text again (a
        // string as it is), as a plain part gives it, for the fields that take JSON
        const value = typeof part.value === 'string' ? part.value : JSON.stringify(part.value)
        const nul = nulField({ [part.fieldname]: value }, 'body') // named as in a JSON body
        if (nul) throw new DomainError('VALIDATION_ERROR', `${nul}: ${NUL_MESSAGE}`)
        fields[part.fieldname] = value
      }
    }
  } catch (error) {
    await blob?.discard()
    throw asClientError(error)
  }
  return { fields, blob, filename }
}

/** `/models`: upload (multipart), list, get, delete, and patch the schema fields. Owned by one customer each. */
export const modelRoutes: FastifyPluginAsync<{ services: Services }> = async (base, { services }) => {
  const app = base.withTypeProvider<ZodTypeProvider>()
  const config = { auth: 'api_key' as const }

  /** The model an earlier run of this upload created (read from its stream: it may be deleted or changed since). */
  async function recoverModel(request: FastifyRequest, reply: FastifyReply) {
    const model = (await loadState(services.store, modelStream(createdId(request, 'model')), modelDecider))?.model
    if (!model || model.customer_id !== customerOf(request)) return undefined
    return reply.status(201).send(modelView(model))
  }

  app.post('/models', {
    config: {
      ...config,
      idempotent: { upload: true, recover: recoverModel },
      upload: true,
      success: { 201: 'The model' },
      requestBody: UPLOAD_BODY,
      links: {
        GetModel: { operationId: 'getModel', parameters: { id: '$response.body#/id' } },
        UpdateModelSchema: { operationId: 'updateModelSchema', parameters: { id: '$response.body#/id' } },
        DeleteModel: { operationId: 'deleteModel', parameters: { id: '$response.body#/id' } },
        RunInference: { operationId: 'runInference', requestBody: { model_id: '$response.body#/id' } },
        RunBatchInference: { operationId: 'runBatchInference', requestBody: { model_id: '$response.body#/id' } },
        StartTraining: { operationId: 'startTraining', requestBody: { model_id: '$response.body#/id' } },
      },
    },
    schema: {
      operationId: 'createModel',
      summary: 'Upload a model (multipart/form-data: model file, name, format, input_shape, output_shape, input_schema, output_schema, labels, preprocessing, postprocessing, adapter_options, validation, validation_tolerance, max_batch_size, max_queue_delay_ms)',
      tags: ['models'],
      consumes: ['multipart/form-data'],
      response: { 201: ModelView },
    },
  }, async (request, reply) => {
    if (!request.isMultipart()) throw new DomainError('UNSUPPORTED_MEDIA_TYPE', 'send the model as multipart/form-data with the file in the "model" field')
    const customerId = customerOf(request)
    const { fields, blob, filename } = await readUpload(request, services)
    try {
      const replayed = await claimUpload(services, request, reply, { fields, file: blob && { name: filename, sha256: blob.sha256 } })
      if (replayed) {
        await blob?.discard()
        return replayed
      }
      if (!blob) throw new DomainError('VALIDATION_ERROR', 'model: a model file is required')
      const parsed = UploadFields.safeParse(fields)
      if (!parsed.success) throw new DomainError('VALIDATION_ERROR', zodMessage(parsed.error))
      const input = parsed.data
      checkJsonSchema('input_schema', input.input_schema)
      checkJsonSchema('output_schema', input.output_schema)
      const bytes = await blob.read()
      const format = input.format ?? formatFromName(filename) ?? sniffFormat(bytes)
      let info
      try {
        info = inspectModelFile(bytes, format)
      } catch (error) {
        if (error instanceof ModelFileError) throw new DomainError('VALIDATION_ERROR', `model: ${error.message}`)
        throw error
      }
      const model: ModelDescription = {
        model_id: createdId(request, 'model'),
        customer_id: customerId,
        name: input.name ?? filename?.replace(/\.[^.]+$/, '') ?? 'model',
        format,
        size: blob.size,
        checksum: `sha256:${blob.sha256}`,
        input_shape: checkShape('input_shape', input.input_shape, info.inputs[0]?.shape),
        output_shape: checkShape('output_shape', input.output_shape, info.outputs[0]?.shape),
        inputs: info.inputs,
        outputs: info.outputs,
        input_schema: input.input_schema ?? null,
        output_schema: input.output_schema ?? null,
        labels: input.labels ?? null,
        preprocessing: input.preprocessing ?? null,
        postprocessing: input.postprocessing ?? null,
        adapter_options: input.adapter_options ?? null,
        validation: input.validation ?? null,
        validation_tolerance: input.validation_tolerance ?? null,
        max_batch_size: input.max_batch_size ?? null,
        max_queue_delay_ms: input.max_queue_delay_ms ?? null,
        uploaded_at: services.now().toISOString(),
      }
      checkAdapters(model)
      await blob.keep()
      await execute(services, modelStream(model.model_id), modelDecider, { type: 'UploadModel', model }, {
        metadata: { customerId, occurredAt: model.uploaded_at },
      })
      return reply.status(201).send(modelView(model))
    } catch (error) {
      await blob?.discard()
      throw error
    }
  })

  app.get('/models', { config, schema: { operationId: 'listModels', summary: 'List your models', tags: ['models'], querystring: pageQuery(), response: { 200: page('models', ModelView) } } }, async (request) => {
    const { models, total } = await listModels(services.db, customerOf(request), request.query)
    return { models: models.map(modelView), total, limit: request.query.limit, offset: request.query.offset }
  })

  app.get('/models/:id', { config, schema: { operationId: 'getModel', summary: 'Get a model', tags: ['models'], params: ModelParams, response: { 200: ModelView } } }, async (request) => {
    const model = await findModel(services.db, customerOf(request), request.params.id)
    if (!model) throw new DomainError('NOT_FOUND', `model ${request.params.id} not found`)
    return modelView(model)
  })

  app.delete('/models/:id', {
    config: { ...config, success: { 204: 'Deleted' } },
    schema: { operationId: 'deleteModel', summary: 'Delete a model (new inference on it is refused; work already queued or running finishes)', tags: ['models'], params: ModelParams },
  }, async (request, reply) => {
    const customerId = customerOf(request)
    const at = services.now().toISOString()
    await execute(services, modelStream(request.params.id), modelDecider, { type: 'DeleteModel', customerId, at }, { metadata: { customerId, occurredAt: at } })
    return reply.status(204).send()
  })

  app.patch('/models/:id/schema', {
    config,
    schema: {
      operationId: 'updateModelSchema',
      summary: 'Change input/output schema, labels, adapters, validation or batching settings; only the fields given change (null clears one)',
      tags: ['models'],
      params: ModelParams,
      body: SchemaBody,
      response: { 200: ModelView },
    },
  }, async (request) => {
    const customerId = customerOf(request)
    checkJsonSchema('input_schema', request.body.input_schema)
    checkJsonSchema('output_schema', request.body.output_schema)
    const current = await findModel(services.db, customerId, request.params.id)
    if (current) checkAdapters(applyChanges(current, request.body))
    const at = services.now().toISOString()
    const result = await execute(services, modelStream(request.params.id), modelDecider, { type: 'UpdateModelSchema', customerId, changes: request.body, at }, {
      metadata: { customerId, occurredAt: at },
    })
    return modelView({ ...result.state.model!, updated_at: at })
  })
}
