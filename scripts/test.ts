/**
 * `npm test`: starts one embedded Postgres for the whole run (unless DATABASE_URL points at a server),
 * runs tap with DATABASE_URL set, then stops the server. Each test file makes its own fresh database
 * (test/helpers/database.ts). Arguments go to tap, e.g. `npm test -- test/event-store`.
 *
 * The web dashboard's test drives Debian's Chromium: when the run includes it and the browser is missing,
 * this installs it first (`apt-get install chromium`, as root or through `sudo -n`), so that `npm install`
 * then `npm test` is all a fresh machine needs. Where that cannot work, the test fails and says why.
 *
 * A whole run (no file arguments), or one naming `sdk/python`, also runs the Python device SDK's pytest suite
 * after tap, in the project's venv (`.dcp/python`, made by `npm run setup:python` when missing or stale:
 * torch is about 5 GB, a minute or more the first time). `npm test -- sdk/python` runs only that suite.
 *
 * Likewise the API fuzz test (test/http/schemathesis.test.ts) creates its Python venv with schemathesis
 * under `.schemathesis/` on first use (test/helpers/schemathesis.ts).
 *
 * The TorchScript tests run torch through the server's tool: a run that includes them creates `.dcp/python`
 * too (scripts/python-env.ts) unless DCP_PYTHON names a Python to use.
 */
import { spawn, spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { startEmbeddedPostgres } from '../src/postgres/embedded.js'
import { ensurePythonEnv, PYTHON_ENV } from './python-env.js'

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/lib/chromium/chromium'
const args = process.argv.slice(2)
const runsBrowserTest = args.filter((a) => !a.startsWith('-')).length === 0 || args.some((a) => a.includes('web'))
if (runsBrowserTest && !existsSync(CHROMIUM)) installChromium()
// the TorchScript tests run torch through the server's tool: the managed environment, created when missing
const runsTorchTests = args.filter((a) => !a.startsWith('-')).length === 0 || args.some((a) => /torch|training|sdk\/python/.test(a))
if (runsTorchTests && !process.env.DCP_PYTHON) {
  try {
    ensurePythonEnv()
  } catch (error) {
    console.log(`npm test: the Python environment for the TorchScript tests could not be set up (${(error as Error).message}); those tests will say what is missing`)
  }
}

function installChromium(): void {
  const root = process.getuid?.() === 0
  const prefix = root ? [] : ['sudo', '-n']
  console.log(`npm test: the dashboard's browser test needs Chromium (${CHROMIUM}); installing Debian's chromium with apt-get${root ? '' : ' through sudo'}`)
  for (const command of [[...prefix, 'apt-get', 'update', '-qq'], [...prefix, 'apt-get', 'install', '-y', '-qq', 'chromium']]) {
    const result = spawnSync(command[0]!, command.slice(1), { stdio: 'inherit', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } })
    if (result.status !== 0) {
      console.log(`npm test: \`${command.join(' ')}\` failed (${result.error?.message ?? `exit ${result.status}`}); the browser test will say what is missing`)
      return
    }
  }
}

const files = args.filter((a) => !a.startsWith('-'))
const runsPython = files.length === 0 || files.some((a) => a.startsWith('sdk/python'))
const tapArgs = files.length > 0 && files.every((a) => a.startsWith('sdk/python')) ? undefined : args.filter((a) => !a.startsWith('sdk/python'))

const own = process.env.DATABASE_URL ? undefined : await startEmbeddedPostgres(path.join(tmpdir(), `dcp-test-pg-${process.pid}`))
// a success body its route's response schema does not describe is a 500 under test (src/http/responses.ts)
const env = { ...process.env, DATABASE_URL: process.env.DATABASE_URL ?? own!.url, DCP_STRICT_RESPONSES: process.env.DCP_STRICT_RESPONSES ?? '1' }
let code = 0
if (tapArgs) {
  const tap = spawn(process.execPath, [path.resolve('node_modules/tap/dist/esm/run.mjs'), ...tapArgs], { stdio: 'inherit', env })
  const stop = () => tap.kill('SIGTERM')
  process.on('SIGINT', stop)
  process.on('SIGTERM', stop)
  code = await new Promise((resolve) => tap.on('exit', (c, signal) => resolve(c ?? (signal ? 1 : 0))))
}
if (runsPython) code = pytest() || code

/** pytest on sdk/python/tests in the managed environment (set up above); its exit status. */
function pytest(): number {
  const python = path.join(PYTHON_ENV, 'bin', 'python')
  if (!existsSync(python)) {
    console.log(`npm test: no Python environment at ${PYTHON_ENV} for the Python SDK's tests (see above why it could not be set up)`)
    return 1
  }
  return spawnSync(python, ['-m', 'pytest', '-q', 'sdk/python/tests'], { stdio: 'inherit' }).status ?? 1
}
if (own) {
  await own.stop()
  await rm(path.join(tmpdir(), `dcp-test-pg-${process.pid}`), { recursive: true, force: true })
}
process.exit(code)
