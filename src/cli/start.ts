import path from 'node:path'
import { BlobStore } from '../blobs/blob-store.js'
import { DEV_API_KEY, DEV_CUSTOMER_ID, ensureDevCustomer } from '../commands/dev-customer.js'
import { loadConfig } from '../config.js'
import { sha256 } from '../http/auth.js'
import { ensureInternalToken } from '../internal-token.js'
import { buildApp } from '../http/app.js'
import { openPlatform } from '../platform.js'
import { parse, UsageError } from './args.js'

/** `dcp start`: Postgres (embedded unless DATABASE_URL), migrations, projections, the API. */
export async function startCommand(args: string[]): Promise<number> {
  const { values, positionals } = parse(args, {
    port: { type: 'string' },
    host: { type: 'string' },
    'data-dir': { type: 'string' },
    production: { type: 'boolean' },
  })
  if (positionals.length > 0) throw new UsageError(`dcp start takes no arguments, got ${positionals.join(' ')}`)
  const port = values.port === undefined ? undefined : Number(values.port)
  if (port !== undefined && !(Number.isInteger(port) && port >= 0 && port <= 65535)) throw new UsageError(`--port must be a port number, got ${String(values.port)}`)
  const config = loadConfig(process.env, {
    ...(port !== undefined ? { port } : {}),
    ...(values.host ? { host: String(values.host) } : {}),
    ...(values['data-dir'] ? { dataDir: path.resolve(String(values['data-dir'])) } : {}),
    ...(values.production ? { production: true } : {}),
  })
  const platform = await openPlatform(config, { publish: true, log: (line) => config.logLevel === 'debug' && console.log(line) })
  platform.projections.start()
  // Serve only once the read models exist and have caught up with the log.
  await platform.projections.waitFor(await platform.store.headPosition(), 30 * 60_000)
  const blobs = new BlobStore(path.join(config.dataDir, 'blobs'))
  await blobs.init()
  const internalToken = await ensureInternalToken(config.dataDir)
  if (!config.production) {
    await platform.projections.waitFor(await ensureDevCustomer(platform.store, sha256(DEV_API_KEY), new Date().toISOString()), 60_000)
    console.log(`dcp: development mode: customer ${DEV_CUSTOMER_ID} with API key "${DEV_API_KEY}" (NODE_ENV=production or --production turns this off)`)
  }
  const app = await buildApp({
    store: platform.store,
    projections: platform.projections,
    db: platform.database.db,
    blobs,
    internalToken,
    adminKey: config.adminKey,
    maxModelBytes: config.maxModelBytes,
    rateLimit: config.rateLimit,
    logLevel: config.logLevel,
  })
  let stopping: Promise<void> | undefined
  const stop = (signal: string) => {
    stopping ??= (async () => {
      console.log(`dcp: ${signal}, shutting down`)
      await app.close()
      await platform.close()
    })()
    return stopping
  }
  try {
    await app.listen({ port: config.port, host: config.host })
  } catch (error) {
    await platform.close()
    throw new UsageError(`cannot listen on ${config.host}:${config.port}: ${(error as Error).message}`)
  }
  const address = app.server.address()
  const boundPort = typeof address === 'object' && address ? address.port : config.port
  console.log(`dcp listening on http://localhost:${boundPort}/api/v1 (Postgres: ${platform.postgres}, data: ${config.dataDir})`)
  await new Promise<void>((resolve) => {
    process.once('SIGINT', () => void stop('SIGINT').then(resolve))
    process.once('SIGTERM', () => void stop('SIGTERM').then(resolve))
  })
  return 0
}
