import { execFile } from 'node:child_process'
import { existsSync } from 'node:fs'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { promisify } from 'node:util'
import t from 'tap'
import { listeningApp } from '../helpers/app.js'

const run = promisify(execFile)
const REPO = path.resolve(import.meta.dirname, '../..')

t.test('GET /sdk/package?platform=python gives an sdist of sdk/python that pip installs', async (t) => {
  const { url, connect } = await listeningApp(t)
  const device = await connect()
  await device.register()
  const dir = await mkdtemp(path.join(tmpdir(), 'dcp-sdist-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))

  // given a registered device, when it asks for the Python package
  const response = await fetch(`${url}/api/v1/sdk/package?platform=python`, { headers: { 'x-sdk-token': device.sdkToken } })
  t.equal(response.status, 200)
  t.equal(response.headers.get('content-type'), 'application/gzip')
  t.match(response.headers.get('content-disposition'), /filename="dcp_device-\d+\.\d+\.\d+\.tar\.gz"/)
  const file = path.join(dir, /filename="([^"]+)"/.exec(response.headers.get('content-disposition') ?? '')![1]!)
  await writeFile(file, Buffer.from(await response.arrayBuffer()))

  // then pip takes it as an sdist (building it with setuptools from PyPI, as for any sdist)
  const target = path.join(dir, 'site')
  await run('python3', ['-m', 'pip', 'install', '--quiet', '--no-deps', '--target', target, file], { timeout: 120_000 })
  t.ok(existsSync(path.join(target, 'dcp_device', '__main__.py')), 'the package is installed')
  t.equal(await readFile(path.join(target, 'dcp_device', 'device.py'), 'utf8'), await readFile(path.join(REPO, 'sdk/python/dcp_device/device.py'), 'utf8'), 'from the checkout')
  const { stdout } = await run('python3', ['-c', 'import dcp_device; print(dcp_device.__version__)'], { env: { ...process.env, PYTHONPATH: target } })
  t.match(stdout.trim(), /^\d+\.\d+\.\d+$/)

  // the Node SDK stays the default; an unknown platform is a 400, not a 500
  const node = await fetch(`${url}/api/v1/sdk/package`, { headers: { 'x-sdk-token': device.sdkToken } })
  t.match(node.headers.get('content-disposition'), /dcp-sdk-node\.tgz/)
  await node.arrayBuffer()
  const bad = await fetch(`${url}/api/v1/sdk/package?platform=cobol`, { headers: { 'x-sdk-token': device.sdkToken } })
  t.equal(bad.status, 400)
  t.match(await bad.json(), { error: { code: String, message: String } })
  t.equal((await fetch(`${url}/api/v1/sdk/package?platform=python`)).status, 401, 'a device credential is needed')
})
