import { z } from 'zod'

/** JavaScript's white space (what `String.prototype.trim` removes), spelled out so that any regex engine reads it alike. */
const WHITE_SPACE = '\\t\\n\\v\\f\\r \\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff'

/**
 * A free-text field (a name, a label, a reason), checked as the OpenAPI document states it, then trimmed: at
 * most `max` characters as sent, with at least one that is not white space (the document's `pattern`).
 * `z.string().trim().min(1).max(n)` checked the trimmed text, so that a leading space and `n` characters
 * passed a documented maxLength of `n`, and white space alone failed a documented minLength of 1.
 */
export function freeText(max: number) {
  return z
    .string()
    .max(max)
    .regex(new RegExp(`[^${WHITE_SPACE}]`), 'must hold a character that is not white space')
    .trim()
}
