import { loadConfig } from '../config.js'
import { openPlatform } from '../platform.js'
import { knownProjection } from '../projections/projections.js'
import { parse, UsageError } from './args.js'

/** `dcp projections status|rebuild <name>` */
export async function projectionsCommand(args: string[]): Promise<number> {
  const { values, positionals } = parse(args, { json: { type: 'boolean' } })
  const [action, name, ...extra] = positionals
  if (action !== 'status' && action !== 'rebuild') throw new UsageError('dcp projections needs status or rebuild <name>')
  if (action === 'rebuild' && !name) throw new UsageError('dcp projections rebuild needs a projection name')
  if (extra.length > 0 || (action === 'status' && name)) throw new UsageError(`unexpected argument ${[name, ...extra].filter(Boolean).join(' ')}`)
  if (action === 'rebuild') knownProjection(name!)
  const platform = await openPlatform(loadConfig(), { existing: true })
  try {
    if (action === 'rebuild') {
      const started = Date.now()
      const position = await platform.projections.rebuild(name!)
      console.log(`rebuilt ${name} up to position ${position} in ${Date.now() - started} ms`)
      return 0
    }
    const status = await platform.projections.status()
    if (values.json) console.log(JSON.stringify(status, null, 2))
    else {
      console.log(['projection', 'version', 'checkpoint', 'head', 'lag'].join('\t'))
      for (const s of status) {
        const version = s.storedVersion !== null && s.storedVersion !== s.version ? `${s.storedVersion}->${s.version}` : String(s.version)
        console.log([s.name, version, s.checkpoint ?? 'never built', s.head, s.lag].join('\t'))
      }
    }
    return 0
  } finally {
    await platform.close()
  }
}
