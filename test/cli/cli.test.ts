import { type ChildProcess, spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { chmod, mkdir, mkdtemp, readFile, rm, utimes, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import * as ort from 'onnxruntime-node'
import pg from 'pg'
import t, { type Test } from 'tap'
import { freshDatabase } from '../helpers/database.js'

const dcp = fileURLToPath(new URL('../../bin/dcp.js', import.meta.url))

interface Run {
  code: number | null
  stdout: string
  stderr: string
}

function run(args: string[], env: NodeJS.ProcessEnv): Promise<Run> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [dcp, ...args], { env: { ...process.env, ...env } })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d) => (stdout += d))
    child.stderr.on('data', (d) => (stderr += d))
    child.on('exit', (code) => resolve({ code, stdout, stderr }))
  })
}

/** Starts `dcp start` and resolves with its base URL once it says it listens. */
function startServer(t: Test, env: NodeJS.ProcessEnv): Promise<{ url: string; child: ChildProcess; output: () => string }> {
  const child = spawn(process.execPath, [dcp, 'start', '--port', '0', '--host', '127.0.0.1'], {
    env: { ...process.env, LOG_LEVEL: 'warn', WORKERS: '0', ...env },
  })
  let output = ''
  t.teardown(() => {
    if (child.exitCode === null) child.kill('SIGKILL')
  })
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`dcp start did not come up:\n${output}`)), 60_000)
    const onData = (d: Buffer) => {
      output += d
      const match = /listening on (http:\/\/localhost:\d+)/.exec(output)
      if (match) {
        clearTimeout(timer)
        resolve({ url: match[1]!, child, output: () => output })
      }
    }
    child.stdout.on('data', onData)
    child.stderr.on('data', onData)
    child.on('exit', (code) => reject(new Error(`dcp start exited with ${code}:\n${output}`)))
  })
}

const exited = (child: ChildProcess) => new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))

t.test('bad arguments: a clear message and exit code 2', async (t) => {
  const [unknown, flag, port, projection, missing, help] = await Promise.all([
    run(['frobnicate'], {}),
    run(['start', '--prot', '1'], {}),
    run(['start', '--port', 'abc'], {}),
    run(['audit', 'no_such_thing'], {}),
    run(['projections', 'rebuild'], {}),
    run(['help'], {}),
  ])
  t.equal(unknown.code, 2)
  t.match(unknown.stderr, /unknown command "frobnicate"/)
  t.match(unknown.stderr, /Usage:/)
  t.equal(flag.code, 2)
  t.match(flag.stderr, /--prot/)
  t.equal(port.code, 2)
  t.match(port.stderr, /--port must be a whole number from 0 to 65535, got "abc"/)
  t.equal(projection.code, 2)
  t.match(projection.stderr, /unknown projection "no_such_thing"; known: event_counts/)
  t.equal(missing.code, 2)
  t.equal(help.code, 0)
  t.match(help.stdout, /dcp start/)
})

t.test('example-model writes a working ONNX classifier, and never overwrites a file unless told to', async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'dcp-example-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  const file = path.join(dir, 'model.onnx')
  const written = await run(['example-model', file], {})
  t.equal(written.code, 0, written.stderr)
  t.match(written.stdout, /input \[N, 10\] float32 -> output \[N, 2\]/)
  const session = await ort.InferenceSession.create(await readFile(file))
  t.same([session.inputNames, session.outputNames], [['input'], ['output']])
  // a batch of 3 of the README's example input: 3 rows of probabilities over 2 classes
  const input = Float32Array.from({ length: 30 }, (_, i) => ((i % 10) + 1) / 10)
  const { output } = await session.run({ input: new ort.Tensor('float32', input, [3, 10]) })
  t.same(output!.dims, [3, 2])
  for (let row = 0; row < 3; row++) {
    const [a, b] = [output!.data[row * 2] as number, output!.data[row * 2 + 1] as number]
    t.ok(a > 0 && b > 0 && Math.abs(a + b - 1) < 1e-5, `row ${row} is a probability distribution: ${a}, ${b}`)
  }
  const before = await readFile(file)
  const again = await run(['example-model', file, '--classes', '3'], {})
  t.equal(again.code, 1)
  t.match(again.stderr, /it exists \(--force overwrites it\)/)
  t.same(await readFile(file), before, 'the file is left as it was')
  const forced = await run(['example-model', file, '--classes', '3', '--inputs', '4', '--force'], {})
  t.equal(forced.code, 0, forced.stderr)
  const bigger = await ort.InferenceSession.create(await readFile(file))
  const { output: three } = await bigger.run({ input: new ort.Tensor('float32', new Float32Array(4), [1, 4]) })
  t.same(three!.dims, [1, 3])
  const bad = await run(['example-model', file, '--classes', '1'], {})
  t.equal(bad.code, 2)
  t.match(bad.stderr, /--classes must be a whole number from 2 to 10000, got "1"/)
})

t.test('an unreachable database: a clear message and exit code 1', async (t) => {
  const result = await run(['projections', 'status'], { DATABASE_URL: 'postgres://dcp:secret@127.0.0.1:1/dcp' })
  t.equal(result.code, 1)
  t.match(result.stderr, /cannot reach Postgres at 127\.0\.0\.1:1\/dcp/)
  t.notMatch(result.stderr, /secret/, 'the password is not printed')
  // a Unix socket is named by its directory (the form the embedded Postgres's URL takes)
  const socket = await run(['projections', 'status'], { DATABASE_URL: 'postgres://dcp:secret@localhost:5432/dcp?host=%2Fnowhere%2Fdcp-socket' })
  t.equal(socket.code, 1)
  t.match(socket.stderr, /cannot reach Postgres at \/nowhere\/dcp-socket:5432\/dcp/)
  const env = await run(['start'], { PORT: 'eighty' })
  t.equal(env.code, 1)
  t.match(env.stderr, /invalid environment variable PORT/)
})

t.test('with DATABASE_URL: start serves health, projections and audit work beside it, SIGTERM stops it', async (t) => {
  const database = await freshDatabase(t)
  const env = { DATABASE_URL: database.url, DATA_DIR: await mkdtemp(path.join(tmpdir(), 'dcp-cli-')) }
  const server = await startServer(t, env)
  const health = await fetch(`${server.url}/api/v1/health`)
  t.equal(health.status, 200)
  const body = (await health.json()) as { status: string; version: string; timestamp: string }
  t.equal(body.status, 'healthy')
  t.match(body.version, /^\d+\.\d+\.\d+(-[0-9a-f]{7})?$/)
  t.ok(Math.abs(Date.parse(body.timestamp) - Date.now()) < 60_000)
  const dev = await fetch(`${server.url}/api/v1/models`, { headers: { 'x-api-key': 'test-api-key' } })
  t.equal(dev.status, 200, 'development mode: the spec examples\' key works')
  t.match(server.output(), /API key "test-api-key"/)
  const missing = await fetch(`${server.url}/api/v1/nothing-here`)
  t.equal(missing.status, 404)
  t.same(await missing.json(), { error: { code: 'NOT_FOUND', message: 'no route GET /api/v1/nothing-here' } })

  // some history for the read model, written as any writer would
  const client = new pg.Client({ connectionString: database.url })
  await client.connect()
  t.teardown(() => client.end())
  await client.query(`insert into events (stream_id, revision, event_id, type, data, metadata)
    select 'device-' || g, 0, gen_random_uuid(), 'DeviceRegistered', '{}', '{}' from generate_series(1, 5) g`)
  for (let i = 0; i < 100; i++) {
    const { rows } = await client.query(`select count from rm_event_counts.event_counts where category = 'device'`).catch(() => ({ rows: [] }))
    if (Number(rows[0]?.count) === 5) break
    await new Promise((r) => setTimeout(r, 100))
  }

  const status = await run(['projections', 'status', '--json'], env)
  t.equal(status.code, 0, status.stderr)
  const [counts] = JSON.parse(status.stdout) as { name: string; lag: number; checkpoint: string }[]
  t.equal(counts!.name, 'event_counts')
  t.equal(counts!.lag, 0)

  const clean = await run(['audit', 'event_counts'], env)
  t.equal(clean.code, 0, clean.stderr)
  t.match(clean.stdout, /OK, no differences/)
  await client.query(`update rm_event_counts.event_counts set count = 4 where category = 'device'`)
  const dirty = await run(['audit', 'event_counts'], env)
  t.equal(dirty.code, 1)
  t.match(dirty.stdout, /DIFFERENCES FOUND/)
  t.match(dirty.stdout, /category="device" type="DeviceRegistered"\n\s+live: .*"count":4.*\n\s+replayed: .*"count":5/)
  const rebuilt = await run(['projections', 'rebuild', 'event_counts'], env)
  t.equal(rebuilt.code, 0, rebuilt.stderr)
  t.equal((await run(['audit', 'event_counts'], env)).code, 0, 'the rebuild repaired it')

  server.child.kill('SIGTERM')
  t.equal(await exited(server.child), 0, 'stops cleanly on SIGTERM')
  t.match(server.output(), /SIGTERM, shutting down/)
})

t.test('start collects the blobs nothing refers to on its timer (BLOB_GC_INTERVAL_MS) and says what it freed', async (t) => {
  const database = await freshDatabase(t)
  const dataDir = await mkdtemp(path.join(tmpdir(), 'dcp-cli-'))
  t.teardown(() => rm(dataDir, { recursive: true, force: true }))
  // a file an upload kept two days ago before a crash stopped it appending its event
  const orphan = path.join(dataDir, 'blobs', 'sha256', 'ab', 'ab'.repeat(32))
  await mkdir(path.dirname(orphan), { recursive: true })
  await writeFile(orphan, Buffer.alloc(123))
  const twoDaysAgo = new Date(Date.now() - 48 * 3600_000)
  await utimes(orphan, twoDaysAgo, twoDaysAgo)
  const server = await startServer(t, { DATABASE_URL: database.url, DATA_DIR: dataDir, BLOB_GC_INTERVAL_MS: '200' })
  const freed = /blob gc: scanned 1 blobs, deleted 1 \(0 unfinished uploads\), freed 123 bytes/
  const deadline = Date.now() + 30_000
  while (!freed.test(server.output()) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100))
  t.match(server.output(), freed)
  t.notOk(existsSync(orphan), 'collected')
  server.child.kill('SIGTERM')
  t.equal(await exited(server.child), 0, 'stops cleanly on SIGTERM')
})

t.test('production mode: no development customer, and the internal token is kept in the data directory', async (t) => {
  const database = await freshDatabase(t)
  const dataDir = await mkdtemp(path.join(tmpdir(), 'dcp-prod-'))
  t.teardown(() => rm(dataDir, { recursive: true, force: true }))
  const server = await startServer(t, { DATABASE_URL: database.url, DATA_DIR: dataDir, NODE_ENV: 'production', ADMIN_KEY: 'an-admin-key-of-enough-length' })
  const refused = await fetch(`${server.url}/api/v1/models`, { headers: { 'x-api-key': 'test-api-key' } })
  t.equal(refused.status, 401)
  const token = (await readFile(path.join(dataDir, 'internal_token'), 'utf8')).trim()
  t.match(token, /^dcp_i_/)
  const created = await fetch(`${server.url}/api/v1/admin/customers`, {
    method: 'POST',
    headers: { 'x-admin-key': 'an-admin-key-of-enough-length', 'content-type': 'application/json' },
    body: JSON.stringify({ name: 'First customer' }),
  })
  t.equal(created.status, 201)
  const { api_key } = (await created.json()) as { api_key: string }
  t.equal((await fetch(`${server.url}/api/v1/models`, { headers: { 'x-api-key': api_key } })).status, 200)
  server.child.kill('SIGTERM')
  t.equal(await exited(server.child), 0)
})

t.test('without DATABASE_URL: start runs an embedded Postgres under the data directory', async (t) => {
  const dataDir = await mkdtemp(path.join(tmpdir(), 'dcp-embedded-'))
  await chmod(dataDir, 0o755) // as root, Postgres runs as the postgres user, which must enter it
  t.teardown(() => rm(dataDir, { recursive: true, force: true }))
  const env = { DATABASE_URL: '', DATA_DIR: dataDir, WORKERS: '2' }
  const server = await startServer(t, env)
  t.match(server.output(), /Postgres: embedded/)
  t.equal((await fetch(`${server.url}/api/v1/health`)).status, 200)
  // two local workers by default, connected over real sockets
  for (let i = 0; i < 100 && !/started 2 local workers/.test(server.output()); i++) await new Promise((r) => setTimeout(r, 100))
  t.match(server.output(), /started 2 local workers/)
  for (let i = 0; i < 150; i++) {
    const stats = (await (await fetch(`${server.url}/api/v1/devices/stats`, { headers: { 'x-api-key': 'test-api-key' } })).json()) as { idle: number }
    if (stats.idle === 2) break
    await new Promise((r) => setTimeout(r, 200))
  }
  const devices = (await (await fetch(`${server.url}/api/v1/devices`, { headers: { 'x-api-key': 'test-api-key' } })).json()) as { devices: { status: string; instance_type: string }[] }
  t.same(devices.devices.map((d) => [d.status, d.instance_type]), [['idle', 'aws'], ['idle', 'aws']], 'aws: enrolled with the aws token dcp start made for them')
  t.notMatch(server.output(), /dcp_e_/, 'that token is never printed')
  // another dcp command uses the running server's Postgres instead of starting a second one
  const status = await run(['projections', 'status', '--json'], env)
  t.equal(status.code, 0, status.stderr)
  server.child.kill('SIGINT')
  t.equal(await exited(server.child), 0)
  // the data stays: a second start reuses it
  const again = await startServer(t, env)
  t.equal((await fetch(`${again.url}/api/v1/health`)).status, 200)
  // killed without a chance to clean up, it leaves Postgres running: the next start copes
  again.child.kill('SIGKILL')
  await exited(again.child)
  const third = await startServer(t, env)
  t.equal((await fetch(`${third.url}/api/v1/health`)).status, 200)
  third.child.kill('SIGTERM')
  t.equal(await exited(third.child), 0)
})

t.test('--help on every command prints its usage and exits 0', async (t) => {
  for (const args of [['start', '--help'], ['worker', '--help'], ['audit', 'usage', '--help'], ['projections', '-h'], ['watch', '--help'], ['example-model', '--help']]) {
    const r = await run(args, {})
    t.equal(r.code, 0, `${args.join(' ')} exits 0`)
    t.match(r.stdout, new RegExp(`Usage:\\n  dcp ${args[0]}`), `${args.join(' ')} prints its usage`)
    t.equal(r.stderr, '')
  }
})

t.test('dcp audit usage where there is no data says so, exits 1 and creates nothing', async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'dcp-nodata-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  const env: NodeJS.ProcessEnv = { ...process.env, DATA_DIR: path.join(dir, 'data') }
  delete env.DATABASE_URL
  for (const args of [['audit', 'usage'], ['projections', 'status']]) {
    const r = await new Promise<Run>((resolve) => {
      const child = spawn(process.execPath, [dcp, ...args], { env })
      let stdout = ''
      let stderr = ''
      child.stdout.on('data', (d) => (stdout += d))
      child.stderr.on('data', (d) => (stderr += d))
      child.on('exit', (code) => resolve({ code, stdout, stderr }))
    })
    t.equal(r.code, 1, `${args.join(' ')} exits 1`)
    t.match(r.stderr, /no dcp data in .*dcp-nodata-.*data/, 'it says there is no data, and where it looked')
    t.notMatch(r.stderr, /\n\s+at /, 'no stack trace')
  }
  const { readdir } = await import('node:fs/promises')
  t.same(await readdir(dir), [], 'nothing was created')
})

t.test('Ctrl-C in a terminal (SIGINT to the process group) drains the local workers once and stops cleanly', async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'dcp-ctrlc-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  const db = await freshDatabase(t)
  // its own process group, as a shell gives a foreground job
  const child = spawn(process.execPath, [dcp, 'start', '--port', '0', '--host', '127.0.0.1', '--workers', '2'], {
    env: { ...process.env, LOG_LEVEL: 'warn', DATA_DIR: dir, DATABASE_URL: db.url },
    detached: true,
  })
  let output = ''
  child.stdout.on('data', (d) => (output += d))
  child.stderr.on('data', (d) => (output += d))
  t.teardown(() => {
    if (child.exitCode === null) child.kill('SIGKILL')
  })
  const deadline = Date.now() + 60_000
  while ((output.match(/registered as dev_/g) ?? []).length < 2) {
    if (Date.now() > deadline || child.exitCode !== null) throw new Error(`workers did not register:\n${output}`)
    await new Promise((r) => setTimeout(r, 100))
  }
  process.kill(-child.pid!, 'SIGINT')
  const code = await exited(child)
  t.equal(code, 0, `dcp start exits 0:\n${output}`)
  t.equal((output.match(/dcp worker: SIGTERM, draining/g) ?? []).length, 2, 'each worker was asked once to drain')
  t.notMatch(output, /stopping now/, 'no worker was stopped without draining')
  t.notMatch(output, /Unhandled 'error'|\n\s+at /, 'no crash on the way out')
})
