import { spawn, spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

/** The schemathesis release the fuzz test runs (installed from PyPI into `.schemathesis/venv`). */
export const SCHEMATHESIS_VERSION = '4.32'
const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url))
export const VENV = path.join(REPO_ROOT, '.schemathesis', 'venv')
export const SCHEMATHESIS_BIN = path.join(VENV, 'bin', 'schemathesis')

/**
 * Makes sure `.schemathesis/venv` holds schemathesis 4.32.x: reused when it does, otherwise created with
 * `python3 -m venv` (installing Debian's python3-venv first where the interpreter lacks ensurepip, as
 * scripts/test.ts installs Chromium) and filled from PyPI. Throws, saying what failed, when it cannot:
 * the fuzz test then fails instead of being skipped.
 */
export function ensureSchemathesis(): string {
  if (installedVersion()?.startsWith(`${SCHEMATHESIS_VERSION}.`)) return SCHEMATHESIS_BIN
  if (!existsSync(path.join(VENV, 'bin', 'python'))) createVenv()
  const pip = run(path.join(VENV, 'bin', 'python'), ['-m', 'pip', 'install', '--disable-pip-version-check', '--quiet', `schemathesis==${SCHEMATHESIS_VERSION}.*`])
  if (!pip.ok) throw new Error(`pip could not install schemathesis==${SCHEMATHESIS_VERSION}.* from PyPI into ${VENV} (is PyPI reachable?):\n${pip.output}`)
  const version = installedVersion()
  if (!version?.startsWith(`${SCHEMATHESIS_VERSION}.`)) throw new Error(`${SCHEMATHESIS_BIN} reports version ${version ?? 'none'} after installing ${SCHEMATHESIS_VERSION}.*`)
  return SCHEMATHESIS_BIN
}

function installedVersion(): string | undefined {
  if (!existsSync(SCHEMATHESIS_BIN)) return undefined
  const result = run(SCHEMATHESIS_BIN, ['--version'])
  return /version (\S+)/.exec(result.output)?.[1]
}

function createVenv(): void {
  let venv = run('python3', ['-m', 'venv', '--clear', VENV])
  if (!venv.ok && /ensurepip|python3-venv/.test(venv.output)) {
    installPythonVenv()
    venv = run('python3', ['-m', 'venv', '--clear', VENV])
  }
  if (!venv.ok) throw new Error(`\`python3 -m venv ${VENV}\` failed (schemathesis needs Python 3 with venv):\n${venv.output}`)
}

/** Debian's python3-venv, with apt-get as root or through `sudo -n`. */
function installPythonVenv(): void {
  const prefix = process.getuid?.() === 0 ? [] : ['sudo', '-n']
  for (const command of [[...prefix, 'apt-get', 'update', '-qq'], [...prefix, 'apt-get', 'install', '-y', '-qq', 'python3-venv']]) {
    const result = run(command[0]!, command.slice(1), { DEBIAN_FRONTEND: 'noninteractive' })
    if (!result.ok) throw new Error(`python3 has no ensurepip, and \`${command.join(' ')}\` failed:\n${result.output}`)
  }
}

function run(command: string, args: string[], env: NodeJS.ProcessEnv = {}): { ok: boolean; output: string } {
  const result = spawnSync(command, args, { encoding: 'utf8', env: { ...process.env, ...env } })
  return { ok: result.status === 0, output: `${result.stdout ?? ''}${result.stderr ?? ''}${result.error ? result.error.message : ''}` }
}

/**
 * Runs schemathesis (asynchronously: the server under test lives in this process) and resolves with its exit
 * code and everything it printed. It is killed after `timeoutMs`.
 */
export function runSchemathesis(args: string[], options: { cwd: string; env: NodeJS.ProcessEnv; timeoutMs: number }): Promise<{ code: number | null; output: string; timedOut: boolean }> {
  const child = spawn(SCHEMATHESIS_BIN, args, { cwd: options.cwd, env: { ...process.env, ...options.env, NO_COLOR: '1' } })
  let output = ''
  child.stdout.on('data', (d) => (output += d))
  child.stderr.on('data', (d) => (output += d))
  let timedOut = false
  const timer = setTimeout(() => {
    timedOut = true
    child.kill('SIGKILL')
  }, options.timeoutMs)
  return new Promise((resolve) => {
    child.on('close', (code) => {
      clearTimeout(timer)
      resolve({ code, output, timedOut })
    })
  })
}

/**
 * The part of schemathesis's output worth reading in a test log: its failures, warnings and summary, without
 * the progress display that redraws itself with terminal escapes even when it writes to a pipe.
 */
export function schemathesisReport(output: string): string {
  // eslint-disable-next-line no-control-regex
  const plain = output.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '').replace(/\r/g, '')
  const start = plain.search(/^=+ (FAILURES|ERRORS|WARNINGS|SUMMARY) =+$/m)
  return start < 0 ? plain.slice(-20_000) : plain.slice(start)
}
