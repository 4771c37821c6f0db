import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'
import type { ZodTypeProvider } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { DatasetError, parseDataset } from '../datasets/parse.js'
import { type DatasetDescription, datasetDecider, datasetStream } from '../domain/dataset.js'
import { DomainError } from '../domain/errors.js'
import { type DatasetRow, findDataset, findDatasetFile, listDatasets } from '../projections/datasets.js'
import { customerOf } from './auth.js'
import { execute, type Services } from './context.js'
import { claimUpload, createdId } from './idempotency.js'
import { loadState } from '../commands/handle-command.js'
import { readUpload, zodMessage } from './models.js'
import { pageQuery } from './pagination.js'
import { page, Timestamp } from './responses.js'

const UploadFields = z.object({
  name: z.string().trim().min(1).max(200).optional(),
  format: z.enum(['csv', 'jsonl']).optional().describe('default: from the file name (.csv, .jsonl or .ndjson), else csv'),
})
const DatasetParams = z.object({ id: z.string().min(1).max(80) })

const DatasetView = z.object({
  id: z.string(),
  name: z.string(),
  format: z.enum(['csv', 'jsonl']),
  size: z.number().int().describe('bytes of the file'),
  checksum: z.string().describe('sha256:<hex> of the file'),
  rows: z.number().int(),
  features: z.number().int().describe('features per row'),
  label_kind: z.enum(['class', 'value']).describe('class: labels are class indices 0..classes-1; value: a number to regress'),
  classes: z.number().int().describe('highest class index + 1 (0 for values)'),
  uploaded_at: Timestamp,
})
const Deleted = z.object({ id: z.string(), deleted: z.literal(true) })

/** The multipart body of `POST /datasets`, as `readUpload` and `UploadFields` take it. */
const UPLOAD_BODY = {
  required: true,
  content: {
    'multipart/form-data': {
      schema: {
        type: 'object',
        properties: {
          file: { type: 'string', format: 'binary', description: 'CSV with a header and a `label` column, or JSON lines {"features":[...],"label":n}' },
          name: { type: 'string', minLength: 1, maxLength: 200, description: 'default: the file name without its extension' },
          format: { type: 'string', enum: ['csv', 'jsonl'], description: 'default: from the file name (.csv, .jsonl or .ndjson), else csv' },
        },
        required: ['file'],
        additionalProperties: false,
      },
    },
  },
}

/** `/datasets`: training data (CSV with a header and a `label` column, or JSON lines `{"features":[...],"label":n}`). */
export const datasetRoutes: FastifyPluginAsync<{ services: Services }> = async (base, { services }) => {
  const app = base.withTypeProvider<ZodTypeProvider>()
  const config = { auth: 'api_key' as const }

  /** The dataset an earlier run of this upload created (read from its stream: it may be deleted since). */
  async function recoverDataset(request: FastifyRequest, reply: FastifyReply) {
    const dataset = (await loadState(services.store, datasetStream(createdId(request, 'ds')), datasetDecider))?.dataset
    if (!dataset || dataset.customer_id !== customerOf(request)) return undefined
    return reply.status(201).send(datasetView(dataset))
  }

  app.post('/datasets', {
    config: {
      ...config,
      idempotent: { upload: true, recover: recoverDataset },
      upload: true,
      success: { 201: 'The dataset' },
      requestBody: UPLOAD_BODY,
      links: {
        GetDataset: { operationId: 'getDataset', parameters: { id: '$response.body#/id' } },
        DeleteDataset: { operationId: 'deleteDataset', parameters: { id: '$response.body#/id' } },
        StartTraining: { operationId: 'startTraining', requestBody: { data_config: { type: 'dataset', dataset_id: '$response.body#/id' } } },
      },
    },
    schema: { operationId: 'createDataset', summary: 'Upload a training dataset (multipart/form-data: file, name, format)', tags: ['datasets'], consumes: ['multipart/form-data'], response: { 201: DatasetView } },
  }, async (request, reply) => {
    if (!request.isMultipart()) throw new DomainError('UNSUPPORTED_MEDIA_TYPE', 'send the dataset as multipart/form-data with the file in the "file" field')
    const customerId = customerOf(request)
    const { fields, blob, filename } = await readUpload(request, services, 'file')
    try {
      const replayed = await claimUpload(services, request, reply, { fields, file: blob && { name: filename, sha256: blob.sha256 } })
      if (replayed) {
        await blob?.discard()
        return replayed
      }
      if (!blob) throw new DomainError('VALIDATION_ERROR', 'file: a dataset file is required')
      const parsed = UploadFields.safeParse(fields)
      if (!parsed.success) throw new DomainError('VALIDATION_ERROR', zodMessage(parsed.error))
      const format = parsed.data.format ?? (/\.(jsonl|ndjson)$/i.test(filename ?? '') ? 'jsonl' : 'csv')
      let data
      try {
        data = parseDataset(await blob.read(), format)
      } catch (error) {
        if (error instanceof DatasetError) throw new DomainError('VALIDATION_ERROR', `file: ${error.message}`)
        throw error
      }
      let classes = 0
      for (const label of data.labels) classes = Math.max(classes, label + 1)
      const dataset: DatasetDescription = {
        dataset_id: createdId(request, 'ds'),
        customer_id: customerId,
        name: parsed.data.name ?? filename?.replace(/\.[^.]+$/, '') ?? 'dataset',
        format,
        size: blob.size,
        checksum: `sha256:${blob.sha256}`,
        rows: data.rows,
        features: data.columns,
        label_kind: data.labelKind,
        classes: data.labelKind === 'class' ? classes : 0,
        uploaded_at: services.now().toISOString(),
      }
      await blob.keep()
      await execute(services, datasetStream(dataset.dataset_id), datasetDecider, { type: 'UploadDataset', dataset }, { metadata: { customerId, occurredAt: dataset.uploaded_at } })
      return reply.status(201).send(datasetView(dataset))
    } catch (error) {
      await blob?.discard()
      throw error
    }
  })

  app.get('/datasets', { config, schema: { operationId: 'listDatasets', summary: 'Your datasets, newest first', tags: ['datasets'], querystring: pageQuery(), response: { 200: page('datasets', DatasetView) } } }, async (request) => {
    const { datasets, total } = await listDatasets(services.db, customerOf(request), request.query)
    return { datasets: datasets.map(datasetView), total, limit: request.query.limit, offset: request.query.offset }
  })

  app.get('/datasets/:id', { config, schema: { operationId: 'getDataset', summary: 'A dataset', tags: ['datasets'], params: DatasetParams, response: { 200: DatasetView } } }, async (request) => {
    const dataset = await findDataset(services.db, customerOf(request), request.params.id)
    if (!dataset) throw new DomainError('NOT_FOUND', `dataset ${request.params.id} not found`)
    return datasetView(dataset)
  })

  app.delete('/datasets/:id', { config, schema: { operationId: 'deleteDataset', summary: 'Delete a dataset (jobs training on it finish)', tags: ['datasets'], params: DatasetParams, response: { 200: Deleted } } }, async (request) => {
    const customerId = customerOf(request)
    const at = services.now().toISOString()
    await execute(services, datasetStream(request.params.id), datasetDecider, { type: 'DeleteDataset', customerId, at }, { metadata: { customerId, occurredAt: at } })
    return { id: request.params.id, deleted: true as const }
  })

  app.get('/sdk/datasets/:id', {
    config: { auth: 'sdk', produces: 'application/octet-stream' },
    schema: { operationId: 'downloadDataset', summary: 'Download a dataset (for a device training on it)', tags: ['sdk'], params: DatasetParams },
  }, async (request, reply) => {
    const deviceId = request.caller.keyId!
    const dataset = await findDatasetFile(services.db, request.params.id)
    if (!dataset) throw new DomainError('NOT_FOUND', `dataset ${request.params.id} not found`)
    if (!services.training.holdsDataset(deviceId, dataset.dataset_id)) throw new DomainError('FORBIDDEN', `device ${deviceId} trains no job on dataset ${dataset.dataset_id}`)
    return reply
      .header('content-type', 'application/octet-stream')
      .header('content-length', String(dataset.size))
      .header('x-checksum', dataset.checksum)
      .send(services.blobs.open(dataset.checksum.replace(/^sha256:/, '')))
  })
}

function datasetView(d: DatasetDescription | DatasetRow) {
  return { id: d.dataset_id, name: d.name, format: d.format, size: d.size, checksum: d.checksum, rows: d.rows, features: d.features, label_kind: d.label_kind, classes: d.classes, uploaded_at: d.uploaded_at }
}
