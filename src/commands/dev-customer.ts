import { customerDecider, customerStream } from '../domain/customer.js'
import type { EventStore, Position } from '../event-store/port.js'
import { handleCommand } from './handle-command.js'

/** The development customer and its key, the one the spec's examples use. Never created in production. */
export const DEV_CUSTOMER_ID = 'cust_default'
export const DEV_API_KEY = 'test-api-key'

/**
 * Creates the development customer with the key `test-api-key` unless it exists. Idempotency keys make a
 * restart a no-op, and a key revoked by an operator stays revoked. Returns the position to wait for.
 */
export async function ensureDevCustomer(store: EventStore, keyHash: string, at: string): Promise<Position> {
  const stream = customerStream(DEV_CUSTOMER_ID)
  const metadata = { customerId: DEV_CUSTOMER_ID, occurredAt: at }
  await handleCommand(store, stream, customerDecider, { type: 'CreateCustomer', customerId: DEV_CUSTOMER_ID, name: 'Development customer', at }, {
    idempotencyKey: 'dev-customer',
    metadata,
  })
  const issued = await handleCommand(store, stream, customerDecider, { type: 'IssueApiKey', keyId: 'key_default', keyHash, prefix: DEV_API_KEY.slice(0, 6), at }, {
    idempotencyKey: 'dev-customer-key',
    metadata,
  })
  return issued.position
}
