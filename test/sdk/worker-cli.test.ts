import { spawn } from 'node:child_process'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import t from 'tap'
import { UsageError } from '../../src/cli/args.js'
import { workerCommand } from '../../src/cli/worker.js'
import { denseOnnxModel } from '../helpers/onnx.js'
import { FakeHub, HUB_DEVICE_ID } from './fixtures/fake-hub.js'

const entry = fileURLToPath(new URL('./fixtures/worker-cli-entry.ts', import.meta.url))

t.test('argument mistakes are usage errors', async (t) => {
  delete process.env.DCP_SERVER
  const mistakes: [string[], RegExp][] = [
    [[], /needs --server/],
    [['--server', 'not a url'], /http\(s\) URL/],
    [['--server', 'ftp://example.com'], /http\(s\) URL/],
    [['--server', 'http://localhost:1', '--max-tasks', '0'], /--max-tasks/],
    [['--server', 'http://localhost:1', '--threads', '0'], /--threads must be a whole number from 1 to 256, got "0"/],
    [['--server', 'http://localhost:1', '--threads', '1.5'], /--threads/],
    [['--server', 'http://localhost:1', '--instance-type', 'cloud'], /--instance-type/],
    [['--server', 'http://localhost:1', 'extra'], /takes no arguments/],
    [['--server', 'http://localhost:1', '--bogus'], /bogus/],
  ]
  for (const [args, message] of mistakes) {
    const error = await workerCommand(args).then(
      () => undefined,
      (e: unknown) => e,
    )
    t.ok(error instanceof UsageError, `${args.join(' ')}: a UsageError`)
    t.match((error as Error).message, message)
  }
})

t.test('dcp worker registers, runs tasks, and drains on SIGTERM', async (t) => {
  const hub = await FakeHub.start()
  const stateDir = await mkdtemp(path.join(tmpdir(), 'dcp-worker-cli-'))
  t.teardown(async () => {
    await hub.close()
    await rm(stateDir, { recursive: true, force: true })
  })
  const child = spawn(process.execPath, ['--import', 'tsx', entry, '--state-dir', stateDir, '--instance-type', 'aws', '--max-tasks', '2'], {
    env: { ...process.env, DCP_SERVER: hub.url, DCP_ENROLLMENT_SECRET: 'let-me-in' },
  })
  t.teardown(() => void (child.exitCode === null && child.kill('SIGKILL')))
  let stdout = ''
  child.stdout.on('data', (d) => (stdout += d))
  const exited = new Promise<number | null>((resolve) => child.on('exit', resolve))

  const register = await hub.next('register', () => true, { timeoutMs: 15_000 })
  t.match(register, { enrollment_secret: 'let-me-in', instance_type: 'aws', capabilities: { max_concurrent_tasks: 2 } })
  hub.downloadDelayMs = 300
  const model = hub.addModel('m1', denseOnnxModel())
  hub.send({ type: 'task', task_id: 't1', lease_id: 'l1', lease_deadline: new Date().toISOString(), model, input: { data: Array(10).fill(1), shape: [1, 10] } })
  await hub.next('heartbeat', (frame) => frame.leases.includes('l1'))
  child.kill('SIGTERM')
  await hub.next('draining')
  t.match(await hub.next('task_result'), { task_id: 't1', status: 'completed' })
  t.equal(await exited, 0)
  t.equal(stdout, `dcp worker: registered as ${HUB_DEVICE_ID} with ${hub.url}\n`)
  t.match(JSON.parse(await readFile(path.join(stateDir, 'device.json'), 'utf8')), { device_id: HUB_DEVICE_ID })
})
