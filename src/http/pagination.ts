import { z } from 'zod'

/**
 * A whole-number query parameter between `min` and `max`: digits only. `z.coerce.number()` alone would take
 * `?offset=` (empty, read as 0), `?offset=0.0`, `?limit=1e2` and ` 7`, which a client most likely did not mean.
 * The OpenAPI document shows it as the integer it is (a query parameter is text on the wire either way).
 */
export function wholeNumber(min: number, max: number) {
  return z
    .string()
    .regex(/^[0-9]{1,16}$/, 'must be a whole number (digits only)')
    .transform(Number)
    .pipe(z.number().int().min(min).max(max))
    .meta({ type: 'integer', minimum: min, maximum: max, pattern: undefined })
}

/** `?limit=&offset=` for every paginated list: `limit` defaults to 100, `offset` to 0. */
export function pageQuery(maxLimit = 1000) {
  return z.object({
    limit: wholeNumber(1, maxLimit).default(100).describe(`items per page (default 100, max ${maxLimit})`),
    offset: wholeNumber(0, 10_000_000).default(0),
  })
}
