/**
 * The project's managed Python environment, `.dcp/python`: what the server runs its TorchScript tool with
 * (src/commands/torch-tool.ts) and what local Python devices run in. `npm run setup:python` creates it;
 * `npm test` does too when its run needs it. torch from PyPI brings its CUDA libraries: about 5 GB and a
 * minute or more to install. Idempotent: a stamp file records what was installed, and a second run with the
 * same packages does nothing.
 */
import { spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

const ROOT = fileURLToPath(new URL('../', import.meta.url))
export const PYTHON_ENV = path.join(ROOT, '.dcp', 'python')
/**
 * What the environment holds: the device package (sdk/python, editable) with torch and its test tools; torch
 * and numpy also serve the server's TorchScript tool.
 */
const PACKAGE = path.join(ROOT, 'sdk', 'python')
const STAMP = path.join(PYTHON_ENV, 'dcp-setup.json')

/** Creates `.dcp/python` with the package unless the stamp says it has this pyproject.toml's; the environment's python. */
export function ensurePythonEnv(options: { python?: string; log?: (line: string) => void } = {}): string {
  const log = options.log ?? ((line: string) => console.log(`setup:python: ${line}`))
  const python = path.join(PYTHON_ENV, 'bin', 'python')
  const wanted = JSON.stringify({ pyproject_sha256: createHash('sha256').update(readFileSync(path.join(PACKAGE, 'pyproject.toml'))).digest('hex') })
  if (existsSync(python) && existsSync(STAMP) && readFileSync(STAMP, 'utf8') === wanted) return python
  const base = options.python ?? process.env.PYTHON ?? 'python3'
  if (!existsSync(python)) {
    log(`creating ${PYTHON_ENV} with ${base}`)
    run(base, ['-m', 'venv', PYTHON_ENV])
  }
  log('installing sdk/python[torch,test] (torch from PyPI is about 5 GB: a minute or more)')
  run(python, ['-m', 'pip', 'install', '--quiet', '--upgrade', 'pip'])
  run(python, ['-m', 'pip', 'install', '--quiet', '-e', `${PACKAGE}[torch,test]`])
  writeFileSync(STAMP, wanted)
  log('ready')
  return python
}

function run(command: string, args: string[]): void {
  const result = spawnSync(command, args, { stdio: 'inherit' })
  if (result.status !== 0) throw new Error(`\`${command} ${args.join(' ')}\` failed (${result.error?.message ?? `exit ${result.status}`})`)
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  try {
    ensurePythonEnv()
  } catch (error) {
    console.error(`setup:python: ${(error as Error).message}`)
    process.exit(1)
  }
}
