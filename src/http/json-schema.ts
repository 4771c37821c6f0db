/**
 * Customers' JSON Schemas (a model's input_schema and output_schema): checked at upload, compiled once per
 * model version for inference. Two things make a customer's schema safe for everyone else:
 *
 * - `pattern` and `patternProperties` run on re2js (RE2's linear-time engine), not on JavaScript's
 *   backtracking RegExp: `"^(a+)+$"` against 40 `a`s and a `!` would otherwise hold the event loop (the HTTP
 *   server and the device hub) for minutes. RE2 has no lookarounds or backreferences; a schema using them is
 *   refused at upload with a 400 that says so.
 * - Each compile has an Ajv instance of its own, so no schema is registered globally: a `$id` neither fails
 *   the next compile ("already exists") nor collides with another customer's, and nothing outlives the
 *   validator (Ajv's own cache kept every schema it ever compiled).
 */
import { Ajv, type Options, type ValidateFunction } from 'ajv'
import { LRUCache } from 'lru-cache'
import { RE2JS } from 're2js'
import { DomainError } from '../domain/errors.js'

/** The compiled validators kept, one per model version (default). */
export const MAX_CACHED_VALIDATORS = 1000

type RegExpEngine = NonNullable<NonNullable<Options['code']>['regExp']>

/** Ajv's regExp option: patterns compiled by re2js (the `u` flag is RE2's default: it matches code points). */
const re2: RegExpEngine = Object.assign(
  (pattern: string, flags: string) => {
    let compiled: RE2JS
    try {
      compiled = RE2JS.compile(pattern)
    } catch (error) {
      throw new Error(`pattern ${JSON.stringify(pattern)} is not supported: dcp runs patterns on a linear-time (RE2) engine, which has no lookarounds or backreferences (${(error as Error).message})`)
    }
    // Ajv keys the compiled pattern by its text
    return { test: (text: string) => compiled.test(text), toString: () => `/${pattern}/${flags}` }
  },
  { code: 'require("re2js").RE2JS.compile' },
)

const newAjv = () => new Ajv({ strict: false, allErrors: false, addUsedSchema: false, code: { regExp: re2 } })

/** Compiles a customer's schema on an Ajv of its own; throws (with Ajv's or the pattern's message) when it is not a usable JSON Schema. */
export function compileSchema(schema: Record<string, unknown>): ValidateFunction {
  const ajv = newAjv()
  if (!ajv.validateSchema(schema)) throw new Error(ajv.errorsText(ajv.errors))
  return ajv.compile(schema)
}

/** A JSON Schema must be one dcp can compile: a typo'd schema would otherwise let every input through. */
export function checkJsonSchema(field: string, schema: Record<string, unknown> | null | undefined): void {
  if (!schema) return
  try {
    compileSchema(schema)
  } catch (error) {
    throw new DomainError('VALIDATION_ERROR', `${field}: not a valid JSON Schema: ${(error as Error).message}`)
  }
}

/** Validators compiled once per model version (`model id @ updated_at`), the least recently used dropped beyond `max`. */
export class SchemaValidators {
  private readonly cache: LRUCache<string, { validate: ValidateFunction } | { error: string }>

  constructor(options: { max?: number } = {}) {
    this.cache = new LRUCache({ max: options.max ?? MAX_CACHED_VALIDATORS })
  }

  /** The validator of this version of the model's schema; a schema that no longer compiles (stored before a check) is the model's problem, said as such. */
  validator(model: { model_id: string; updated_at: string }, schema: Record<string, unknown>): ValidateFunction {
    const key = `${model.model_id}@${model.updated_at}`
    let entry = this.cache.get(key)
    if (!entry) {
      try {
        entry = { validate: compileSchema(schema) }
      } catch (error) {
        entry = { error: (error as Error).message }
      }
      this.cache.set(key, entry)
    }
    if ('error' in entry) throw new DomainError('VALIDATION_ERROR', `the model's input_schema cannot be used (${entry.error}); change it with PATCH /api/v1/models/${model.model_id}/schema`)
    return entry.validate
  }
}
