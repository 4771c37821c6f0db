import { createHash, randomBytes, randomFillSync } from 'node:crypto'

const ALPHABET = 'abcdefghijklmnopqrstuvwxyz0123456789'
/** Random bytes drawn 4 KiB at a time (one call into the generator per ~500 ids, not one per id). */
const pool = Buffer.alloc(4096)
let used = pool.length

function randomByte(): number {
  if (used === pool.length) {
    randomFillSync(pool)
    used = 0
  }
  return pool[used++]!
}

/** A resource id in the spec's style: `<prefix>_<8 random lowercase letters or digits>` (~41 bits). */
export function newId(prefix: string, length = 8): string {
  let id = ''
  while (id.length < length) {
    const b = randomByte()
    if (b < 252) id += ALPHABET[b % 36] // 252 = 7 x 36: every character equally likely
  }
  return `${prefix}_${id}`
}

/** A secret of 256 random bits with a recognisable prefix, e.g. `dcp_k_<43 base64url characters>`. */
export function newSecret(prefix: string): string {
  return `${prefix}${randomBytes(32).toString('base64url')}`
}

/**
 * A resource id in `newId`'s form that is the same every time for one seed and prefix (the seed is random:
 * an idempotency claim's id, see `createdId` in idempotency.ts).
 */
export function derivedId(prefix: string, seed: string, length = 8): string {
  const bytes = createHash('sha256').update(`${prefix}\0${seed}`).digest()
  let id = ''
  for (let i = 0; id.length < length && i < bytes.length; i++) if (bytes[i]! < 252) id += ALPHABET[bytes[i]! % 36]
  return `${prefix}_${id}`
}
