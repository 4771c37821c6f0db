import type { PLATFORMS } from '../protocol/frames.js'

/**
 * How federated training jobs share the fleet's training devices: a pure function of the devices and the
 * jobs (no clock, no I/O) that the scheduler calls whenever either changes; devices it moves finish the
 * round they are in first (the plan's drains).
 *
 * 1. Admission. A job runs on at least `min_devices` devices or not at all. Running jobs are admitted first
 *    (a running job keeps its minimum while the fleet allows it), then waiting jobs in submission order; a job
 *    whose minimum cannot be met alongside the jobs already admitted is queued. A later, smaller job may still
 *    start on what is left (backfill), so a large job can wait while small ones come and go.
 * 2. Shares. The other devices go one at a time to the admitted job with the highest priority
 *    `weight / (n + 0.5)`, n being the devices it has so far: the Webster (Sainte-Laguë) divisor method,
 *    proportional to weight. A job at its max, or one that no remaining device can serve, is passed over, so
 *    its surplus goes to the others. We use a divisor method rather than largest remainder because it is
 *    house-monotone: where every device suits every job, a device joining the fleet never takes a device away
 *    from a job (largest remainder has the Alabama paradox), and every needless change of share is a drain.
 * 3. Placement. Which device goes where is a min-cost flow: first keep as many devices as possible on the job
 *    they already run (fewest drains), then give GPUs to `prefer_gpu` jobs (first, not exclusively).
 *
 * Eligibility is respected throughout by augmenting paths: a job may take a device another job holds when
 * that job can use a free one instead. Devices that are interchangeable (same eligibility, GPU and current
 * job) are grouped into classes, so the flow graphs stay small for a large fleet.
 */
export type Platform = (typeof PLATFORMS)[number]

export interface AllocDevice {
  device_id: string
  platform: Platform
  sdk_version: string
  gpu: boolean
  can_train: boolean
  /** Model formats it trains; absent: onnx only. */
  train_formats?: readonly string[]
  /** `aws` (a cloud worker) or `user` (a contributed device); absent: user. */
  instance_type?: 'aws' | 'user'
  /** The training job it works for now, if any. */
  current_job?: string | null
}

export interface AllocJob {
  job_id: string
  /** total_samples * epochs: a job's share of the devices is proportional to it (finite, >= 0). */
  weight: number
  /** Devices it needs at once to run at all; default 1. */
  min_devices?: number
  /** Most devices it may hold; default unbounded. */
  max_devices?: number | null
  /** GPU devices go to it first (not exclusively: it still takes others). */
  prefer_gpu: boolean
  /** Platforms it runs on (`nodejs`, `python`, `windows`); absent or empty: any. */
  sdk_types?: string[] | null
  /** Lowest SDK version it runs on, compared as dotted numbers ("1.10.0" > "1.9.2"). */
  min_sdk_version?: string | null
  /** The format of the model it trains: only devices that train it are eligible. Absent: onnx. */
  model_format?: string
  /** Device kinds it may train on (`aws`, `user`); absent or empty: any. */
  instance_types?: string[] | null
  /** Arrival order: earlier jobs have priority for their minimum, and win ties. */
  submitted_seq: number
  running: boolean
}

export interface Drain {
  device_id: string
  from_job: string
  /** Absent when the device goes idle. */
  to_job?: string
}

export interface AllocationPlan {
  /** Every job, sorted by id, with its devices sorted by id; a queued job has none. */
  assignments: Record<string, string[]>
  /** Jobs that cannot get their minimum, in submission order. */
  queued: string[]
  /** Devices that must leave the job they run at the next round boundary, sorted by device id. */
  drains: Drain[]
  /** Device count of every job (the length of its assignment). */
  targets: Record<string, number>
  /** Devices no job takes, sorted by id. */
  idle: string[]
}

interface Job {
  spec: AllocJob
  min: number
  max: number
}

/** Interchangeable devices: the same eligibility for every job, the same GPU flag and the same current job. */
interface DeviceClass {
  key: string
  devices: string[]
  eligible: boolean[]
  gpu: boolean
  /** Index of the job its devices run now, -1 for none (or a job not in the input). */
  current: number
}

/** A b-matching of jobs to device classes: x[j][c] devices of class c on job j. */
interface Network {
  jobs: Job[]
  classes: DeviceClass[]
  x: number[][]
  used: number[]
}

export function allocateDevices(input: { devices: AllocDevice[]; jobs: AllocJob[] }): AllocationPlan {
  // 1. canonical order: jobs by arrival then id, classes by key, so the plan does not depend on input order
  const jobs = normalizeJobs(input.jobs)
  const classes = classify(input.devices, jobs)
  const net: Network = { jobs, classes, x: jobs.map(() => classes.map(() => 0)), used: classes.map(() => 0) }
  // 2. admit minimums, 3. share the rest, 4. place devices with the fewest moves
  const admitted = admit(net)
  const targets = share(net, admitted)
  const placement = place(net, targets)
  return toPlan(net, input.devices, admitted, placement)
}

function normalizeJobs(specs: AllocJob[]): Job[] {
  const seen = new Set<string>()
  const jobs = specs.map((spec): Job => {
    if (seen.has(spec.job_id)) throw new Error(`job ${spec.job_id} is listed twice`)
    seen.add(spec.job_id)
    if (!Number.isFinite(spec.weight) || spec.weight < 0) throw new Error(`job ${spec.job_id}: weight must be a finite number >= 0, got ${spec.weight}`)
    const min = spec.min_devices ?? 1
    const max = spec.max_devices ?? Infinity
    if (!Number.isInteger(min) || min < 1) throw new Error(`job ${spec.job_id}: min_devices must be an integer >= 1, got ${min}`)
    if (max !== Infinity && (!Number.isInteger(max) || max < min)) throw new Error(`job ${spec.job_id}: max_devices must be an integer >= min_devices, got ${max}`)
    return { spec, min, max }
  })
  return jobs.sort((a, b) => a.spec.submitted_seq - b.spec.submitted_seq || compareIds(a.spec.job_id, b.spec.job_id))
}

function classify(devices: AllocDevice[], jobs: Job[]): DeviceClass[] {
  const byKey = new Map<string, DeviceClass>()
  const eligibility = new Map<string, boolean[]>()
  const seen = new Set<string>()
  for (const device of devices) {
    if (seen.has(device.device_id)) throw new Error(`device ${device.device_id} is listed twice`)
    seen.add(device.device_id)
    // few distinct (platform, version, can_train, formats, instance type): compare versions once for each
    const kind = `${device.platform}|${device.can_train}|${[...(device.train_formats ?? ['onnx'])].sort().join(',')}|${device.sdk_version}|${device.instance_type ?? 'user'}`
    const eligible = eligibility.get(kind) ?? jobs.map((job) => isEligible(device, job.spec))
    eligibility.set(kind, eligible)
    const current = jobs.findIndex((job) => job.spec.job_id === device.current_job)
    const key = `${eligible.map((e) => (e ? '1' : '0')).join('')}|${device.gpu ? 'g' : 'c'}|${current}`
    const found = byKey.get(key)
    if (found) found.devices.push(device.device_id)
    else byKey.set(key, { key, devices: [device.device_id], eligible, gpu: device.gpu, current })
  }
  const classes = [...byKey.values()].sort((a, b) => compareIds(a.key, b.key))
  for (const c of classes) c.devices.sort(compareIds)
  return classes
}

/** Whether a device may train for a job: it can train the job's model format, on one of the job's platforms, at its SDK version or later. */
export function isEligible(device: AllocDevice, job: Pick<AllocJob, 'sdk_types' | 'min_sdk_version' | 'instance_types' | 'model_format'>): boolean {
  if (!device.can_train) return false
  if (!(device.train_formats ?? ['onnx']).includes(job.model_format ?? 'onnx')) return false
  const kinds = job.instance_types
  if (kinds && kinds.length > 0 && !kinds.includes(device.instance_type ?? 'user')) return false
  const types = job.sdk_types
  if (types && types.length > 0 && !types.some((t) => t.toLowerCase() === device.platform)) return false
  return !job.min_sdk_version || compareVersions(device.sdk_version, job.min_sdk_version) >= 0
}

/**
 * Orders versions semver-style: dotted numbers compared as numbers ("1.10.0" > "1.9.2"), missing parts are
 * 0, a leading "v" and build metadata ("+...") are ignored, and a pre-release ("1.2.0-beta.1") comes before
 * its release. A part that is not a number counts as 0.
 */
export function compareVersions(a: string, b: string): number {
  const pa = parseVersion(a)
  const pb = parseVersion(b)
  for (let i = 0; i < Math.max(pa.core.length, pb.core.length); i++) {
    const d = (pa.core[i] ?? 0) - (pb.core[i] ?? 0)
    if (d !== 0) return Math.sign(d)
  }
  if (pa.pre.length === 0 || pb.pre.length === 0) return Math.sign(pb.pre.length - pa.pre.length)
  for (let i = 0; i < Math.min(pa.pre.length, pb.pre.length); i++) {
    const x = pa.pre[i]!
    const y = pb.pre[i]!
    const nx = /^\d+$/.test(x)
    const ny = /^\d+$/.test(y)
    if (nx && ny && Number(x) !== Number(y)) return Math.sign(Number(x) - Number(y))
    if (nx !== ny) return nx ? -1 : 1
    if (x !== y) return x < y ? -1 : 1
  }
  return Math.sign(pa.pre.length - pb.pre.length)
}

function parseVersion(version: string): { core: number[]; pre: string[] } {
  const [main = '', ...rest] = version.trim().replace(/^v/i, '').split('+')[0]!.split('-')
  const core = main.split('.').map((part) => {
    const n = parseInt(part, 10)
    return Number.isFinite(n) ? n : 0
  })
  return { core, pre: rest.length > 0 ? rest.join('-').split('.') : [] }
}

/** Gives each job its minimum, running jobs first, then by arrival; returns which jobs are admitted. */
function admit(net: Network): boolean[] {
  const admitted = net.jobs.map(() => false)
  const order = net.jobs.map((_, j) => j).sort((a, b) => Number(net.jobs[b]!.spec.running) - Number(net.jobs[a]!.spec.running) || a - b)
  for (const j of order) {
    const x = net.x.map((row) => row.slice())
    const used = net.used.slice()
    let got = 0
    while (got < net.jobs[j]!.min && augment(net, j)) got++
    if (got === net.jobs[j]!.min) admitted[j] = true
    else {
      // it cannot run: give back what it took, the placement of the others included
      net.x = x
      net.used = used
    }
  }
  return admitted
}

/** Hands out the devices left after the minimums, one at a time by the Webster priority; returns each job's count. */
function share(net: Network, admitted: boolean[]): number[] {
  const count = net.jobs.map((job, j) => (admitted[j] ? job.min : 0))
  const open = net.jobs.map((job, j) => admitted[j]! && job.min < job.max)
  for (;;) {
    let best = -1
    for (let j = 0; j < net.jobs.length; j++) {
      if (open[j] && (best === -1 || ahead(net.jobs[j]!, count[j]!, net.jobs[best]!, count[best]!))) best = j
    }
    if (best === -1) return count
    // a job no augmenting path serves now cannot be served later either (Berge): close it for good
    if (augment(net, best)) count[best]!++
    else open[best] = false
    if (count[best]! >= net.jobs[best]!.max) open[best] = false
  }
}

/** Whether job a (with na devices) has a higher priority than b (nb): wa/(na+½) > wb/(nb+½), exact for integer weights. */
function ahead(a: Job, na: number, b: Job, nb: number): boolean {
  return a.spec.weight * (2 * nb + 1) > b.spec.weight * (2 * na + 1)
}

/**
 * One more device for job `from`, moving others' devices along an augmenting path if need be: from → class →
 * (a job holding that class, which takes another class instead) → ... → a class with a free device.
 */
function augment(net: Network, from: number): boolean {
  const { jobs, classes, x, used } = net
  // most of the time a free device is at hand: no path to search
  const free = classes.findIndex((c, ci) => c.eligible[from] && used[ci]! < c.devices.length)
  if (free !== -1) {
    used[free]!++
    x[from]![free]!++
    return true
  }
  const viaJob = classes.map(() => -1)
  const viaClass = jobs.map(() => -1)
  const seen = jobs.map((_, j) => j === from)
  const queue = [from]
  for (let q = 0; q < queue.length; q++) {
    const j = queue[q]!
    for (let c = 0; c < classes.length; c++) {
      if (!classes[c]!.eligible[j] || viaJob[c] !== -1) continue
      viaJob[c] = j
      if (used[c]! < classes[c]!.devices.length) {
        used[c]!++
        for (let at = c; ; ) {
          const k = viaJob[at]!
          x[k]![at]!++
          if (k === from) return true
          at = viaClass[k]!
          x[k]![at]!--
        }
      }
      for (let k = 0; k < jobs.length; k++) {
        if (!seen[k] && x[k]![c]! > 0) {
          seen[k] = true
          viaClass[k] = c
          queue.push(k)
        }
      }
    }
  }
  return false
}

interface Edge {
  to: number
  cap: number
  cost: number
  rev: number
}

/**
 * Min-cost flow from jobs (capacity: their target) to classes (capacity: their size). A device kept on its
 * current job costs 0 and a move costs more than all GPU preferences together, so the fewest drains come
 * first; then a prefer_gpu job pays 1 for each non-GPU device. Returns flow[j][c].
 */
function place(net: Network, targets: number[]): number[][] {
  const { jobs, classes } = net
  const J = jobs.length
  const source = 0
  const sink = J + classes.length + 1
  const graph: Edge[][] = Array.from({ length: sink + 1 }, () => [])
  const link = (from: number, to: number, cap: number, cost: number): Edge => {
    const edge = { to, cap, cost, rev: graph[to]!.length }
    graph[from]!.push(edge)
    graph[to]!.push({ to: from, cap: 0, cost: -cost, rev: graph[from]!.length - 1 })
    return edge
  }
  const flow = jobs.map(() => classes.map(() => 0))
  const arcs: Array<{ j: number; ci: number; edge: Edge }> = []
  const move = classes.reduce((n, c) => n + c.devices.length, 0) + 1
  jobs.forEach((job, j) => {
    if (targets[j]! > 0) link(source, 1 + j, targets[j]!, 0)
    classes.forEach((c, ci) => {
      if (!c.eligible[j]) return
      const cost = (c.current === j ? 0 : move) + (job.spec.prefer_gpu && !c.gpu ? 1 : 0)
      arcs.push({ j, ci, edge: link(1 + j, 1 + J + ci, c.devices.length, cost) })
    })
  })
  classes.forEach((c, ci) => link(1 + J + ci, sink, c.devices.length, 0))
  const need = targets.reduce((a, b) => a + b, 0)
  const sent = minCostFlow(graph, source, sink, need)
  // the shares were built from a feasible assignment, so the flow can always carry them
  if (sent !== need) throw new Error(`allocation: placed ${sent} of ${need} devices`)
  for (const { j, ci, edge } of arcs) flow[j]![ci] = classes[ci]!.devices.length - edge.cap
  return flow
}

/** Successive shortest paths (Bellman-Ford queue): the graphs are small, one node per job and per class. */
function minCostFlow(graph: Edge[][], source: number, sink: number, need: number): number {
  let sent = 0
  while (sent < need) {
    const dist = graph.map(() => Infinity)
    const prev: Array<Edge | undefined> = graph.map(() => undefined)
    const queued = graph.map(() => false)
    dist[source] = 0
    const queue = [source]
    while (queue.length > 0) {
      const u = queue.shift()!
      queued[u] = false
      for (const e of graph[u]!) {
        if (e.cap > 0 && dist[u]! + e.cost < dist[e.to]!) {
          dist[e.to] = dist[u]! + e.cost
          prev[e.to] = e
          if (!queued[e.to]) {
            queued[e.to] = true
            queue.push(e.to)
          }
        }
      }
    }
    if (dist[sink] === Infinity) return sent
    let push = need - sent
    for (let v = sink; v !== source; v = graph[v]![prev[v]!.rev]!.to) push = Math.min(push, prev[v]!.cap)
    for (let v = sink; v !== source; v = graph[v]![prev[v]!.rev]!.to) {
      const e = prev[v]!
      e.cap -= push
      graph[v]![e.rev]!.cap += push
    }
    sent += push
  }
  return sent
}

/** Devices of each class go, sorted by id, first to the job they run now, then to the others in job order. */
function toPlan(net: Network, devices: AllocDevice[], admitted: boolean[], flow: number[][]): AllocationPlan {
  const assigned = new Map<string, string>()
  const onJob: string[][] = net.jobs.map(() => [])
  net.classes.forEach((c, ci) => {
    const order = net.jobs.map((_, j) => j).sort((a, b) => Number(b === c.current) - Number(a === c.current) || a - b)
    let next = 0
    for (const j of order) {
      for (const device of c.devices.slice(next, next + flow[j]![ci]!)) {
        onJob[j]!.push(device)
        assigned.set(device, net.jobs[j]!.spec.job_id)
      }
      next += flow[j]![ci]!
    }
  })
  const byId = net.jobs.map((_, j) => j).sort((a, b) => compareIds(net.jobs[a]!.spec.job_id, net.jobs[b]!.spec.job_id))
  const drains: Drain[] = []
  for (const d of [...devices].sort((a, b) => compareIds(a.device_id, b.device_id))) {
    const to = assigned.get(d.device_id)
    if (d.current_job && d.current_job !== to) drains.push(to === undefined ? { device_id: d.device_id, from_job: d.current_job } : { device_id: d.device_id, from_job: d.current_job, to_job: to })
  }
  return {
    assignments: Object.fromEntries(byId.map((j) => [net.jobs[j]!.spec.job_id, onJob[j]!.sort(compareIds)])),
    queued: net.jobs.filter((_, j) => !admitted[j]).map((job) => job.spec.job_id),
    drains,
    targets: Object.fromEntries(byId.map((j) => [net.jobs[j]!.spec.job_id, onJob[j]!.length])),
    idle: devices.map((d) => d.device_id).filter((id) => !assigned.has(id)).sort(compareIds),
  }
}

const compareIds = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0)
