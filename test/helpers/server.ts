import { type ChildProcess, spawn } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import path from 'node:path'
import type { Test } from 'tap'
import { freshDatabase } from './database.js'
import { eventually } from './device.js'
import { DCP_BIN } from './inference.js'

/** A free TCP port on the loopback interface. */
export async function freePort(): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as { port: number }).port
  await new Promise((resolve) => server.close(resolve))
  return port
}

/** `dcp start` as a child process on `port` (no local workers); resolves once it listens. Added to `children`. */
export async function startServerProcess(options: { port: number; env: NodeJS.ProcessEnv; children: ChildProcess[] }): Promise<ChildProcess> {
  const server = spawn(process.execPath, [DCP_BIN, 'start', '--port', String(options.port), '--host', '127.0.0.1', '--workers', '0'], { env: options.env, stdio: ['ignore', 'pipe', 'pipe'] })
  options.children.push(server)
  let output = ''
  server.stdout!.on('data', (d) => (output += d))
  server.stderr!.on('data', (d) => (output += d))
  await eventually(async () => /dcp listening/.test(output), 60_000, `the server to listen (${output})`)
  return server
}

/** What a test of a real `dcp start` process needs: a fresh database, a data dir, a port; children killed at the end. */
export async function serverFixture(t: Test, name: string) {
  const database = await freshDatabase(t)
  const dataDir = await mkdtemp(path.join(tmpdir(), `dcp-${name}-`))
  const port = await freePort()
  const children: ChildProcess[] = []
  t.teardown(async () => {
    children.forEach((c) => c.exitCode === null && c.kill('SIGKILL'))
    await rm(dataDir, { recursive: true, force: true })
  })
  return { database, dataDir, port, url: `http://127.0.0.1:${port}`, children }
}
