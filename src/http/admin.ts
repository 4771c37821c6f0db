import type { FastifyPluginAsync } from 'fastify'
import type { ZodTypeProvider } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { customerDecider, customerStream } from '../domain/customer.js'
import { DomainError } from '../domain/errors.js'
import { ReferencesBehindError } from '../projections/blob-references.js'
import { customerExists, listCustomers, listKeys } from '../projections/customers.js'
import { sha256 } from './auth.js'
import { execute, type Services } from './context.js'
import { newId, newSecret } from './ids.js'
import { NullableTimestamp, Timestamp } from './responses.js'
import { freeText } from './text.js'

export const API_KEY_PREFIX = 'dcp_k_'

const CustomerId = z.object({ id: z.string().min(1).max(64) })
const KeyParams = CustomerId.extend({ keyId: z.string().min(1).max(64) })

const ApiKeyShown = z.string().describe('the API key itself (X-API-Key): shown this once, never again')
const IssuedKey = z.object({ key_id: z.string(), api_key: ApiKeyShown, prefix: z.string().describe('the first characters of the key, to tell keys apart'), created_at: Timestamp })
const NewCustomer = z.object({ id: z.string(), name: z.string(), created_at: Timestamp, api_key: ApiKeyShown, key_id: z.string().describe("the first key's id") })
const Customers = z.object({
  customers: z.array(z.object({ id: z.string(), name: z.string(), created_at: Timestamp, active_keys: z.number().int().describe('API keys not revoked') })),
  total: z.number().int(),
})
const Keys = z.object({ keys: z.array(z.object({ key_id: z.string(), prefix: z.string(), created_at: Timestamp, revoked_at: NullableTimestamp.describe('null while the key works') })) })
/** Where a customer's id, and a key's, feed the key operations. */
const keyLinks = (customerId: string) => ({
  listApiKeys: { operationId: 'listApiKeys', parameters: { id: customerId } },
  issueApiKey: { operationId: 'issueApiKey', parameters: { id: customerId } },
  revokeApiKey: { operationId: 'revokeApiKey', parameters: { id: customerId, keyId: '$response.body#/key_id' } },
})

/** Operators' routes (`X-Admin-Key`): customers and their API keys, and blob collection. The spec lists none; these follow its style. */
export const adminRoutes: FastifyPluginAsync<{ services: Services }> = async (base, { services }) => {
  const app = base.withTypeProvider<ZodTypeProvider>()
  const config = { auth: 'admin' as const }

  /** Issues a key and returns it: the only time the key itself is ever shown. */
  async function issueKey(customerId: string) {
    const key = newSecret(API_KEY_PREFIX)
    const keyId = newId('key')
    const at = services.now().toISOString()
    const command = { type: 'IssueApiKey' as const, keyId, keyHash: sha256(key), prefix: key.slice(0, API_KEY_PREFIX.length + 6), at }
    await execute(services, customerStream(customerId), customerDecider, command, { metadata: { customerId, occurredAt: at } })
    return { key_id: keyId, api_key: key, prefix: command.prefix, created_at: at }
  }

  app.post('/admin/customers', {
    config: { ...config, success: { 201: 'The customer and its first API key' }, links: keyLinks('$response.body#/id') },
    schema: {
      summary: 'Create a customer and its first API key (shown once)',
      operationId: 'createCustomer',
      tags: ['admin'],
      body: z.object({ name: freeText(200) }),
      response: { 201: NewCustomer },
    },
  }, async (request, reply) => {
    const customerId = newId('cust')
    const at = services.now().toISOString()
    await execute(services, customerStream(customerId), customerDecider, { type: 'CreateCustomer', customerId, name: request.body.name, at }, {
      metadata: { customerId, occurredAt: at },
    })
    const key = await issueKey(customerId)
    return reply.status(201).send({ id: customerId, name: request.body.name, created_at: at, api_key: key.api_key, key_id: key.key_id })
  })

  app.get('/admin/customers', { config, schema: { summary: 'List customers', operationId: 'listCustomers', tags: ['admin'], response: { 200: Customers } } }, async () => {
    const customers = await listCustomers(services.db)
    return { customers: customers.map(({ customer_id, ...rest }) => ({ id: customer_id, ...rest })), total: customers.length }
  })

  app.post('/admin/customers/:id/keys', {
    config: { ...config, success: { 201: 'The new key' }, links: { revokeApiKey: keyLinks('$request.path.id').revokeApiKey } },
    schema: { summary: 'Issue another API key for a customer (shown once)', operationId: 'issueApiKey', tags: ['admin'], params: CustomerId, response: { 201: IssuedKey } },
  }, async (request, reply) => {
    if (!(await customerExists(services.db, request.params.id))) throw new DomainError('NOT_FOUND', `customer ${request.params.id} not found`)
    return reply.status(201).send(await issueKey(request.params.id))
  })

  app.get('/admin/customers/:id/keys', {
    config,
    schema: { summary: "List a customer's API keys (ids and prefixes, never the keys)", operationId: 'listApiKeys', tags: ['admin'], params: CustomerId, response: { 200: Keys } },
  }, async (request) => {
    if (!(await customerExists(services.db, request.params.id))) throw new DomainError('NOT_FOUND', `customer ${request.params.id} not found`)
    return { keys: await listKeys(services.db, request.params.id) }
  })

  app.delete('/admin/customers/:id/keys/:keyId', {
    config: { ...config, success: { 204: 'Revoked' } },
    schema: { summary: 'Revoke an API key; requests with it are refused at once', operationId: 'revokeApiKey', tags: ['admin'], params: KeyParams },
  }, async (request, reply) => {
    const at = services.now().toISOString()
    const { id, keyId } = request.params
    await execute(services, customerStream(id), customerDecider, { type: 'RevokeApiKey', keyId, at }, { metadata: { customerId: id, occurredAt: at } })
    return reply.status(204).send()
  })

  app.post('/admin/blobs/gc', {
    config,
    schema: {
      summary: 'Delete the stored files nothing refers to any more (deleted models and datasets, unfinished uploads) now, rather than at the next hourly run; answers what it freed',
      tags: ['admin'],
      operationId: 'collectBlobs',
      body: z.object({}).strict().nullish(),
      response: { 200: z.object({ scanned: z.number().int().describe('stored files looked at'), deleted: z.number().int().describe('files deleted (unfinished uploads included)'), freed_bytes: z.number().int() }) },
    },
  }, async () => {
    try {
      return await services.blobCollector.collect()
    } catch (error) {
      if (error instanceof ReferencesBehindError) throw new DomainError('SERVICE_UNAVAILABLE', `${error.message}: nothing collected, retry later`)
      throw error
    }
  })
}
