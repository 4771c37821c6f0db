import { z } from 'zod'
import type { Decider } from './decider.js'
import { DomainError } from './errors.js'

/**
 * A customer (tenant) and its API keys. Keys are stored only as SHA-256 hashes: the key itself is shown
 * once, when issued, and never enters the log.
 */
export type CustomerCommand =
  | { type: 'CreateCustomer'; customerId: string; name: string; at: string }
  | { type: 'IssueApiKey'; keyId: string; keyHash: string; prefix: string; at: string }
  | { type: 'RevokeApiKey'; keyId: string; at: string }

const CustomerCreated = z.object({ type: z.literal('CustomerCreated'), data: z.object({ customer_id: z.string(), name: z.string(), created_at: z.string() }) })
const ApiKeyIssued = z.object({
  type: z.literal('ApiKeyIssued'),
  data: z.object({ customer_id: z.string(), key_id: z.string(), key_hash: z.string(), prefix: z.string(), created_at: z.string() }),
})
const ApiKeyRevoked = z.object({ type: z.literal('ApiKeyRevoked'), data: z.object({ customer_id: z.string(), key_id: z.string(), revoked_at: z.string() }) })
const CustomerEvent = z.discriminatedUnion('type', [CustomerCreated, ApiKeyIssued, ApiKeyRevoked])
export type CustomerEvent = z.infer<typeof CustomerEvent>
export const customerEventTypes = CustomerEvent.options.map((o) => o.shape.type.value)

export interface CustomerState {
  customerId: string | undefined
  name: string
  /** key id -> revoked? */
  keys: Map<string, boolean>
}

export const customerStream = (customerId: string) => `customer-${customerId}`

export const customerDecider: Decider<CustomerCommand, CustomerEvent, CustomerState> = {
  initialState: () => ({ customerId: undefined, name: '', keys: new Map() }),

  evolve(state, event) {
    switch (event.type) {
      case 'CustomerCreated':
        return { ...state, customerId: event.data.customer_id, name: event.data.name }
      case 'ApiKeyIssued':
        return { ...state, keys: new Map(state.keys).set(event.data.key_id, false) }
      case 'ApiKeyRevoked':
        return { ...state, keys: new Map(state.keys).set(event.data.key_id, true) }
    }
  },

  decide(command, state) {
    switch (command.type) {
      case 'CreateCustomer':
        if (state.customerId) throw new DomainError('CONFLICT', `customer ${command.customerId} already exists`)
        return [{ type: 'CustomerCreated', data: { customer_id: command.customerId, name: command.name, created_at: command.at } }]
      case 'IssueApiKey': {
        const customerId = requireCustomer(state)
        if (state.keys.has(command.keyId)) throw new DomainError('CONFLICT', `key ${command.keyId} already exists`)
        const data = { customer_id: customerId, key_id: command.keyId, key_hash: command.keyHash, prefix: command.prefix, created_at: command.at }
        return [{ type: 'ApiKeyIssued', data }]
      }
      case 'RevokeApiKey': {
        const customerId = requireCustomer(state)
        const revoked = state.keys.get(command.keyId)
        if (revoked === undefined) throw new DomainError('NOT_FOUND', `customer ${customerId} has no key ${command.keyId}`)
        if (revoked) return [] // revoking twice is not an error: the key is revoked either way
        return [{ type: 'ApiKeyRevoked', data: { customer_id: customerId, key_id: command.keyId, revoked_at: command.at } }]
      }
      default: {
        const unknown: never = command
        throw new Error(`unknown command ${JSON.stringify(unknown)}`)
      }
    }
  },

  parse: ({ type, data }) => CustomerEvent.parse({ type, data }),
}

function requireCustomer(state: CustomerState): string {
  if (!state.customerId) throw new DomainError('NOT_FOUND', 'customer not found')
  return state.customerId
}
