import t, { type Test } from 'tap'
import { syntheticTask } from '../../src/sdk/trainer/synthetic.js'
import { multipart } from '../helpers/app.js'
import { eventually, SimDevice } from '../helpers/device.js'
import { MLP, trainingBody, trainingSetup } from '../helpers/training.js'

/** A CSV of the synthetic 4-class task: a header, 8 feature columns and `label`. */
function clustersCsv(rows: number, seed: number): Buffer {
  const sample = syntheticTask({ inputs: MLP.inputs, outputs: MLP.outputs, seed }).sample(rows, 1)
  const header = [...Array.from({ length: MLP.inputs }, (_, i) => `f${i}`), 'label'].join(',')
  const lines = Array.from({ length: rows }, (_, r) => [...Array.from(sample.x.subarray(r * MLP.inputs, (r + 1) * MLP.inputs), (v) => v.toFixed(5)), sample.labels[r]].join(','))
  return Buffer.from([header, ...lines].join('\n'))
}

/** A device that can train and never sends an update: it only keeps the rows its latest train_start gave it. */
async function shardDevice(t: Test, url: string) {
  const device = await SimDevice.connect(url)
  const latest: { rows?: [number, number] } = {}
  device.socket.on('message', (raw) => {
    const frame = JSON.parse(raw.toString())
    if (frame.type === 'train_start' && frame.data.type === 'dataset') latest.rows = [frame.data.start, frame.data.end]
  })
  await device.register({ canTrain: true })
  const beat = setInterval(() => device.heartbeat(), 300)
  const stop = () => {
    clearInterval(beat)
    device.kill()
  }
  t.teardown(stop)
  return { id: device.deviceId!, latest, stop }
}

/**
 * The guarantee: whatever devices came and went, the shards of a dataset job's members are disjoint and
 * together cover every training row exactly once (each member is told its new shard when it moves).
 */
t.test("a dataset job's shards cover every training row exactly once as devices come and go", async (t) => {
  const { app, alice, api, model, url, training } = await trainingSetup(t)
  const form = multipart({}, { field: 'file', name: 'clusters.csv', content: clustersCsv(1000, 5) })
  const dataset = (await app.inject({ method: 'POST', url: '/api/v1/datasets', headers: { ...form.headers, 'x-api-key': alice.key }, payload: form.payload })).json() as { id: string }
  const devices: Awaited<ReturnType<typeof shardDevice>>[] = []
  const join = async () => {
    const device = await shardDevice(t, url)
    devices.push(device)
    return device
  }
  const first = await join()
  // full sync, and devices that never answer: the job keeps its members, round after round deadline
  const body = trainingBody(model.id, { data: { type: 'dataset', dataset_id: dataset.id, total_samples: undefined }, training: { sync_mode: 'full_sync', target_accuracy: undefined, epochs: 100 } })
  const started = await api('POST', '/training', body)
  t.equal(started.status, 202, JSON.stringify(started.body))
  const jobId = started.body.job_id as string
  const alone = await eventually(async () => first.latest.rows, 10_000, 'the first device started')
  t.equal(alone[0], 0)
  const rows = alone[1]
  t.ok(rows > 700 && rows < 900, `the training rows (${rows}) are the dataset less its validation part`)

  /** Waits until `count` live devices are members, and checks their shards partition [0, rows). */
  const partitioned = async (count: number, what: string) => {
    const members = await eventually(async () => {
      const live = devices.filter((d) => training.jobOfDevice(d.id) === jobId)
      return live.length === count && live.every((d) => d.latest.rows) ? live : undefined
    }, 10_000, `${count} members`)
    // the moved shards reach the devices as frames: wait until they tile the rows, or report what they are
    const tiled = () => {
      const shards = members.map((d) => d.latest.rows!).sort((a, b) => a[0] - b[0])
      let at = 0
      for (const [start, end] of shards) {
        if (start !== at || end <= start) return { ok: false, shards }
        at = end
      }
      return { ok: at === rows, shards }
    }
    const result = await eventually(async () => (tiled().ok ? tiled() : undefined), 5000, what).catch(() => tiled())
    t.ok(result.ok, `${what}: the members' shards ${JSON.stringify(result.shards)} cover [0, ${rows}) once`)
  }

  await join()
  await partitioned(2, 'a second device joined')
  await join()
  await partitioned(3, 'a third device joined')
  devices[1]!.stop()
  await partitioned(2, 'the second device left')
  await join()
  await partitioned(3, 'a fourth device joined')
  devices[0]!.stop()
  devices[2]!.stop()
  await partitioned(1, 'two devices left')
  t.equal((await api('DELETE', `/training/${jobId}`)).body.status, 'cancelled')
})

t.test('real workers keep training a full-sync dataset job while devices come and go and shards move', async (t) => {
  const { app, alice, api, model, store, startDevice, workers, waitFor } = await trainingSetup(t, { devices: 2, roundDeadlineMs: 20_000 })
  const form = multipart({}, { field: 'file', name: 'clusters.csv', content: clustersCsv(2000, 7) })
  const dataset = (await app.inject({ method: 'POST', url: '/api/v1/datasets', headers: { ...form.headers, 'x-api-key': alice.key }, payload: form.payload })).json() as { id: string }
  const body = trainingBody(model.id, { data: { type: 'dataset', dataset_id: dataset.id, total_samples: undefined }, training: { sync_mode: 'full_sync', target_accuracy: undefined, epochs: 1000, local_steps: 5 } })
  const jobId = (await api('POST', '/training', body)).body.job_id as string
  const rounds = async (devices: number, more: number, what: string) => {
    const from = (await api('GET', `/training/${jobId}`)).body
    return waitFor(jobId, (job) => job.assigned_devices.length === devices && job.progress.rounds >= from.progress.rounds + more, 30_000, what)
  }
  await rounds(2, 2, 'rounds with two devices')
  await startDevice()
  await rounds(3, 3, 'rounds with three devices')
  await workers[0]!.stop({ drain: false })
  const after = await rounds(2, 5, 'rounds with the two devices left')
  t.equal(after.status, 'running')
  const reasons = (await store.readStream(`training-${jobId}`)).filter((e) => e.type === 'TrainingDevicesReleased').map((e) => (e.data as { reason: string }).reason)
  t.notOk(reasons.includes('missed the round deadline'), `no device was left behind by a moved shard: ${JSON.stringify(reasons)}`)
  t.equal((await api('DELETE', `/training/${jobId}`)).body.status, 'cancelled')
})
