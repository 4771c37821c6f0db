import { createHash, randomUUID } from 'node:crypto'

/** Namespace of dcp's name-based event ids (a fixed random UUID). */
const NAMESPACE = Buffer.from('6f0e2c1a9b7d4e3f8a5c2d1e0f9b8a7c', 'hex')

/**
 * A deterministic UUID (version 5, RFC 9562) for the `index`-th event of the command with this idempotency
 * key: a retried command produces the same ids, and the store stores them once.
 */
export function eventIdFor(idempotencyKey: string, index: number): string {
  const hash = createHash('sha1').update(NAMESPACE).update(`${idempotencyKey}#${index}`).digest()
  hash[6] = (hash[6]! & 0x0f) | 0x50
  hash[8] = (hash[8]! & 0x3f) | 0x80
  const hex = hash.subarray(0, 16).toString('hex')
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20, 32)}`
}

export function newEventId(): string {
  return randomUUID()
}
