import { readFile } from 'node:fs/promises'
import { createRequire } from 'node:module'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import type { FastifyPluginAsync } from 'fastify'
import type { Services } from './context.js'

/** The page's own files (plain browser JS and CSS, no build step). */
const WEB_DIR = fileURLToPath(new URL('../web/', import.meta.url))

/**
 * Chart.js's UMD build (it sets `window.Chart`). The package's `exports` map does not list `dist/chart.umd.js`,
 * so it is found next to the package's main entry point.
 */
function chartJsPath(): string {
  const require = createRequire(import.meta.url)
  return path.join(path.dirname(require.resolve('chart.js')), 'chart.umd.js')
}

/**
 * Only the page's own origin: scripts and styles from files (no inline code), API calls and the event
 * streams to dcp itself. Chart.js styles its canvases through the CSSOM, which style-src does not govern.
 */
const CONTENT_SECURITY_POLICY = [
  "default-src 'self'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self' data:",
  "connect-src 'self'",
  "object-src 'none'",
  "base-uri 'none'",
  "form-action 'self'",
  "frame-ancestors 'none'",
].join('; ')

interface Asset {
  url: string
  file: string
  type: string
}

const ASSETS: Asset[] = [
  { url: '/', file: path.join(WEB_DIR, 'index.html'), type: 'text/html; charset=utf-8' },
  { url: '/dashboard/assets/app.js', file: path.join(WEB_DIR, 'app.js'), type: 'text/javascript; charset=utf-8' },
  { url: '/dashboard/assets/styles.css', file: path.join(WEB_DIR, 'styles.css'), type: 'text/css; charset=utf-8' },
  { url: '/dashboard/assets/chart.umd.js', file: chartJsPath(), type: 'text/javascript; charset=utf-8' },
]

/**
 * The web dashboard: `GET /` (the page) and its assets under `/dashboard/assets/`. No authentication (the
 * page asks for an API key and sends it with each API call) and no rate limit, like health; hidden from the
 * OpenAPI document. The files are read once, when the app is built, so a missing one fails at start.
 */
export const webRoutes: FastifyPluginAsync<{ services: Services }> = async (app) => {
  const config = { auth: 'none' as const, rateLimit: false }
  for (const asset of ASSETS) {
    const content = await readFile(asset.file)
    app.get(asset.url, { config, schema: { hide: true } }, async (_request, reply) => {
      reply.type(asset.type).header('cache-control', 'no-cache').header('x-content-type-options', 'nosniff')
      if (asset.url === '/') reply.header('content-security-policy', CONTENT_SECURITY_POLICY).header('referrer-policy', 'no-referrer')
      return reply.send(content)
    })
  }
}
