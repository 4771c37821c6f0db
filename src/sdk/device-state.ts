import { randomBytes } from 'node:crypto'
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { z } from 'zod'

/** What `<stateDir>/device.json` holds: who this installation is, and who the hub says it is. */
const DeviceState = z.object({
  sdk_uuid: z.string().min(1).max(128),
  device_id: z.string().min(1).max(128).optional(),
  sdk_token: z.string().max(512).optional(),
})
export type DeviceState = z.infer<typeof DeviceState>

const fileOf = (stateDir: string) => path.join(stateDir, 'device.json')

/**
 * Reads the state, creating it (with a new `sdk-nodejs-<6 hex>` UUID) on first use. A corrupt file is an error
 * rather than a silent reset: resetting would turn this machine into a new device and lose its token.
 */
export async function loadDeviceState(stateDir: string): Promise<DeviceState> {
  let text: string
  try {
    text = await readFile(fileOf(stateDir), 'utf8')
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error
    const fresh: DeviceState = { sdk_uuid: `sdk-nodejs-${randomBytes(3).toString('hex')}` }
    await saveDeviceState(stateDir, fresh)
    return fresh
  }
  let json: unknown
  try {
    json = JSON.parse(text)
  } catch {
    json = undefined
  }
  const parsed = DeviceState.safeParse(json)
  if (!parsed.success) throw new Error(`${fileOf(stateDir)} is not a valid device state file; move it away to register as a new device`)
  return parsed.data
}

/** Written atomically (temp file + rename), readable by the owner only: it holds the SDK token. */
export async function saveDeviceState(stateDir: string, state: DeviceState): Promise<void> {
  await mkdir(stateDir, { recursive: true, mode: 0o700 })
  const temp = `${fileOf(stateDir)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`
  await writeFile(temp, `${JSON.stringify(state, null, 2)}\n`, { mode: 0o600 })
  await rename(temp, fileOf(stateDir))
}
