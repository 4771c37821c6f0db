import { spawnSync } from 'node:child_process'
import { type Test, t } from 'tap'
import { AdapterOptions } from '../../src/adapters/options.js'
import { testApp } from '../helpers/app.js'

type Schema = { type?: string; properties?: Record<string, Schema>; required?: string[]; oneOf?: Schema[]; anyOf?: Schema[]; additionalProperties?: unknown; items?: Schema; $ref?: string }
type Operation = { operationId?: string; parameters?: { name: string; in: string }[]; requestBody?: { content: Record<string, { schema: Schema }> }; responses: Record<string, { content?: Record<string, { schema: Schema }>; links?: Record<string, Link> }> }
type Link = { operationId: string; parameters?: Record<string, string>; requestBody?: unknown }
type Document = { openapi: string; paths: Record<string, Record<string, Operation>> }

/** The routes of models, datasets, inference, training and projects: each success body has its schema. */
const OWN = /^\/api\/v1\/(models|datasets|inference|training|projects|sdk\/datasets)(\/|$)/

async function documentOf(t: Test): Promise<Document> {
  const { app } = await testApp(t, { strictResponses: true })
  const response = await app.inject({ method: 'GET', url: '/api/v1/openapi.json' })
  t.equal(response.statusCode, 200)
  return response.json()
}

function operations(document: Document): [string, Operation][] {
  return Object.entries(document.paths).flatMap(([path, methods]) => Object.entries(methods).map(([method, operation]): [string, Operation] => [`${method.toUpperCase()} ${path}`, operation]))
}

/** The object forms a schema may take (each branch of a oneOf/anyOf). */
const forms = (schema: Schema): Schema[] => (schema.oneOf ?? schema.anyOf)?.flatMap(forms) ?? [schema]

/** The value a runtime expression's body pointer (`$response.body#/a/b`) names, in every form of the schema. */
function pointerIn(schema: Schema, pointer: string): boolean {
  const [head, ...rest] = pointer.split('/')
  // an array index: the pointer goes on in the array's items (a link from a list to one of its entries)
  if (/^\d+$/.test(head!)) return forms(schema).every((form) => form.type === 'array' && form.items !== undefined && (rest.length === 0 || pointerIn(form.items, rest.join('/'))))
  return forms(schema).every((form) => {
    const property = form.properties?.[head!]
    if (!property || !form.required?.includes(head!)) return false
    return rest.length === 0 || pointerIn(property, rest.join('/'))
  })
}

t.test('every success answer of the models, datasets, inference, training and projects routes has its schema', async (t) => {
  const document = await documentOf(t)
  const own = operations(document).filter(([name]) => OWN.test(name.split(' ')[1]!))
  t.ok(own.length >= 25, `${own.length} operations`)
  for (const [name, operation] of own) {
    const success = Object.entries(operation.responses).filter(([status]) => /^2\d\d$/.test(status))
    t.ok(success.length > 0, `${name} has a success status`)
    for (const [status, response] of success) {
      if (status === '204') {
        t.notOk(response.content, `${name} ${status} has no body`)
        continue
      }
      const [mediaType, content] = Object.entries(response.content ?? {})[0] ?? []
      t.ok(content?.schema, `${name} ${status} describes its body (${mediaType})`)
    }
  }
  const download = document.paths['/api/v1/sdk/datasets/{id}']!.get!.responses['200']!
  t.same(download.content, { 'application/octet-stream': { schema: { type: 'string', format: 'binary' } } }, 'a dataset download is a binary file')
})

t.test('operation ids are unique, and every link leads to one with fields its answer has', async (t) => {
  const document = await documentOf(t)
  const byId = new Map<string, Operation>()
  for (const [name, operation] of operations(document)) {
    if (!operation.operationId) continue
    t.notOk(byId.has(operation.operationId), `${operation.operationId} (${name}) is unique`)
    byId.set(operation.operationId, operation)
  }
  let links = 0
  for (const [name, operation] of operations(document)) {
    for (const [status, response] of Object.entries(operation.responses)) {
      for (const [linkName, link] of Object.entries(response.links ?? {})) {
        links++
        const where = `${name} ${status} ${linkName}`
        const target = byId.get(link.operationId)
        if (!target) {
          t.fail(`${where}: no operation ${link.operationId}`)
          continue
        }
        const schema = response.content?.['application/json']?.schema
        t.ok(schema, `${where}: the answer has a schema`)
        const expressions: string[] = []
        for (const [parameter, expression] of Object.entries(link.parameters ?? {})) {
          t.ok(target.parameters?.some((p) => p.name === parameter), `${where}: ${link.operationId} takes parameter ${parameter}`)
          expressions.push(expression)
        }
        if (link.requestBody !== undefined) {
          const body = target.requestBody?.content['application/json']?.schema
          t.ok(body, `${where}: ${link.operationId} takes a JSON body`)
          // every field the link sets is one the target's body has (in at least one of its forms)
          const check = (value: unknown, into: Schema, path: string) => {
            for (const [key, inner] of Object.entries(value as Record<string, unknown>)) {
              const property = forms(into).map((form) => form.properties?.[key]).find(Boolean)
              t.ok(property, `${where}: ${link.operationId}'s body has ${path}${key}`)
              if (typeof inner === 'string' && inner.startsWith('$')) expressions.push(inner)
              else if (inner && typeof inner === 'object' && property) check(inner, property, `${path}${key}.`)
            }
          }
          if (body) check(link.requestBody, body, '')
        }
        for (const expression of expressions) {
          // a value of the request itself (`$request.path.id`) is there by definition
          if (/^\$request\.(path|query|header)\.[A-Za-z_-]+$/.test(expression)) continue
          const pointer = /^\$response\.body#\/(.+)$/.exec(expression)?.[1]
          t.ok(pointer, `${where}: ${expression} is a response body pointer`)
          if (pointer && schema) t.ok(pointerIn(schema, pointer), `${where}: ${expression} is a field every ${status} answer has`)
        }
      }
    }
  }
  t.ok(links >= 20, `${links} links`)
  const createModel = document.paths['/api/v1/models']!.post!
  t.same(Object.keys(createModel.responses['201']!.links ?? {}).sort(), ['DeleteModel', 'GetModel', 'RunBatchInference', 'RunInference', 'StartTraining', 'UpdateModelSchema'])
})

t.test('the uploads document their multipart bodies, as the handlers take them', async (t) => {
  const document = await documentOf(t)
  const model = document.paths['/api/v1/models']!.post!.requestBody!
  t.match(model, { required: true })
  const modelForm = model.content['multipart/form-data']!.schema
  t.same(modelForm.required, ['model'])
  t.same(Object.keys(modelForm.properties!).sort(), ['adapter_options', 'format', 'input_schema', 'input_shape', 'labels', 'max_batch_size', 'max_queue_delay_ms', 'model', 'name', 'output_schema', 'output_shape', 'postprocessing', 'preprocessing', 'validation', 'validation_tolerance'])
  t.match(modelForm.properties!.model, { type: 'string', format: 'binary' })
  t.match(modelForm.properties!.format, { enum: ['onnx', 'torchscript'] })
  t.equal(modelForm.additionalProperties, false)
  const dataset = document.paths['/api/v1/datasets']!.post!.requestBody!.content['multipart/form-data']!.schema
  t.same(dataset.required, ['file'])
  t.same(Object.keys(dataset.properties!).sort(), ['file', 'format', 'name'])
  t.match(dataset.properties!.file, { type: 'string', format: 'binary' })
})

t.test('PATCH /models/:id/schema documents adapter_options by its keys; POST /training says a stream needs total_samples', async (t) => {
  const document = await documentOf(t)
  const patch = document.paths['/api/v1/models/{id}/schema']!.patch!.requestBody!.content['application/json']!.schema
  const options = forms(patch.properties!.adapter_options!).find((form) => form.type === 'object')!
  t.same(Object.keys(options.properties!).sort(), Object.keys(AdapterOptions.shape).sort())
  t.equal(options.additionalProperties, false, 'no key beyond those')
  const training = document.paths['/api/v1/training']!.post!.requestBody!.content['application/json']!.schema
  const data = forms(training.properties!.data_config!)
  const stream = data.find((form) => JSON.stringify(form.properties?.type).includes('stream'))!
  const fromDataset = data.find((form) => JSON.stringify(form.properties?.type).includes('dataset'))!
  t.ok(stream.required?.includes('total_samples'), 'a stream needs total_samples')
  t.notOk(stream.required?.includes('type'), 'stream is the default type')
  t.ok(fromDataset.required?.includes('dataset_id') && fromDataset.required.includes('type'), 'a dataset needs its id')
  t.notOk(fromDataset.required?.includes('total_samples'), "a dataset's samples default to its training rows")
})

t.test("the models' dynamic batching settings are documented: in every model answer (never null), the upload form and the PATCH body", async (t) => {
  const document = await documentOf(t)
  const json = (operation: Operation, status: string) => operation.responses[status]!.content!['application/json']!.schema
  const models = document.paths['/api/v1/models']!
  const answers: [string, Schema][] = [
    ['POST /models', json(models.post!, '201')],
    ['GET /models', json(models.get!, '200').properties!.models!.items!],
    ['GET /models/{id}', json(document.paths['/api/v1/models/{id}']!.get!, '200')],
    ['PATCH /models/{id}/schema', json(document.paths['/api/v1/models/{id}/schema']!.patch!, '200')],
  ]
  const bounds = { max_batch_size: [1, 4096, /default 32/], max_queue_delay_ms: [0, 10000, /default 0/] } as const
  for (const [where, schema] of answers) {
    for (const [field, [minimum, maximum, fallback]] of Object.entries(bounds)) {
      t.ok(schema.required?.includes(field), `${where}: ${field} is always there`)
      t.match(schema.properties![field], { type: 'integer', minimum, maximum, description: fallback }, `${where}: ${field}`)
      t.notOk((schema.properties![field] as { nullable?: boolean }).nullable, `${where}: ${field} is never null`)
    }
  }
  const form = models.post!.requestBody!.content['multipart/form-data']!.schema
  const patch = document.paths['/api/v1/models/{id}/schema']!.patch!.requestBody!.content['application/json']!.schema
  for (const [field, [minimum, maximum]] of Object.entries(bounds)) {
    t.match(form.properties![field], { type: 'string', description: new RegExp(`^JSON: dynamic batching: .*from ${minimum} to ${maximum}`) }, `upload form: ${field}`)
    t.match(patch.properties![field], { type: 'integer', minimum, maximum, nullable: true, description: /null: back to the default/ }, `PATCH body: ${field}`)
  }
})

const hasValidator = spawnSync('python3', ['-c', 'import openapi_spec_validator'], { encoding: 'utf8' }).status === 0
t.test('the document is valid OpenAPI (openapi-spec-validator)', { skip: !hasValidator && 'python3 with openapi-spec-validator is not installed' }, async (t) => {
  const document = await documentOf(t)
  const check = spawnSync('python3', ['-c', 'import json, sys; from openapi_spec_validator import validate; validate(json.load(sys.stdin)); print("valid")'], { input: JSON.stringify(document), encoding: 'utf8' })
  t.equal(check.status, 0, check.stderr.slice(-2000))
  t.match(check.stdout, /valid/)
})

t.test('as documented: a stream without total_samples, a dataset without its id and an unknown adapter option are 400s naming the field', async (t) => {
  const { app, customer } = await testApp(t, { strictResponses: true })
  const alice = await customer()
  const send = async (method: 'POST' | 'PATCH', url: string, payload: unknown) => (await app.inject({ method, url: `/api/v1${url}`, headers: { 'x-api-key': alice.key }, payload: payload as object })).json()
  const training = (data_config: unknown) => send('POST', '/training', { model_id: 'model_x', data_config, training_config: {} })
  t.match(await training({}), { error: { code: 'VALIDATION_ERROR', message: /data_config\.total_samples: required for a stream/ } })
  t.match(await training({ type: 'stream', batch_size: 8 }), { error: { code: 'VALIDATION_ERROR', message: /data_config\.total_samples: required for a stream/ } })
  t.match(await training({ type: 'dataset' }), { error: { code: 'VALIDATION_ERROR', message: /data_config\.dataset_id: required when type is "dataset"/ } })
  t.match(await training({ type: 'stream', total_samples: 'many' }), { error: { code: 'VALIDATION_ERROR', message: /data_config\.total_samples: .*number/ } })
  t.match(await training({ type: 'tabular', total_samples: 10 }), { error: { code: 'VALIDATION_ERROR', message: /data_config\.type/ } })
  // checked by the body's schema, before the model is looked up
  t.match(await send('PATCH', '/models/model_x/schema', { adapter_options: { topk: 3 } }), { error: { code: 'VALIDATION_ERROR', message: /adapter_options.*topk/ } })
  t.match(await send('PATCH', '/models/model_x/schema', { adapter_options: { top_k: 0 } }), { error: { code: 'VALIDATION_ERROR', message: /adapter_options\.top_k/ } })
  t.match(await send('PATCH', '/models/model_x/schema', { adapter_options: { top_k: 3 } }), { error: { code: 'NOT_FOUND' } })
})
