import { type Kysely, type RawBuilder, sql } from 'kysely'
import { trainingStatus, type TrainingPhase } from '../domain/training-job.js'
import { inferenceProjection, jobStatus } from './inference.js'
import { liveSchema } from './projection.js'
import { projectsProjection } from './projects.js'
import { trainingProjection } from './training.js'
import { usageProjection } from './usage.js'

/**
 * Efficiency figures of training and inference, computed in SQL from the existing read models (no table of
 * their own): `rm_training` (jobs, rounds and their per-device contributions), `rm_projects` (task latency),
 * `rm_inference` (results and open jobs) and `rm_usage` (compute time). Those are built from events, so a
 * replay gives the same figures; sums of floating-point values are taken as `numeric`, which makes them
 * independent of the order Postgres reads the rows in. Every list is bounded. The definitions are in
 * docs/efficiency.md; in short (per training job):
 *
 *   wall_s      = last round's `at` - `started_at` (its first device assignment)
 *   throughput  = samples / wall_s
 *   tta_s       = first round with accuracy >= target_accuracy: its `at` - `started_at` (null if never)
 *   energy      = Σ rounds' energy_joules  (= Σ power_watts * wall_ms / 1000 over contributions; cpu_ms + gpu_ms
 *                 for a contribution that reported no wall time)
 *   power       = energy / wall_s
 *   N           = distinct devices that contributed to any round
 *   scaling     = throughput / (N * baseline), baseline = mean throughput of the customer's completed
 *                 1-device jobs of the same model (null without one)
 */

export const INSTANCE_TYPES = ['aws', 'user'] as const
export type InstanceType = (typeof INSTANCE_TYPES)[number]
export const CHART_TYPES = ['tta', 'scaling', 'power', 'throughput'] as const
export type ChartType = (typeof CHART_TYPES)[number]

/** Points a job's accuracy/loss curve is downsampled to, at most (default and ceiling of `curvePoints`). */
export const MAX_CURVE_POINTS = 500
/** Points of one chart series, at most (time charts widen their buckets to stay under it). */
export const MAX_CHART_POINTS = 1000
/** Rounds the "recent" figures of an active job are taken over. */
export const RECENT_ROUNDS = 5
/** Devices listed in a job's breakdown, at most (the most samples first). */
export const MAX_JOB_DEVICES = 1000

const table = (projection: { name: string }, name: string) => sql.table(`${liveSchema(projection.name)}.${name}`)
const JOBS = table(trainingProjection, 'training_jobs')
const ROUNDS = table(trainingProjection, 'training_rounds')
const PROJECTS = table(projectsProjection, 'projects')
const PROJECT_TASKS = table(projectsProjection, 'project_tasks')
const DEVICE_TYPES = table(projectsProjection, 'device_instance_types')
const INFERENCE_JOBS = table(inferenceProjection, 'inference_jobs')
const INFERENCE_RESULTS = table(inferenceProjection, 'inference_results')
const USAGE = table(usageProjection, 'usage_hourly')

/** The columns of a round's `contributions` that the figures use. */
const CONTRIBUTIONS = sql`jsonb_to_recordset(r.contributions) as c(device_id text, instance_type text, samples bigint, cpu_ms float8, gpu_ms float8, wall_ms float8, power_watts float8)`
/** A contribution's energy in joules, as the training projection computes a round's. */
/** The time a contribution trained for, in ms: its wall time, or its compute time when it did not report one. */
const CONTRIBUTION_MS = sql`(case when coalesce(c.wall_ms, 0) > 0 then c.wall_ms else c.cpu_ms + c.gpu_ms end)`
const CONTRIBUTION_J = sql`(c.power_watts * ${CONTRIBUTION_MS} / 1000)`

// ---- numbers ----------------------------------------------------------------------------------------------

/** pg hands bigint and numeric over as strings. */
function num(value: unknown): number | null {
  if (value === null || value === undefined) return null
  const n = Number(value)
  return Number.isFinite(n) ? n : null
}
const int = (value: unknown) => num(value) ?? 0
const roundTo = (digits: number) => (value: number | null | undefined) => (value == null || !Number.isFinite(value) ? null : Math.round(value * 10 ** digits) / 10 ** digits)
/** Seconds, joules, watts and rates: to the thousandth. */
const r3 = roundTo(3)
/** Ratios (scaling efficiency, samples per joule): to the millionth. */
const r6 = roundTo(6)
const ratio = (a: number | null, b: number | null) => (a === null || b === null || b <= 0 ? null : a / b)

/**
 * Figures of a set of contributions from their sums (`samples`, `cpu_ms`, `gpu_ms`, `train_ms`, `energy` in
 * J): compute seconds are CPU + GPU time, so `samples_per_device_s` is the rate a device trains at while it
 * computes; `mean_power_watts` is energy over the time the devices trained (their local steps' wall time).
 */
function contributionFigures(sums: Record<string, unknown>) {
  const samples = int(sums.samples)
  const cpuS = (num(sums.cpu_ms) ?? 0) / 1000
  const gpuS = (num(sums.gpu_ms) ?? 0) / 1000
  const energy = num(sums.energy) ?? 0
  const trainS = (num(sums.train_ms) ?? 0) / 1000
  return {
    samples,
    cpu_seconds: r3(cpuS),
    gpu_seconds: r3(gpuS),
    samples_per_device_s: r3(ratio(samples, cpuS + gpuS)),
    energy_joules: r3(energy),
    samples_per_joule: r6(ratio(samples, energy)),
    mean_power_watts: r3(ratio(energy, trainS)),
  }
}

// ---- per-job figures ----------------------------------------------------------------------------------------

interface FigureScope {
  /** Only the contributions of devices of this type count (samples, compute, energy). */
  instanceType?: InstanceType | undefined
  modelId?: string | undefined
}

/**
 * The CTEs every training query starts from: `fig`, one row per job of the customer (of `modelId` if given)
 * with its figures, and `base`, the scaling baseline of each model. With an instance type, `samples`,
 * `energy`, `cpu_ms` and `gpu_ms` count only that type's contributions, `in_set` says whether the type
 * contributed at all, and `type_only` whether it did every contribution (TTA and scaling use only such jobs).
 */
function figures(customerId: string, scope: FigureScope = {}): RawBuilder<unknown> {
  const type = scope.instanceType ?? null
  const ofType = type === null ? sql`true` : sql`c.instance_type = ${type}`
  return sql`
  job as (
    select job_id, model_id, phase, end_reason, devices as current_devices, round as last_round, submitted_at,
      started_at::timestamptz as started, finished_at,
      (spec -> 'training_config' ->> 'target_accuracy')::float8 as target
    from ${JOBS}
    where customer_id = ${customerId} ${scope.modelId === undefined ? sql`` : sql`and model_id = ${scope.modelId}`}
  ),
  rnd as (
    select r.job_id, count(*) as rounds, max(r.at::timestamptz) as last_at, sum(r.samples) as samples,
      sum(r.energy_joules::numeric) as energy,
      (array_agg(r.at::timestamptz order by r.round) filter (where r.accuracy >= job.target))[1] as target_at,
      (array_agg(r.round order by r.round) filter (where r.accuracy >= job.target))[1] as target_round
    from ${ROUNDS} r join job using (job_id)
    group by r.job_id
  ),
  con as (
    select r.job_id, count(distinct c.device_id) as n,
      bool_or(c.instance_type = 'aws') as has_aws, bool_or(c.instance_type = 'user') as has_user,
      bool_or(${ofType}) as type_any, bool_and(${ofType}) as type_all,
      coalesce(sum(c.samples) filter (where ${ofType}), 0) as samples,
      coalesce(sum(${CONTRIBUTION_J}::numeric) filter (where ${ofType}), 0) as energy,
      coalesce(sum(c.cpu_ms::numeric) filter (where ${ofType}), 0) as cpu_ms,
      coalesce(sum(c.gpu_ms::numeric) filter (where ${ofType}), 0) as gpu_ms
    from ${ROUNDS} r join job using (job_id) cross join lateral ${CONTRIBUTIONS}
    group by r.job_id
  ),
  fig as (
    select job.*, coalesce(rnd.rounds, 0) as rounds, rnd.last_at, rnd.target_at, rnd.target_round,
      coalesce(con.n, 0) as n, coalesce(con.has_aws, false) as has_aws, coalesce(con.has_user, false) as has_user,
      ${type === null ? sql`true` : sql`coalesce(con.type_any, false)`} as in_set,
      ${type === null ? sql`true` : sql`coalesce(con.type_all, false)`} as type_only,
      ${type === null ? sql`coalesce(rnd.samples, 0)` : sql`coalesce(con.samples, 0)`} as samples,
      ${type === null ? sql`coalesce(rnd.energy, 0)` : sql`coalesce(con.energy, 0)`} as energy,
      coalesce(con.cpu_ms, 0) as cpu_ms, coalesce(con.gpu_ms, 0) as gpu_ms,
      coalesce(rnd.samples, 0) as all_samples,
      extract(epoch from rnd.last_at - job.started)::float8 as wall_s,
      extract(epoch from rnd.target_at - job.started)::float8 as tta_s,
      rnd.samples / nullif(extract(epoch from rnd.last_at - job.started)::float8, 0) as throughput
    from job left join rnd using (job_id) left join con using (job_id)
  ),
  base as (
    select model_id, avg(throughput::numeric)::float8 as thr1, count(*) as jobs
    from fig where phase = 'completed' and n = 1 and throughput is not null and type_only
    group by model_id
  )`
}

/** A job's scaling efficiency in SQL, over `fig` joined with `base` (null when it has no baseline or throughput). */
const SCALING = sql`(fig.throughput / nullif(fig.n * base.thr1, 0))`

// ---- GET /efficiency ----------------------------------------------------------------------------------------

/**
 * Aggregate training figures of the customer's jobs. With `instanceType`, only jobs that device type
 * contributed to count, with only its contributions' samples, compute and energy; TTA and scaling only over
 * jobs trained on that type alone.
 */
export async function efficiencySummary(db: Kysely<any>, customerId: string, instanceType?: InstanceType) {
  const { rows } = await sql<Record<string, unknown>>`
  with ${figures(customerId, { instanceType })}
  select
    count(*) filter (where in_set) as total,
    count(*) filter (where in_set and phase = 'completed') as completed,
    count(*) filter (where in_set and target_at is not null) as reached_target,
    count(*) filter (where in_set and rounds > 0) as with_rounds,
    count(tta_s) filter (where type_only) as tta_jobs,
    avg(tta_s::numeric) filter (where type_only) as tta_mean,
    percentile_cont(0.5) within group (order by tta_s) filter (where type_only) as tta_median,
    min(tta_s) filter (where type_only) as tta_min,
    max(tta_s) filter (where type_only) as tta_max,
    coalesce(sum(samples) filter (where in_set), 0) as samples,
    sum(wall_s::numeric) filter (where in_set and wall_s is not null) as wall_s,
    coalesce(sum(energy) filter (where in_set), 0) as energy,
    coalesce(sum(cpu_ms) filter (where in_set), 0) as cpu_ms,
    coalesce(sum(gpu_ms) filter (where in_set), 0) as gpu_ms,
    avg((${SCALING})::numeric) filter (where phase = 'completed' and n >= 2 and type_only) as scaling_mean,
    count(${SCALING}) filter (where phase = 'completed' and n >= 2 and type_only) as scaling_jobs
  from fig left join base using (model_id)`.execute(db)
  const row = rows[0] ?? {}
  const samples = int(row.samples)
  const wall = num(row.wall_s)
  const energy = num(row.energy) ?? 0
  return {
    instance_type: instanceType ?? null,
    jobs: { total: int(row.total), completed: int(row.completed), reached_target: int(row.reached_target), with_rounds: int(row.with_rounds) },
    time_to_accuracy: { jobs: int(row.tta_jobs), mean_seconds: r3(num(row.tta_mean)), median_seconds: r3(num(row.tta_median)), min_seconds: r3(num(row.tta_min)), max_seconds: r3(num(row.tta_max)) },
    samples,
    wall_seconds: r3(wall),
    throughput_samples_per_s: r3(ratio(samples, wall)),
    cpu_seconds: r3((num(row.cpu_ms) ?? 0) / 1000),
    gpu_seconds: r3((num(row.gpu_ms) ?? 0) / 1000),
    energy_joules: r3(energy),
    samples_per_joule: r6(ratio(samples, energy)),
    power_watts: r3(ratio(energy, wall)),
    scaling: { mean_efficiency: r6(num(row.scaling_mean)), jobs: int(row.scaling_jobs) },
  }
}
export type EfficiencySummary = Awaited<ReturnType<typeof efficiencySummary>>

// ---- GET /efficiency/comparison -----------------------------------------------------------------------------

/**
 * aws against user devices: training from the rounds' contributions, inference from usage, tasks and results,
 * each under the instance type the work was billed as (a device's registration type only for results recorded
 * before outcomes carried it).
 */
export async function efficiencyComparison(db: Kysely<any>, customerId: string) {
  const [training, usage, latency, rates] = await Promise.all([
    sql<Record<string, unknown>>`
      select c.instance_type, count(distinct c.device_id) as devices, count(distinct r.job_id) as jobs, count(*) as contributions,
        sum(c.samples) as samples, sum(c.cpu_ms::numeric) as cpu_ms, sum(c.gpu_ms::numeric) as gpu_ms, sum(${CONTRIBUTION_MS}::numeric) as train_ms, sum(${CONTRIBUTION_J}::numeric) as energy
      from ${ROUNDS} r join ${JOBS} j using (job_id) cross join lateral ${CONTRIBUTIONS}
      where j.customer_id = ${customerId}
      group by c.instance_type`.execute(db),
    sql<Record<string, unknown>>`
      select instance_type, sum(tasks) as tasks, sum(inputs) as inputs, sum(cpu_us) as cpu_us, sum(gpu_us) as gpu_us
      from ${USAGE} where customer_id = ${customerId} and outcome = 'completed'
      group by instance_type`.execute(db),
    sql<Record<string, unknown>>`
      select t.instance_type, count(*) as tasks, sum(t.inputs) as inputs, avg(t.latency_ms::numeric) as mean,
        percentile_cont(array[0.5, 0.95]::float8[]) within group (order by t.latency_ms) as pct
      from ${PROJECT_TASKS} t join ${PROJECTS} p using (project_id)
      where p.customer_id = ${customerId} and t.status = 'completed'
      group by t.instance_type`.execute(db),
    sql<Record<string, unknown>>`
      select coalesce(ir.instance_type, d.instance_type) as instance_type, sum(ir.count) as inputs,
        extract(epoch from max(ir.finished_at::timestamptz) - min(ij.requested_at::timestamptz))::float8 as span_s
      from ${INFERENCE_RESULTS} ir join ${INFERENCE_JOBS} ij using (job_id) left join ${DEVICE_TYPES} d on d.device_id = ir.device_id
      where ij.customer_id = ${customerId} and ir.status = 'completed'
      group by 1`.execute(db),
  ])
  const of = (rows: Record<string, unknown>[], type: InstanceType) => rows.find((r) => r.instance_type === type) ?? {}
  const side = (type: InstanceType) => {
    const t = of(training.rows, type)
    return {
      training: { devices: int(t.devices), jobs: int(t.jobs), contributions: int(t.contributions), ...contributionFigures(t) },
      inference: inferenceFigures(of(usage.rows, type), of(latency.rows, type), of(rates.rows, type)),
    }
  }
  return { aws: side('aws'), user: side('user') }
}

/** One device type's inference: usage sums, project task latency, and results over their span. */
function inferenceFigures(usage: Record<string, unknown>, latency: Record<string, unknown>, rate: Record<string, unknown>) {
  const inputs = int(usage.inputs)
  const pct = (latency.pct as number[] | null | undefined) ?? null
  const ms = roundTo(2)
  return {
    tasks: int(usage.tasks),
    inputs,
    cpu_seconds: r3(int(usage.cpu_us) / 1e6),
    gpu_seconds: r3(int(usage.gpu_us) / 1e6),
    inputs_per_compute_s: r3(ratio(inputs, (int(usage.cpu_us) + int(usage.gpu_us)) / 1e6)),
    inputs_per_s: r3(ratio(int(rate.inputs), num(rate.span_s))),
    latency_ms: { count: int(latency.tasks), p50: ms(pct?.[0]), p95: ms(pct?.[1]), mean: ms(num(latency.mean)) },
  }
}

// ---- GET /efficiency/chart/:type ----------------------------------------------------------------------------

export interface ChartPoint {
  x: number
  y: number
  /** What the point is (a job id, a model id), or null. */
  label: string | null
}
export interface Chart {
  type: ChartType
  title: string
  x_label: string
  y_label: string
  /** `time`: x is a Unix time in milliseconds (a bucket's start); `number`: a plain value. */
  x_kind: 'number' | 'time'
  /** Width of a time bucket in seconds (time charts), else null. */
  bucket_seconds: number | null
  series: { name: string; unit: string; points: ChartPoint[] }[]
}
export interface ChartOptions {
  /** Time charts: width of a bucket. Default: the span over 60 (at least 1 s); widened to keep at most 1,000 buckets. */
  bucketSeconds?: number | undefined
}

/** Chart-ready series, the same shape for every type (see docs/efficiency.md for what each holds). */
export async function efficiencyChart(db: Kysely<any>, customerId: string, type: ChartType, options: ChartOptions = {}): Promise<Chart> {
  switch (type) {
    case 'tta':
      return ttaChart(db, customerId)
    case 'scaling':
      return scalingChart(db, customerId)
    case 'power':
      return powerChart(db, customerId, options)
    case 'throughput':
      return throughputChart(db, customerId, options)
    default: {
      const unknown: never = type
      throw new Error(`unknown chart ${unknown}`)
    }
  }
}

/** Per job that reached its target: x devices, y seconds to target, in series by the devices' types; and the median per device count. */
async function ttaChart(db: Kysely<any>, customerId: string): Promise<Chart> {
  const [jobs, medians] = await Promise.all([
    sql<Record<string, unknown>>`
      with ${figures(customerId)}
      select job_id, n, tta_s, has_aws, has_user from fig where tta_s is not null
      order by started desc, job_id limit ${MAX_CHART_POINTS}`.execute(db),
    sql<Record<string, unknown>>`
      with ${figures(customerId)}
      select n, percentile_cont(0.5) within group (order by tta_s) as median from fig where tta_s is not null
      group by n order by n limit ${MAX_CHART_POINTS}`.execute(db),
  ])
  const mix = (r: Record<string, unknown>) => (r.has_aws && r.has_user ? 'mixed' : r.has_aws ? 'aws' : 'user')
  const points = (name: string) =>
    jobs.rows.filter((r) => mix(r) === name).map((r) => ({ x: int(r.n), y: r3(num(r.tta_s))!, label: r.job_id as string })).sort((a, b) => a.x - b.x || a.y - b.y)
  return {
    type: 'tta',
    title: 'Time to target accuracy by devices',
    x_label: 'devices',
    y_label: 'seconds to target accuracy',
    x_kind: 'number',
    bucket_seconds: null,
    series: [
      ...['aws', 'user', 'mixed'].map((name) => ({ name, unit: 's', points: points(name) })),
      { name: 'median', unit: 's', points: medians.rows.map((r) => ({ x: int(r.n), y: r3(num(r.median))!, label: null })) },
    ],
  }
}

/** Per model and device count over completed jobs: scaling efficiency (where a 1-device baseline exists) and mean throughput. */
async function scalingChart(db: Kysely<any>, customerId: string): Promise<Chart> {
  const { rows } = await sql<Record<string, unknown>>`
    with ${figures(customerId)}
    select fig.model_id, fig.n, avg(fig.throughput::numeric)::float8 as throughput, count(*) as jobs, min(base.thr1) as thr1
    from fig left join base using (model_id)
    where fig.phase = 'completed' and fig.throughput is not null and fig.n > 0
    group by fig.model_id, fig.n order by fig.model_id, fig.n limit ${MAX_CHART_POINTS}`.execute(db)
  const efficiency = rows
    .filter((r) => num(r.thr1) !== null)
    .map((r) => ({ x: int(r.n), y: r6(num(r.throughput)! / (int(r.n) * num(r.thr1)!))!, label: r.model_id as string }))
  return {
    type: 'scaling',
    title: 'Scaling efficiency by devices',
    x_label: 'devices',
    y_label: 'scaling efficiency (throughput with N devices / (N x throughput with 1))',
    x_kind: 'number',
    bucket_seconds: null,
    series: [
      { name: 'scaling_efficiency', unit: 'ratio', points: efficiency },
      { name: 'throughput', unit: 'samples/s', points: rows.map((r) => ({ x: int(r.n), y: r3(num(r.throughput))!, label: r.model_id as string })) },
    ],
  }
}

/** The bucket width for a span: the one asked for, or the span over 60, widened to keep at most MAX_CHART_POINTS buckets. */
function bucketFor(spanSeconds: number, requested: number | undefined): number {
  const wanted = requested ?? Math.ceil(spanSeconds / 60)
  return Math.max(1, wanted, Math.ceil(spanSeconds / MAX_CHART_POINTS))
}

const bucketOf = (column: RawBuilder<unknown>, bucket: number) => sql`floor(extract(epoch from ${column}) / ${bucket}::float8) * ${bucket}::float8`

/** Training rounds' time span of the customer, in Unix seconds. */
function roundSpan(customerId: string) {
  return sql`select extract(epoch from r.at::timestamptz)::float8 as t from ${ROUNDS} r join ${JOBS} j using (job_id) where j.customer_id = ${customerId}`
}

async function spanOf(db: Kysely<any>, times: RawBuilder<unknown>): Promise<number> {
  const { rows } = await sql<{ first: number | null; last: number | null }>`select min(t) as first, max(t) as last from (${times}) s`.execute(db)
  const first = num(rows[0]?.first)
  const last = num(rows[0]?.last)
  return first === null || last === null ? 0 : last - first
}

/** Mean power per time bucket (energy of the rounds that ended in it / its width), in total and by instance type, and the energy. */
async function powerChart(db: Kysely<any>, customerId: string, options: ChartOptions): Promise<Chart> {
  const bucket = bucketFor(await spanOf(db, roundSpan(customerId)), options.bucketSeconds)
  const [total, byType] = await Promise.all([
    sql<Record<string, unknown>>`
      select ${bucketOf(sql`r.at::timestamptz`, bucket)} as t, sum(r.energy_joules::numeric) as energy
      from ${ROUNDS} r join ${JOBS} j using (job_id) where j.customer_id = ${customerId}
      group by t order by t`.execute(db),
    sql<Record<string, unknown>>`
      select ${bucketOf(sql`r.at::timestamptz`, bucket)} as t, c.instance_type, sum(${CONTRIBUTION_J}::numeric) as energy
      from ${ROUNDS} r join ${JOBS} j using (job_id) cross join lateral ${CONTRIBUTIONS} where j.customer_id = ${customerId}
      group by t, c.instance_type order by t`.execute(db),
  ])
  const watts = (rows: Record<string, unknown>[]) => rows.map((r) => ({ x: int(r.t) * 1000, y: r3(num(r.energy)! / bucket)!, label: null }))
  return {
    type: 'power',
    title: 'Training power over time',
    x_label: 'time',
    y_label: 'mean power (W) over the bucket',
    x_kind: 'time',
    bucket_seconds: bucket,
    series: [
      { name: 'power', unit: 'W', points: watts(total.rows) },
      ...INSTANCE_TYPES.map((type) => ({ name: `power_${type}`, unit: 'W', points: watts(byType.rows.filter((r) => r.instance_type === type)) })),
      { name: 'energy', unit: 'J', points: total.rows.map((r) => ({ x: int(r.t) * 1000, y: r3(num(r.energy))!, label: null })) },
    ],
  }
}

/** Training samples/s (rounds by their end) and inference inputs/s (completed results by their finish) per time bucket. */
async function throughputChart(db: Kysely<any>, customerId: string, options: ChartOptions): Promise<Chart> {
  const inference = sql`from ${INFERENCE_RESULTS} ir join ${INFERENCE_JOBS} ij using (job_id) where ij.customer_id = ${customerId} and ir.status = 'completed'`
  const times = sql`${roundSpan(customerId)} union all select extract(epoch from ir.finished_at::timestamptz)::float8 as t ${inference}`
  const bucket = bucketFor(await spanOf(db, times), options.bucketSeconds)
  const [training, inferred] = await Promise.all([
    sql<Record<string, unknown>>`
      select ${bucketOf(sql`r.at::timestamptz`, bucket)} as t, sum(r.samples) as n
      from ${ROUNDS} r join ${JOBS} j using (job_id) where j.customer_id = ${customerId}
      group by t order by t`.execute(db),
    sql<Record<string, unknown>>`
      select ${bucketOf(sql`ir.finished_at::timestamptz`, bucket)} as t, sum(ir.count) as n ${inference}
      group by t order by t`.execute(db),
  ])
  const rate = (rows: Record<string, unknown>[]) => rows.map((r) => ({ x: int(r.t) * 1000, y: r3(int(r.n) / bucket)!, label: null }))
  return {
    type: 'throughput',
    title: 'Throughput over time',
    x_label: 'time',
    y_label: 'items per second over the bucket',
    x_kind: 'time',
    bucket_seconds: bucket,
    series: [
      { name: 'training', unit: 'samples/s', points: rate(training.rows) },
      { name: 'inference', unit: 'inputs/s', points: rate(inferred.rows) },
    ],
  }
}

// ---- GET /efficiency/active ---------------------------------------------------------------------------------

/**
 * The customer's runs in progress, newest first, at most `limit` of each kind: training jobs not paused or
 * finished (running or queued) with their figures over the last RECENT_ROUNDS rounds, and inference jobs
 * with inputs still to finish.
 */
export async function activeRuns(db: Kysely<any>, customerId: string, limit = 100) {
  const [training, inference] = await Promise.all([
    sql<Record<string, unknown>>`
      select j.job_id, j.model_id, j.phase, j.devices, j.round, j.samples, j.accuracy, j.best_accuracy, j.started_at, j.updated_at,
        (j.spec -> 'training_config' ->> 'target_accuracy')::float8 as target,
        recent.rounds as recent_rounds, recent.samples as recent_samples, recent.wall_ms as recent_wall_ms, recent.energy as recent_energy
      from ${JOBS} j left join lateral (
        select count(*) as rounds, sum(samples) as samples, sum(wall_ms::numeric) as wall_ms, sum(energy_joules::numeric) as energy
        from (select samples, wall_ms, energy_joules from ${ROUNDS} r where r.job_id = j.job_id order by r.round desc limit ${RECENT_ROUNDS}) last
      ) recent on true
      where j.customer_id = ${customerId} and j.phase = 'active'
      order by j.submitted_at desc, j.job_id limit ${limit}`.execute(db),
    sql<Record<string, unknown>>`
      select job_id, project_id, model_id, kind, mode, total_tasks, completed, failed, cancelled, requested_at, updated_at,
        extract(epoch from updated_at::timestamptz - requested_at::timestamptz)::float8 as elapsed_s
      from ${INFERENCE_JOBS}
      where customer_id = ${customerId} and not cancelled and completed + failed < total_tasks
      order by requested_at desc, job_id limit ${limit}`.execute(db),
  ])
  return {
    training: training.rows.map((r) => {
      const devices = r.devices as string[]
      const seconds = (num(r.recent_wall_ms) ?? 0) / 1000
      const energy = num(r.recent_energy)
      return {
        job_id: r.job_id as string,
        model_id: r.model_id as string,
        status: trainingStatus(r.phase as TrainingPhase, devices.length),
        devices,
        device_count: devices.length,
        round: int(r.round),
        samples: int(r.samples),
        accuracy: num(r.accuracy),
        best_accuracy: num(r.best_accuracy),
        target_accuracy: num(r.target),
        started_at: (r.started_at as string | null) ?? null,
        updated_at: r.updated_at as string,
        recent: {
          rounds: int(r.recent_rounds),
          samples: int(r.recent_samples),
          seconds: r3(seconds),
          samples_per_s: r3(ratio(int(r.recent_samples), seconds)),
          energy_joules: r3(energy),
          power_watts: r3(ratio(energy, seconds)),
        },
      }
    }),
    inference: inference.rows.map((r) => {
      const job = { total_tasks: int(r.total_tasks), completed: int(r.completed), failed: int(r.failed), cancelled: Boolean(r.cancelled) }
      return {
        job_id: r.job_id as string,
        project_id: (r.project_id as string | null) ?? null,
        model_id: r.model_id as string,
        kind: r.kind as 'single' | 'batch',
        mode: r.mode as 'sync' | 'async',
        status: jobStatus(job),
        total_inputs: job.total_tasks,
        completed_inputs: job.completed,
        failed_inputs: job.failed,
        percent_complete: job.total_tasks > 0 ? Math.round(((job.completed + job.failed) / job.total_tasks) * 10_000) / 100 : 0,
        requested_at: r.requested_at as string,
        updated_at: r.updated_at as string,
        inputs_per_s: r3(ratio(job.completed, num(r.elapsed_s))),
      }
    }),
    limit,
  }
}

// ---- GET /efficiency/job/:jobId -----------------------------------------------------------------------------

export interface JobEfficiencyOptions {
  /** Most points of the curve, 3 to 500 (default 500): every round when it has no more, else every k-th round from the first, and the last. */
  curvePoints?: number | undefined
}

/** One training job's figures, its breakdown by device and by instance type, and its curve; undefined when it is not the customer's. */
export async function jobEfficiency(db: Kysely<any>, customerId: string, jobId: string, options: JobEfficiencyOptions = {}) {
  const most = Math.min(MAX_CURVE_POINTS, Math.max(3, Math.floor(options.curvePoints ?? MAX_CURVE_POINTS)))
  const owner = await sql<{ model_id: string }>`select model_id from ${JOBS} where job_id = ${jobId} and customer_id = ${customerId}`.execute(db)
  const modelId = owner.rows[0]?.model_id
  if (modelId === undefined) return undefined
  const [figure, devices, types, curve] = await Promise.all([
    sql<Record<string, unknown>>`
      with ${figures(customerId, { modelId })}
      select fig.*, base.thr1, base.jobs as baseline_jobs, ${SCALING} as scaling
      from fig left join base using (model_id) where fig.job_id = ${jobId}`.execute(db),
    sql<Record<string, unknown>>`
      select c.device_id, min(c.instance_type) as instance_type, count(*) as rounds, sum(c.samples) as samples,
        sum(c.cpu_ms::numeric) as cpu_ms, sum(c.gpu_ms::numeric) as gpu_ms, sum(${CONTRIBUTION_MS}::numeric) as train_ms, sum(${CONTRIBUTION_J}::numeric) as energy
      from ${ROUNDS} r cross join lateral ${CONTRIBUTIONS} where r.job_id = ${jobId}
      group by c.device_id order by samples desc, c.device_id limit ${MAX_JOB_DEVICES}`.execute(db),
    sql<Record<string, unknown>>`
      select c.instance_type, count(distinct c.device_id) as devices, sum(c.samples) as samples,
        sum(c.cpu_ms::numeric) as cpu_ms, sum(c.gpu_ms::numeric) as gpu_ms, sum(${CONTRIBUTION_MS}::numeric) as train_ms, sum(${CONTRIBUTION_J}::numeric) as energy
      from ${ROUNDS} r cross join lateral ${CONTRIBUTIONS} where r.job_id = ${jobId}
      group by c.instance_type`.execute(db),
    sql<Record<string, unknown>>`
      select round, at, loss, validation_loss, accuracy, samples, n from (
        select round, at, loss, validation_loss, accuracy, samples,
          row_number() over (order by round) as i, count(*) over () as n
        from ${ROUNDS} where job_id = ${jobId}) s
      where n <= ${most} or i = n or (i - 1) % ceil((n - 1) / ${most - 2}::numeric)::bigint = 0
      order by round`.execute(db),
  ])
  return jobView(figure.rows[0]!, devices.rows, types.rows, curve.rows)
}

function jobView(f: Record<string, unknown>, devices: Record<string, unknown>[], types: Record<string, unknown>[], curve: Record<string, unknown>[]) {
  const samples = int(f.samples)
  const wall = num(f.wall_s)
  const energy = num(f.energy) ?? 0
  const started = f.started as Date | null
  const ofType = (type: InstanceType) => {
    const row = types.find((r) => r.instance_type === type) ?? {}
    const figures = contributionFigures(row)
    return { devices: int(row.devices), ...figures, share_of_samples: r6(ratio(figures.samples, samples)) }
  }
  const byType = { aws: ofType('aws'), user: ofType('user') } satisfies Record<InstanceType, unknown>
  const total = int(curve[0]?.n)
  return {
    job_id: f.job_id as string,
    model_id: f.model_id as string,
    status: trainingStatus(f.phase as TrainingPhase, (f.current_devices as string[]).length),
    started_at: started ? started.toISOString() : null,
    finished_at: (f.finished_at as string | null) ?? null,
    last_round_at: f.last_at ? (f.last_at as Date).toISOString() : null,
    rounds: int(f.rounds),
    target_accuracy: num(f.target),
    reached_target: f.target_at !== null && f.target_at !== undefined,
    target_round: num(f.target_round),
    tta_seconds: r3(num(f.tta_s)),
    samples,
    wall_seconds: r3(wall),
    throughput_samples_per_s: r3(ratio(samples, wall)),
    cpu_seconds: r3((num(f.cpu_ms) ?? 0) / 1000),
    gpu_seconds: r3((num(f.gpu_ms) ?? 0) / 1000),
    energy_joules: r3(energy),
    samples_per_joule: r6(ratio(samples, energy)),
    power_watts: r3(ratio(energy, wall)),
    devices: int(f.n),
    scaling: { efficiency: r6(num(f.scaling)), baseline_samples_per_s: r3(num(f.thr1)), baseline_jobs: int(f.baseline_jobs) },
    by_device: devices.map((d) => ({ device_id: d.device_id as string, instance_type: d.instance_type as string, rounds: int(d.rounds), ...contributionFigures(d) })),
    by_instance_type: byType,
    curve: {
      /** The job's rounds; `points` holds all of them or an evenly spaced subset with the first and the last. */
      rounds: total,
      points: curve.map((c) => ({
        round: int(c.round),
        at: c.at as string,
        seconds: started ? r3((Date.parse(c.at as string) - started.getTime()) / 1000) : null,
        loss: num(c.loss),
        validation_loss: num(c.validation_loss),
        accuracy: num(c.accuracy),
        samples: int(c.samples),
      })),
    },
  }
}
