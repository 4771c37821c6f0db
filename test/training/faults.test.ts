import { type ChildProcess, spawn } from 'node:child_process'
import path from 'node:path'
import t from 'tap'
import { trainingStream } from '../../src/domain/training-job.js'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import { multipart } from '../helpers/app.js'
import { eventually } from '../helpers/device.js'
import { serverFixture, startServerProcess } from '../helpers/server.js'
import { DCP_BIN } from '../helpers/inference.js'
import { mlpOnnxModel } from '../helpers/onnx.js'
import { MLP, trainingBody, trainingSetup } from '../helpers/training.js'

/** A job that runs until cancelled (no target, many epochs). */
const endless = (modelId: string, syncMode: string) =>
  trainingBody(modelId, { data: { total_samples: 1_000_000 }, training: { target_accuracy: undefined, epochs: 100, sync_mode: syncMode }, resources: { min_devices: 1, max_devices: 2 } })

const roundsOf = async (store: PostgresEventStore, jobId: string) =>
  (await store.readStream(trainingStream(jobId))).filter((e) => e.type === 'TrainingRoundCompleted').map((e) => e.data as { round: number; batches_completed: number; contributions: { device_id: string }[] })

t.test('a worker killed in the middle of a full-sync round: the round goes on with the other device', async (t) => {
  const { api, model, url, waitFor, store, dir } = await trainingSetup(t)
  const workers: ChildProcess[] = ['a', 'b'].map((name) => spawn(process.execPath, [DCP_BIN, 'worker', '--server', url, '--state-dir', path.join(dir, name)], { stdio: 'ignore' }))
  t.teardown(() => workers.forEach((w) => w.exitCode === null && w.kill('SIGKILL')))
  await eventually(async () => (await api('GET', '/devices/stats')).body.idle === 2, 30_000, 'two idle workers')
  const jobId = (await api('POST', '/training', endless(model.id, 'full_sync'))).body.job_id
  const running = await waitFor(jobId, (job) => job.assigned_devices.length === 2 && job.progress.rounds >= 2, 60_000)

  workers[0]!.kill('SIGKILL')
  const before = running.progress.rounds
  const after = await waitFor(jobId, (job) => job.assigned_devices.length === 1 && job.progress.rounds >= before + 3, 60_000, 'rounds with one device')
  t.equal(after.status, 'running')
  const released = (await store.readStream(trainingStream(jobId))).filter((e) => e.type === 'TrainingDevicesReleased').map((e) => e.data as { reason: string })
  t.ok(released.some((r) => r.reason === 'device disconnected'), 'the dead device left the job')
  const rounds = await roundsOf(store, jobId)
  t.same(rounds.map((r) => r.round), rounds.map((_, i) => i + 1), 'rounds without gaps or repeats')
  t.equal(rounds.at(-1)!.contributions.length, 1, 'later rounds have the one device left')
  t.equal((await api('DELETE', `/training/${jobId}`)).body.status, 'cancelled')
})

t.test('the server killed in the middle of a job: after a restart it resumes from its last round', async (t) => {
  const { database, dataDir, port, url, children } = await serverFixture(t, 'train-restart')
  const env = { ...process.env, DATABASE_URL: database.url, DATA_DIR: dataDir, LOG_LEVEL: 'warn', HEARTBEAT_INTERVAL_MS: '1000' }
  const startServer = () => startServerProcess({ port, env, children })
  const api = async (method: string, route: string, payload?: unknown) => {
    const response = await fetch(`${url}/api/v1${route}`, { method, headers: { 'x-api-key': 'test-api-key', ...(payload ? { 'content-type': 'application/json' } : {}) }, ...(payload ? { body: JSON.stringify(payload) } : {}) })
    return { status: response.status, body: (await response.json()) as any }
  }
  const job = async (id: string) => (await api('GET', `/training/${id}`)).body
  let server = await startServer()
  for (const name of ['a', 'b']) children.push(spawn(process.execPath, [DCP_BIN, 'worker', '--server', url, '--state-dir', path.join(dataDir, `worker-${name}`)], { stdio: 'ignore' }))
  const form = multipart({ name: 'mlp' }, { name: 'mlp.onnx', content: mlpOnnxModel({ ...MLP, seed: 3 }) })
  const model = (await (await fetch(`${url}/api/v1/models`, { method: 'POST', headers: { ...form.headers, 'x-api-key': 'test-api-key' }, body: form.payload })).json()) as { id: string }
  await eventually(async () => (await api('GET', '/devices/stats')).body.idle === 2, 30_000, 'two idle workers')

  const started = await api('POST', '/training', endless(model.id, 'semi_sync'))
  t.equal(started.status, 202, JSON.stringify(started.body))
  const jobId = started.body.job_id
  await eventually(async () => ((await job(jobId)).progress.rounds >= 3 ? true : undefined), 60_000, 'three rounds')
  server.kill('SIGKILL')
  await new Promise((resolve) => server.once('exit', resolve))
  const store = new PostgresEventStore(database.pool)
  const atKill = (await roundsOf(store, jobId)).length

  server = await startServer()
  const resumed = await eventually(async () => {
    const view = await job(jobId)
    return view.status === 'running' && view.assigned_devices.length === 2 && view.progress.rounds >= atKill + 3 ? view : undefined
  }, 90_000, 'the job to run again on both workers after the restart')
  t.ok(resumed.progress.batches_completed > 0)
  const rounds = await roundsOf(store, jobId)
  t.same(rounds.map((r) => r.round), rounds.map((_, i) => i + 1), 'rounds continue from the last one, without a gap or a repeat')
  t.ok(rounds.every((r, i) => i === 0 || r.batches_completed > rounds[i - 1]!.batches_completed), 'progress carries over the restart')
  const events = await store.readStream(trainingStream(jobId))
  t.ok(events.some((e) => e.type === 'TrainingDevicesReleased' && (e.data as { reason: string }).reason === 'server restarted'))
  t.equal((await api('DELETE', `/training/${jobId}`)).body.status, 'cancelled')
  server.kill('SIGINT')
})
