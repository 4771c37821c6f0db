/**
 * `npm test`: starts one embedded Postgres for the whole run (unless DATABASE_URL points at a server),
 * runs tap with DATABASE_URL set, then stops the server. Each test file makes its own fresh database
 * (test/helpers/database.ts). Arguments go to tap, e.g. `npm test -- test/event-store`.
 */
import { spawn } from 'node:child_process'
import { rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { startEmbeddedPostgres } from '../src/postgres/embedded.js'

const own = process.env.DATABASE_URL ? undefined : await startEmbeddedPostgres(path.join(tmpdir(), `dcp-test-pg-${process.pid}`))
const env = { ...process.env, DATABASE_URL: process.env.DATABASE_URL ?? own!.url }
const tap = spawn(process.execPath, [path.resolve('node_modules/tap/dist/esm/run.mjs'), ...process.argv.slice(2)], {
  stdio: 'inherit',
  env,
})
const stop = () => tap.kill('SIGTERM')
process.on('SIGINT', stop)
process.on('SIGTERM', stop)
const code: number = await new Promise((resolve) => tap.on('exit', (c, signal) => resolve(c ?? (signal ? 1 : 0))))
if (own) {
  await own.stop()
  await rm(path.join(tmpdir(), `dcp-test-pg-${process.pid}`), { recursive: true, force: true })
}
process.exit(code)
