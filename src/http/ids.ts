import { randomBytes } from 'node:crypto'

const ALPHABET = 'abcdefghijklmnopqrstuvwxyz0123456789'

/** A resource id in the spec's style: `<prefix>_<8 random lowercase letters or digits>` (~41 bits). */
export function newId(prefix: string, length = 8): string {
  const bytes = randomBytes(length)
  let id = ''
  for (const b of bytes) id += ALPHABET[b % ALPHABET.length]
  return `${prefix}_${id}`
}

/** A secret of 256 random bits with a recognisable prefix, e.g. `dcp_k_<43 base64url characters>`. */
export function newSecret(prefix: string): string {
  return `${prefix}${randomBytes(32).toString('base64url')}`
}
