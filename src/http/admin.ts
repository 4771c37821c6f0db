import type { FastifyPluginAsync } from 'fastify'
import type { ZodTypeProvider } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { customerDecider, customerStream } from '../domain/customer.js'
import { DomainError } from '../domain/errors.js'
import { customerExists, listCustomers, listKeys } from '../projections/customers.js'
import { sha256 } from './auth.js'
import { execute, type Services } from './context.js'
import { newId, newSecret } from './ids.js'
import { freeText } from './text.js'

export const API_KEY_PREFIX = 'dcp_k_'

const CustomerId = z.object({ id: z.string().min(1).max(64) })
const KeyParams = CustomerId.extend({ keyId: z.string().min(1).max(64) })

/** Operators' routes (`X-Admin-Key`): customers and their API keys. The spec lists none; these follow its style. */
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
    config: { ...config, success: { 201: 'The customer and its first API key' } },
    schema: {
      summary: 'Create a customer and its first API key (shown once)',
      tags: ['admin'],
      body: z.object({ name: freeText(200) }),
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

  app.get('/admin/customers', { config, schema: { summary: 'List customers', tags: ['admin'] } }, async () => {
    const customers = await listCustomers(services.db)
    return { customers: customers.map(({ customer_id, ...rest }) => ({ id: customer_id, ...rest })), total: customers.length }
  })

  app.post('/admin/customers/:id/keys', {
    config: { ...config, success: { 201: 'The new key' } },
    schema: { summary: 'Issue another API key for a customer (shown once)', tags: ['admin'], params: CustomerId },
  }, async (request, reply) => {
    if (!(await customerExists(services.db, request.params.id))) throw new DomainError('NOT_FOUND', `customer ${request.params.id} not found`)
    return reply.status(201).send(await issueKey(request.params.id))
  })

  app.get('/admin/customers/:id/keys', {
    config,
    schema: { summary: "List a customer's API keys (ids and prefixes, never the keys)", tags: ['admin'], params: CustomerId },
  }, async (request) => {
    if (!(await customerExists(services.db, request.params.id))) throw new DomainError('NOT_FOUND', `customer ${request.params.id} not found`)
    return { keys: await listKeys(services.db, request.params.id) }
  })

  app.delete('/admin/customers/:id/keys/:keyId', {
    config: { ...config, success: { 204: 'Revoked' } },
    schema: { summary: 'Revoke an API key; requests with it are refused at once', tags: ['admin'], params: KeyParams },
  }, async (request, reply) => {
    const at = services.now().toISOString()
    const { id, keyId } = request.params
    await execute(services, customerStream(id), customerDecider, { type: 'RevokeApiKey', keyId, at }, { metadata: { customerId: id, occurredAt: at } })
    return reply.status(204).send()
  })
}
