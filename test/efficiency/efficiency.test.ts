import t, { type Test } from 'tap'
import type { RecordedEvent } from '../../src/event-store/port.js'
import { allEvents } from '../helpers/events.js'
import { eventually } from '../helpers/device.js'
import { MLP, trainingBody, trainingSetup } from '../helpers/training.js'

// ---- figures recomputed from the log, the way docs/efficiency.md defines them ------------------------------

interface Contribution { device_id: string; instance_type: 'aws' | 'user'; samples: number; cpu_ms: number; gpu_ms: number; wall_ms: number; power_watts: number }
interface Round { round: number; accuracy: number; loss: number; validation_loss: number; samples: number; wall_ms: number; at: string; contributions: Contribution[] }

const joules = (c: Contribution) => (c.power_watts * (c.wall_ms > 0 ? c.wall_ms : c.cpu_ms + c.gpu_ms)) / 1000
const sum = (values: number[]) => values.reduce((a, b) => a + b, 0)
const mean = (values: number[]) => sum(values) / values.length
/** percentile_cont: linear interpolation between the closest ranks. */
function percentile(values: number[], p: number) {
  const sorted = [...values].sort((a, b) => a - b)
  const at = p * (sorted.length - 1)
  const lo = Math.floor(at)
  return sorted[lo]! + (sorted[Math.min(lo + 1, sorted.length - 1)]! - sorted[lo]!) * (at - lo)
}

/** One training job as its events tell it. */
function jobFromLog(events: RecordedEvent[], jobId: string, type?: 'aws' | 'user') {
  const mine = events.filter((e) => (e.data as { job_id?: string }).job_id === jobId)
  const spec = mine.find((e) => e.type === 'TrainingSubmitted')!.data as { model_id: string; training_config: { target_accuracy: number | null } }
  const started = Date.parse((mine.find((e) => e.type === 'TrainingDevicesAssigned')!.data as { at: string }).at)
  const rounds = mine.filter((e) => e.type === 'TrainingRoundCompleted').map((e) => e.data as Round)
  const contributions = rounds.flatMap((r) => r.contributions)
  const counted = contributions.filter((c) => !type || c.instance_type === type)
  const wall = (Date.parse(rounds.at(-1)!.at) - started) / 1000
  const target = spec.training_config.target_accuracy
  const hit = target === null ? undefined : rounds.find((r) => r.accuracy >= target)
  const samples = sum(counted.map((c) => c.samples))
  return {
    jobId,
    modelId: spec.model_id,
    rounds,
    started,
    wall,
    samples,
    allSamples: sum(rounds.map((r) => r.samples)),
    energy: sum(counted.map(joules)),
    cpuSeconds: sum(counted.map((c) => c.cpu_ms)) / 1000,
    throughput: sum(rounds.map((r) => r.samples)) / wall,
    tta: hit ? (Date.parse(hit.at) - started) / 1000 : null,
    targetRound: hit?.round ?? null,
    devices: new Set(contributions.map((c) => c.device_id)).size,
    types: new Set(contributions.map((c) => c.instance_type)),
    contributions,
  }
}
type JobFromLog = ReturnType<typeof jobFromLog>

/** |actual - expected| within the API's rounding (`tolerance`) and a hair of relative error. */
function near(t: Test, actual: number | null, expected: number, what: string, tolerance = 1e-3) {
  const ok = actual !== null && Math.abs(actual - expected) <= tolerance + Math.abs(expected) * 1e-9
  t.ok(ok, `${what}: ${actual} ≈ ${expected}`)
}

const mlpInput = (i: number) => ({ data: Array.from({ length: MLP.inputs }, (_, k) => ((k + 1) * (i + 1)) / 10), shape: [1, MLP.inputs] })

t.test('efficiency figures of real training and inference runs, recomputed from the log', async (t) => {
  const { api, model, waitFor, startDevice, store, projections, customer, url } = await trainingSetup(t, { devices: 0 })
  const train = async (body: object) => {
    const started = await api('POST', '/training', body)
    t.equal(started.status, 202, JSON.stringify(started.body))
    const done = await waitFor(started.body.job_id, (job) => job.status !== 'queued' && job.status !== 'running', 45_000)
    t.equal(done.status, 'completed', JSON.stringify(done))
    return started.body.job_id as string
  }
  const infer = async (projectId: string, n: number) => {
    for (let i = 0; i < n; i++) {
      const r = await api('POST', '/inference', { model_id: model.id, project_id: projectId, input: mlpInput(i) })
      t.equal(r.status, 200, JSON.stringify(r.body))
    }
  }
  const project = (await api('POST', '/projects', { name: 'efficiency', type: 'realtime', model_id: model.id })).body.project_id as string

  // given: one job on one aws device, then inference on it
  const aws = await startDevice({ instanceType: 'aws' })
  const job1 = await train(trainingBody(model.id, { resources: { max_devices: 1 } }))
  await infer(project, 4)
  // one job on the aws and a user device together (full sync: both in every round)
  const user = await startDevice({ instanceType: 'user' })
  const job2 = await train(trainingBody(model.id, { training: { sync_mode: 'full_sync' }, resources: { min_devices: 2, max_devices: 2 } }))
  // the aws device leaves; one job on the user device alone, then inference on it
  await aws.stop({ drain: false })
  await eventually(async () => (await api('GET', `/devices/${aws.deviceId}`)).body.status === 'offline', 10_000, 'the aws device offline')
  const job3 = await train(trainingBody(model.id, { resources: { max_devices: 1 } }))
  await infer(project, 3)

  // when a long job runs on the user device, a batch waits for it: both are active runs
  const long = await api('POST', '/training', trainingBody(model.id, { data: { total_samples: 1_000_000 }, training: { target_accuracy: undefined, epochs: 100, local_steps: 1 } }))
  const job4 = long.body.job_id as string
  await waitFor(job4, (job) => job.status === 'running' && job.progress.rounds >= 8, 30_000)
  const batch = await api('POST', '/inference/batch', { model_id: model.id, inputs: [0, 1, 2].map(mlpInput) })
  t.equal(batch.status, 202, JSON.stringify(batch.body))
  const active = await api('GET', '/efficiency/active')
  t.equal(active.status, 200)
  t.test('active runs: the running job with its recent rounds, the waiting batch with its progress', async (t) => {
    const body = active.body
    t.same(body.training.map((j: any) => j.job_id), [job4], 'only the running job (the others are completed)')
    const run = body.training[0]
    t.match(run, { status: 'running', devices: [user.deviceId], device_count: 1, target_accuracy: null })
    const rounds = jobFromLog(await allEvents(store), job4).rounds.filter((r) => r.round <= run.round)
    const last = rounds.slice(-5)
    t.equal(run.round, rounds.at(-1)!.round)
    t.equal(run.accuracy, rounds.at(-1)!.accuracy)
    t.equal(run.samples, sum(rounds.map((r) => r.samples)))
    t.equal(run.recent.rounds, 5)
    t.equal(run.recent.samples, sum(last.map((r) => r.samples)))
    const seconds = sum(last.map((r) => r.wall_ms)) / 1000
    near(t, run.recent.samples_per_s, sum(last.map((r) => r.samples)) / seconds, 'recent samples/s')
    near(t, run.recent.power_watts, sum(last.flatMap((r) => r.contributions.map(joules))) / seconds, 'recent power')
    t.same(body.inference.map((j: any) => j.job_id), [batch.body.job_id])
    t.match(body.inference[0], { status: 'queued', kind: 'batch', total_inputs: 3, completed_inputs: 0, failed_inputs: 0, percent_complete: 0, inputs_per_s: null })
  })
  t.equal((await api('DELETE', `/training/${job4}`)).status, 200)
  await eventually(async () => (await api('GET', `/inference/${batch.body.job_id}`)).body.status === 'completed', 20_000, 'the batch done')
  const after = await api('GET', '/efficiency/active')
  t.same(after.body, { training: [], inference: [], limit: 100 }, 'nothing active once the job is cancelled and the batch done')

  // then: every figure is the one recomputed from the events
  const events = await allEvents(store)
  const jobs = [job1, job2, job3, job4].map((id) => jobFromLog(events, id))
  const [one, two, three, four] = jobs as [JobFromLog, JobFromLog, JobFromLog, JobFromLog]
  t.same([...one.types], ['aws'])
  t.same([...two.types].sort(), ['aws', 'user'])
  t.equal(two.devices, 2, 'full sync: both devices contributed')
  t.same([...three.types], ['user'])
  const baseline = mean([one.throughput, three.throughput])
  const scaling2 = two.throughput / (2 * baseline)

  t.test('GET /efficiency: every job, both device types', async (t) => {
    const s = (await api('GET', '/efficiency')).body
    t.match(s, { instance_type: null, jobs: { total: 4, completed: 3, reached_target: 3, with_rounds: 4 } })
    const ttas = [one.tta!, two.tta!, three.tta!]
    t.equal(s.time_to_accuracy.jobs, 3)
    near(t, s.time_to_accuracy.mean_seconds, mean(ttas), 'mean TTA')
    near(t, s.time_to_accuracy.median_seconds, percentile(ttas, 0.5), 'median TTA')
    t.equal(s.samples, sum(jobs.map((j) => j.samples)))
    near(t, s.wall_seconds, sum(jobs.map((j) => j.wall)), 'wall seconds')
    near(t, s.throughput_samples_per_s, s.samples / sum(jobs.map((j) => j.wall)), 'throughput')
    near(t, s.energy_joules, sum(jobs.map((j) => j.energy)), 'energy')
    near(t, s.samples_per_joule, s.samples / sum(jobs.map((j) => j.energy)), 'samples per joule', 1e-5)
    near(t, s.power_watts, sum(jobs.map((j) => j.energy)) / sum(jobs.map((j) => j.wall)), 'power')
    near(t, s.cpu_seconds, sum(jobs.map((j) => j.cpuSeconds)), 'cpu seconds')
    t.equal(s.scaling.jobs, 1, 'one completed multi-device job with a 1-device baseline')
    near(t, s.scaling.mean_efficiency, scaling2, 'mean scaling efficiency', 1e-5)
  })

  t.test('GET /efficiency?instance_type: only that type contributions; TTA and scaling only over jobs trained on it alone', async (t) => {
    for (const type of ['aws', 'user'] as const) {
      const s = (await api('GET', `/efficiency?instance_type=${type}`)).body
      const typed = [job1, job2, job3, job4].map((id) => jobFromLog(events, id, type)).filter((j) => j.types.has(type))
      const alone = typed.filter((j) => j.types.size === 1 && j.tta !== null)
      t.equal(s.instance_type, type)
      t.equal(s.jobs.total, typed.length, `${type}: jobs it contributed to`)
      t.equal(s.samples, sum(typed.map((j) => j.samples)), `${type}: its samples only`)
      near(t, s.energy_joules, sum(typed.map((j) => j.energy)), `${type}: energy`)
      near(t, s.cpu_seconds, sum(typed.map((j) => j.cpuSeconds)), `${type}: cpu`)
      near(t, s.throughput_samples_per_s, s.samples / sum(typed.map((j) => j.wall)), `${type}: throughput`)
      t.equal(s.time_to_accuracy.jobs, 1, `${type}: one job trained on ${type} alone reached the target`)
      near(t, s.time_to_accuracy.mean_seconds, alone[0]!.tta!, `${type}: TTA`)
      t.match(s.scaling, { mean_efficiency: null, jobs: 0 }, `${type}: no multi-device job of ${type} alone`)
    }
    const both = (await api('GET', '/efficiency')).body
    const [a, u] = await Promise.all(['aws', 'user'].map(async (type) => (await api('GET', `/efficiency?instance_type=${type}`)).body))
    t.equal(a.samples + u.samples, both.samples, 'the two types split the samples')
  })

  t.test('GET /efficiency/comparison: aws against user', async (t) => {
    const c = (await api('GET', '/efficiency/comparison')).body
    const completed = events.filter((e) => e.type === 'TaskCompleted').map((e) => e.data as any)
    const queuedAt = new Map(events.filter((e) => e.type === 'TaskQueued').map((e) => [(e.data as any).task_id, Date.parse((e.data as any).queued_at)]))
    const requestedAt = new Map(events.filter((e) => e.type === 'InferenceRequested').map((e) => [(e.data as any).job_id, Date.parse((e.data as any).requested_at)]))
    for (const type of ['aws', 'user'] as const) {
      const mine = jobs.flatMap((j) => j.contributions).filter((x) => x.instance_type === type)
      const compute = sum(mine.map((x) => x.cpu_ms + x.gpu_ms)) / 1000
      const tr = c[type].training
      t.equal(tr.samples, sum(mine.map((x) => x.samples)), `${type}: training samples`)
      t.equal(tr.devices, 1)
      near(t, tr.energy_joules, sum(mine.map(joules)), `${type}: energy`)
      near(t, tr.cpu_seconds, sum(mine.map((x) => x.cpu_ms)) / 1000, `${type}: cpu seconds`)
      near(t, tr.samples_per_device_s, tr.samples / compute, `${type}: samples per device second`)
      near(t, tr.mean_power_watts, sum(mine.map(joules)) / (sum(mine.map((x) => (x.wall_ms > 0 ? x.wall_ms : x.cpu_ms + x.gpu_ms))) / 1000), `${type}: mean power`)
      near(t, tr.samples_per_joule, tr.samples / sum(mine.map(joules)), `${type}: samples per joule`, 1e-5)

      const tasks = completed.filter((x) => x.instance_type === type)
      const inf = c[type].inference
      t.ok(tasks.length > 0, `${type} ran inference`)
      t.equal(inf.tasks, tasks.length, `${type}: inference tasks`)
      t.equal(inf.inputs, sum(tasks.map((x) => x.inputs)), `${type}: inference inputs`)
      near(t, inf.cpu_seconds, sum(tasks.map((x) => Math.round(x.metrics.cpu_ms * 1000))) / 1e6, `${type}: inference cpu seconds`)
      const latencies = tasks.filter((x) => x.project_id).map((x) => Date.parse(x.completed_at) - queuedAt.get(x.task_id)!)
      t.equal(inf.latency_ms.count, latencies.length)
      near(t, inf.latency_ms.p50, percentile(latencies, 0.5), `${type}: p50`, 0.01)
      near(t, inf.latency_ms.p95, percentile(latencies, 0.95), `${type}: p95`, 0.01)
      const span = (Math.max(...tasks.map((x) => Date.parse(x.completed_at))) - Math.min(...tasks.map((x) => requestedAt.get(x.job_id)!))) / 1000
      near(t, inf.inputs_per_s, inf.inputs / span, `${type}: inputs/s`)
    }
    t.equal(c.aws.inference.inputs, 4, 'the aws device served the first four')
    t.equal(c.user.inference.inputs, 6, 'the user device three, and the batch of three')
  })

  t.test('GET /efficiency/job/:jobId: the two-device job, by device and by type, and its curve', async (t) => {
    const j = (await api('GET', `/efficiency/job/${job2}`)).body
    t.match(j, { job_id: job2, model_id: model.id, status: 'completed', rounds: two.rounds.length, target_accuracy: 0.9, reached_target: true, target_round: two.targetRound, devices: 2, samples: two.samples })
    t.equal(j.started_at, new Date(two.started).toISOString())
    near(t, j.tta_seconds, two.tta!, 'TTA')
    near(t, j.wall_seconds, two.wall, 'wall')
    near(t, j.throughput_samples_per_s, two.throughput, 'throughput')
    near(t, j.energy_joules, sum(two.rounds.map((r) => sum(r.contributions.map(joules)))), 'energy')
    near(t, j.power_watts, two.energy / two.wall, 'power')
    near(t, j.samples_per_joule, two.samples / two.energy, 'samples per joule', 1e-5)
    near(t, j.scaling.efficiency, scaling2, 'scaling efficiency', 1e-5)
    t.equal(j.scaling.baseline_jobs, 2)
    near(t, j.scaling.baseline_samples_per_s, baseline, 'baseline')
    t.equal(j.by_device.length, 2)
    for (const d of j.by_device) {
      const mine = two.contributions.filter((c) => c.device_id === d.device_id)
      t.equal(d.rounds, two.rounds.length, 'full sync: every round')
      t.equal(d.samples, sum(mine.map((c) => c.samples)))
      t.equal(d.instance_type, mine[0]!.instance_type)
      near(t, d.energy_joules, sum(mine.map(joules)), `${d.device_id} energy`)
      t.equal(j.by_instance_type[d.instance_type].samples, d.samples)
    }
    t.equal(j.by_instance_type.aws.devices + j.by_instance_type.user.devices, 2)
    t.same(j.curve.points.map((p: any) => [p.round, p.accuracy, p.loss, p.validation_loss]), two.rounds.map((r) => [r.round, r.accuracy, r.loss, r.validation_loss]))

    const first = (await api('GET', `/efficiency/job/${job1}`)).body
    near(t, first.scaling.efficiency, one.throughput / baseline, 'a 1-device job against the mean baseline', 1e-5)
    t.equal(first.by_instance_type.user.devices, 0)
  })

  t.test('a long job: its curve holds every round, or an evenly spaced subset with the first and the last', async (t) => {
    const full = (await api('GET', `/efficiency/job/${job4}`)).body
    t.match(full, { status: 'cancelled', reached_target: false, tta_seconds: null, target_accuracy: null })
    t.equal(full.curve.rounds, four.rounds.length)
    t.same(full.curve.points.map((p: any) => p.round), four.rounds.map((r) => r.round), 'up to 500 rounds: every one')
    for (const most of [3, 5]) {
      const j = (await api('GET', `/efficiency/job/${job4}?curve_points=${most}`)).body
      const n = four.rounds.length
      const step = Math.ceil((n - 1) / (most - 2))
      const expected = four.rounds.filter((_, i) => i % step === 0 || i === n - 1)
      t.ok(j.curve.points.length <= most, `${j.curve.points.length} points of ${n}, at most ${most}`)
      t.same(j.curve.points.map((p: any) => [p.round, p.accuracy, p.loss]), expected.map((r) => [r.round, r.accuracy, r.loss]), `every ${step}th round and the last`)
      t.equal(j.curve.points.at(-1).round, four.rounds.at(-1)!.round)
      near(t, j.curve.points.at(-1).seconds, (Date.parse(four.rounds.at(-1)!.at) - four.started) / 1000, 'seconds since the start')
    }
    const bad = await api('GET', `/efficiency/job/${job4}?curve_points=2`)
    t.equal(bad.status, 400)
  })

  t.test('charts: one shape for every type, figures as the log says', async (t) => {
    const tta = (await api('GET', '/efficiency/chart/tta')).body
    t.match(tta, { type: 'tta', x_label: 'devices', x_kind: 'number', bucket_seconds: null })
    const series = (chart: any, name: string) => chart.series.find((s: any) => s.name === name).points
    t.same(series(tta, 'aws').map((p: any) => [p.x, p.label]), [[1, job1]])
    t.same(series(tta, 'mixed').map((p: any) => [p.x, p.label]), [[2, job2]])
    t.same(series(tta, 'user').map((p: any) => [p.x, p.label]), [[1, job3]])
    near(t, series(tta, 'mixed')[0].y, two.tta!, 'mixed job TTA')
    near(t, series(tta, 'median').find((p: any) => p.x === 1).y, (one.tta! + three.tta!) / 2, 'median TTA of 1-device jobs')

    const scaling = (await api('GET', '/efficiency/chart/scaling')).body
    t.same(series(scaling, 'scaling_efficiency').map((p: any) => [p.x, p.label]), [[1, model.id], [2, model.id]])
    t.equal(series(scaling, 'scaling_efficiency')[0].y, 1)
    near(t, series(scaling, 'scaling_efficiency')[1].y, scaling2, 'scaling at 2', 1e-5)
    near(t, series(scaling, 'throughput')[0].y, baseline, 'throughput at 1')

    const power = (await api('GET', '/efficiency/chart/power?bucket_seconds=1')).body
    t.match(power, { type: 'power', x_kind: 'time', bucket_seconds: 1 })
    const energyPoints = series(power, 'energy')
    near(t, sum(energyPoints.map((p: any) => p.y)), sum(jobs.map((j) => j.energy)), 'energy over time sums to the total', 1e-3 * energyPoints.length)
    for (const type of ['aws', 'user'] as const) {
      const mine = jobs.flatMap((j) => j.contributions).filter((c) => c.instance_type === type)
      const points = series(power, `power_${type}`)
      near(t, sum(points.map((p: any) => p.y)), sum(mine.map(joules)), `${type} power x 1 s sums to its energy`, 1e-3 * points.length)
    }

    const throughput = (await api('GET', '/efficiency/chart/throughput?bucket_seconds=2')).body
    t.equal(throughput.bucket_seconds, 2)
    const trained = series(throughput, 'training')
    near(t, sum(trained.map((p: any) => p.y * 2)), sum(jobs.map((j) => j.allSamples)), 'training samples over time', 2e-3 * trained.length)
    const inferred = series(throughput, 'inference')
    near(t, sum(inferred.map((p: any) => p.y * 2)), 10, 'every inference input over time', 2e-3 * inferred.length)
    const derived = (await api('GET', '/efficiency/chart/throughput')).body
    t.ok(derived.bucket_seconds >= 1 && derived.series.every((s: any) => s.points.length <= 61), `derived bucket ${derived.bucket_seconds} s`)
    for (const chart of [tta, scaling, power, throughput]) {
      t.same(Object.keys(chart).sort(), ['bucket_seconds', 'series', 'title', 'type', 'x_kind', 'x_label', 'y_label'])
      t.ok(chart.series.every((s: any) => typeof s.name === 'string' && typeof s.unit === 'string' && s.points.every((p: any) => typeof p.x === 'number' && typeof p.y === 'number' && 'label' in p)))
    }
  })

  t.test('a replay of the training log gives the same figures', async (t) => {
    const before = await Promise.all(['/efficiency', '/efficiency/comparison', `/efficiency/job/${job2}`, '/efficiency/chart/scaling'].map(async (route) => (await api('GET', route)).body))
    await projections.rebuild('training')
    const rebuilt = await Promise.all(['/efficiency', '/efficiency/comparison', `/efficiency/job/${job2}`, '/efficiency/chart/scaling'].map(async (route) => (await api('GET', route)).body))
    t.same(rebuilt, before)
  })

  t.test("another customer sees none of it; bad parameters are 400", async (t) => {
    const bob = await customer()
    const as = (key: string) => async (route: string) => {
      const response = await fetch(`${url}/api/v1${route}`, { headers: { 'x-api-key': key } })
      return { status: response.status, body: (await response.json()) as any }
    }
    const get = as(bob.key)
    const other = await get(`/efficiency/job/${job1}`)
    t.equal(other.status, 404)
    t.equal(other.body.error.code, 'NOT_FOUND')
    t.equal((await get('/efficiency/job/train_nope')).status, 404)
    t.match((await get('/efficiency')).body, { jobs: { total: 0 }, samples: 0, throughput_samples_per_s: null, time_to_accuracy: { mean_seconds: null } })
    t.match((await get('/efficiency/comparison')).body, { aws: { training: { samples: 0 }, inference: { tasks: 0, latency_ms: { p50: null } } } })
    t.same((await get('/efficiency/chart/tta')).body.series.flatMap((s: any) => s.points), [])
    t.same((await get('/efficiency/active')).body, { training: [], inference: [], limit: 100 })
    for (const route of ['/efficiency?instance_type=gpu', '/efficiency/chart/pie', '/efficiency/chart/power?bucket_seconds=0', '/efficiency/chart/throughput?bucket_seconds=x', '/efficiency/active?limit=0', `/efficiency/job/${'a'.repeat(81)}`]) {
      const r = await get(route)
      t.equal(r.status, 400, route)
      t.equal(r.body.error.code, 'VALIDATION_ERROR', route)
    }
    const anonymous = await fetch(`${url}/api/v1/efficiency`)
    t.equal(anonymous.status, 401)
  })
})
