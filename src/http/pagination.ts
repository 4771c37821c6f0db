import { z } from 'zod'

/** `?limit=&offset=` for every paginated list: `limit` defaults to 100, `offset` to 0. */
export function pageQuery(maxLimit = 1000) {
  return z.object({
    limit: z.coerce.number().int().min(1).max(maxLimit).default(100).describe(`items per page (default 100, max ${maxLimit})`),
    offset: z.coerce.number().int().min(0).max(10_000_000).default(0),
  })
}
