import type { FastifySerializerCompiler } from 'fastify/types/schema.js'
import { z } from 'zod'

/**
 * Success bodies are described by zod schemas on their routes (`schema.response`), which the OpenAPI
 * document shows.
 *
 * With `strict` (the test suite runs so: DCP_STRICT_RESPONSES=1) every body is checked against its schema: one
 * it does not describe, or with a field the schema leaves out, is a 500 that names the route and the field,
 * so the whole suite checks the document against what is served. Without (production), bodies are sent as
 * the handlers made them, unchecked: the check costs a second serialization and a parse of every body (a
 * result page holds up to 40 MB of JSON), on the hottest path there is, for what the tests already show.
 */
export function responseSerializer(options: { strict: boolean }): FastifySerializerCompiler<z.ZodType> {
  return ({ schema, method, url, httpStatus }) => {
    if (!(schema instanceof z.ZodType)) throw new Error(`${method} ${url}: the response schema for ${httpStatus} is not a zod schema`)
    if (!options.strict) return (data) => JSON.stringify(data)
    return (data) => {
      // what JSON would carry (dates as strings, undefined fields gone), as the client will see it
      const plain: unknown = data === undefined ? undefined : JSON.parse(JSON.stringify(data))
      const parsed = schema.safeParse(plain)
      const problem = parsed.success ? droppedField(plain, parsed.data) : parsed.error.issues.map((issue) => `${issue.path.join('.') || '(body)'}: ${issue.message}`).join('; ')
      if (problem === undefined) return JSON.stringify(parsed.data)
      throw new Error(`${method} ${url} answered ${httpStatus} with a body its response schema does not describe: ${parsed.success ? `${problem} is not in the schema` : problem}`)
    }
  }
}

/** The first field of `sent` that parsing dropped (its path), undefined when none was. */
export function droppedField(sent: unknown, kept: unknown, path = ''): string | undefined {
  if (Array.isArray(sent)) {
    if (!Array.isArray(kept)) return undefined
    for (let i = 0; i < sent.length; i++) {
      const dropped = droppedField(sent[i], kept[i], `${path}[${i}]`)
      if (dropped) return dropped
    }
    return undefined
  }
  if (sent === null || typeof sent !== 'object' || kept === null || typeof kept !== 'object') return undefined
  for (const [key, value] of Object.entries(sent)) {
    const at = path ? `${path}.${key}` : key
    if (!(key in kept)) return at
    const dropped = droppedField(value, (kept as Record<string, unknown>)[key], at)
    if (dropped) return dropped
  }
  return undefined
}

/** Shared shapes of response bodies. */
export const Timestamp = z.string().describe('ISO 8601 time')
export const NullableTimestamp = Timestamp.nullable()
/** A list page as `pageQuery` serves it: `{ <name>: [...], total, limit, offset }`. */
export function page<K extends string, T extends z.ZodType>(name: K, item: T) {
  return z.object({ [name]: z.array(item), total: z.number().int(), limit: z.number().int(), offset: z.number().int() } as { [P in K]: z.ZodArray<T> } & { total: z.ZodNumber; limit: z.ZodNumber; offset: z.ZodNumber })
}
