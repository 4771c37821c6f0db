import { randomBytes } from 'node:crypto'
import { chmod, mkdir, readFile, writeFile } from 'node:fs/promises'
import path from 'node:path'

/**
 * The token other services send as `X-Internal-Token`: generated on the first start into
 * `<data dir>/internal_token`, readable by its owner only, and reused on later starts.
 */
export async function ensureInternalToken(dataDir: string): Promise<string> {
  const file = path.join(dataDir, 'internal_token')
  const existing = await readFile(file, 'utf8').then((t) => t.trim(), () => '')
  if (existing.length >= 32) {
    await chmod(file, 0o600)
    return existing
  }
  await mkdir(dataDir, { recursive: true })
  const token = `dcp_i_${randomBytes(32).toString('base64url')}`
  // 'wx': if another process created it meanwhile, use theirs
  await writeFile(file, `${token}\n`, { mode: 0o600, flag: existing ? 'w' : 'wx' }).catch(async (error: { code?: string }) => {
    if (error.code !== 'EEXIST') throw error
  })
  return (await readFile(file, 'utf8')).trim()
}
