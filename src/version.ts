import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'

const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }

function gitCommit(): string | undefined {
  if (process.env.DCP_COMMIT) return process.env.DCP_COMMIT.slice(0, 7)
  try {
    const cwd = new URL('..', import.meta.url)
    return execFileSync('git', ['rev-parse', '--short=7', 'HEAD'], { cwd, stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim() || undefined
  } catch {
    return undefined
  }
}

/** `<package version>-<git commit>` (e.g. `0.1.0-abc1234`), or the package version outside a checkout. */
export const version: string = ((commit) => (commit ? `${pkg.version}-${commit}` : pkg.version))(gitCommit())
