import { parseArgs, type ParseArgsConfig } from 'node:util'

/** A mistake in how dcp was called: printed with the usage, exit code 2. */
export class UsageError extends Error {}

export function parse<O extends NonNullable<ParseArgsConfig['options']>>(args: string[], options: O) {
  try {
    return parseArgs({ args, options, allowPositionals: true, strict: true })
  } catch (error) {
    throw new UsageError((error as Error).message)
  }
}
