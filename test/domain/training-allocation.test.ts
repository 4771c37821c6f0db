import fc from 'fast-check'
import t from 'tap'
import { allocateDevices, compareVersions, isEligible, type AllocDevice, type AllocJob, type AllocationPlan } from '../../src/domain/training-allocation.js'

const device = (device_id: string, fields: Partial<AllocDevice> = {}): AllocDevice => ({ device_id, platform: 'python', sdk_version: '1.0.0', gpu: false, can_train: true, ...fields })
const devices = (n: number, fields: Partial<AllocDevice> = {}, prefix = 'd') => Array.from({ length: n }, (_, i) => device(`${prefix}${i}`, fields))
const job = (job_id: string, weight: number, submitted_seq: number, fields: Partial<AllocJob> = {}): AllocJob => ({ job_id, weight, prefer_gpu: false, submitted_seq, running: false, ...fields })

/** The fleet after the scheduler carried out a plan: each device on its assigned job, assigned jobs running. */
function carriedOut(fleet: AllocDevice[], jobs: AllocJob[], plan: AllocationPlan) {
  const jobOf = new Map(Object.entries(plan.assignments).flatMap(([j, ids]) => ids.map((id) => [id, j] as const)))
  return {
    devices: fleet.map(({ current_job: _, ...d }) => (jobOf.has(d.device_id) ? { ...d, current_job: jobOf.get(d.device_id)! } : d)),
    jobs: jobs.map((j) => ({ ...j, running: (plan.targets[j.job_id] ?? 0) > 0 })),
  }
}

t.test('two jobs weighted 3:1 share four devices 3 and 1', async (t) => {
  const plan = allocateDevices({ devices: devices(4), jobs: [job('a', 3, 1), job('b', 1, 2)] })
  t.same(plan, { assignments: { a: ['d0', 'd1', 'd2'], b: ['d3'] }, queued: [], drains: [], targets: { a: 3, b: 1 }, idle: [] })
})

t.test('a job goes only to devices that train its model format (a device that says no train_formats trains ONNX)', async (t) => {
  const fleet = [device('onnx'), device('torch', { train_formats: ['torchscript'] }), device('both', { train_formats: ['onnx', 'torchscript'] })]
  t.same(fleet.map((d) => isEligible(d, { model_format: 'torchscript' })), [false, true, true])
  t.same(fleet.map((d) => isEligible(d, {})), [true, false, true], 'a job recorded before formats trains ONNX')
  const plan = allocateDevices({ devices: fleet, jobs: [job('ts', 1, 1, { model_format: 'torchscript', max_devices: 1 }), job('ox', 1, 2, { model_format: 'onnx' })] })
  t.same(plan.assignments, { ox: ['both', 'onnx'], ts: ['torch'] })
  const starved = allocateDevices({ devices: [device('onnx')], jobs: [job('ts', 1, 1, { model_format: 'torchscript' })] })
  t.same(starved.queued, ['ts'], 'no device trains TorchScript: the job waits')
})

t.test('a third job arriving takes its share from the over-allocated jobs, moving no more devices than it gets', async (t) => {
  const fleet = devices(8)
  const before = [job('a', 3, 1), job('b', 1, 2)]
  const first = allocateDevices({ devices: fleet, jobs: before })
  t.same(first.targets, { a: 6, b: 2 })

  const running = carriedOut(fleet, before, first)
  const plan = allocateDevices({ devices: running.devices, jobs: [...running.jobs, job('c', 4, 3)] })
  t.same(plan.targets, { a: 3, b: 1, c: 4 })
  // exactly c's four devices move: three from a, one from b, none between a and b
  t.equal(plan.drains.length, 4)
  t.ok(plan.drains.every((d) => d.to_job === 'c'))
  t.same(plan.drains.map((d) => d.from_job).sort(), ['a', 'a', 'a', 'b'])
  t.ok(plan.assignments.a!.every((id) => first.assignments.a!.includes(id)), 'a keeps devices it had')
  t.ok(plan.assignments.b!.every((id) => first.assignments.b!.includes(id)), 'b keeps a device it had')
  t.same(plan.drains.map((d) => d.device_id).sort(), [...plan.assignments.c!].sort())
})

t.test('a job whose minimum cannot be met is queued with no devices; the others share the fleet', async (t) => {
  const plan = allocateDevices({ devices: devices(4), jobs: [job('a', 1, 1, { min_devices: 2 }), job('big', 100, 2, { min_devices: 5 })] })
  t.same(plan.queued, ['big'])
  t.same(plan.assignments.big, [])
  t.equal(plan.targets.big, 0)
  t.equal(plan.targets.a, 4)
})

t.test('earlier jobs have priority for their minimum, running jobs keep theirs, and a small later job may backfill', async (t) => {
  const fleet = devices(4)
  const waiting = allocateDevices({ devices: fleet, jobs: [job('late', 1, 2, { min_devices: 3 }), job('early', 1, 1, { min_devices: 3 })] })
  t.same(waiting.queued, ['late'])
  t.same(waiting.targets, { early: 4, late: 0 })

  const kept = allocateDevices({ devices: fleet, jobs: [job('early', 1, 1, { min_devices: 3 }), job('late', 1, 2, { min_devices: 3, running: true })] })
  t.same(kept.queued, ['early'], 'the running job keeps its minimum over an earlier waiting job')

  const backfill = allocateDevices({ devices: fleet, jobs: [job('a', 1, 1, { min_devices: 3 }), job('b', 1, 2, { min_devices: 3 }), job('c', 1, 3)] })
  t.same(backfill.queued, ['b'])
  t.same(backfill.targets, { a: 3, b: 0, c: 1 })
})

t.test('a running job that can no longer get its minimum is queued and its devices drain', async (t) => {
  const fleet = devices(2).map((d) => ({ ...d, current_job: 'a' }))
  const plan = allocateDevices({ devices: fleet, jobs: [job('a', 1, 1, { min_devices: 3, running: true }), job('b', 1, 2)] })
  t.same(plan.queued, ['a'])
  t.same(plan.drains, [
    { device_id: 'd0', from_job: 'a', to_job: 'b' },
    { device_id: 'd1', from_job: 'a', to_job: 'b' },
  ])
})

t.test('max_devices caps a job and its surplus goes to the others', async (t) => {
  const plan = allocateDevices({ devices: devices(6), jobs: [job('a', 10, 1, { max_devices: 2 }), job('b', 1, 2), job('c', 1, 3)] })
  t.same(plan.targets, { a: 2, b: 2, c: 2 })
  const alone = allocateDevices({ devices: devices(6), jobs: [job('a', 10, 1, { max_devices: 2 })] })
  t.same(alone.idle, ['d2', 'd3', 'd4', 'd5'], 'with no one to take them, devices past every max stay idle')
})

t.test('sdk_types, min_sdk_version and can_train decide which devices a job may have', async (t) => {
  const fleet = [
    device('py-old', { sdk_version: '1.9.2' }),
    device('py-new', { sdk_version: '1.10.0' }),
    device('node-new', { platform: 'nodejs', sdk_version: '2.0' }),
    device('win', { platform: 'windows', sdk_version: '3.0.0' }),
    device('no-train', { sdk_version: '9.0.0', can_train: false }),
  ]
  t.same(allocateDevices({ devices: fleet, jobs: [job('a', 1, 1, { sdk_types: ['python'] })] }).assignments.a, ['py-new', 'py-old'])
  t.same(allocateDevices({ devices: fleet, jobs: [job('a', 1, 1, { min_sdk_version: '1.10.0' })] }).assignments.a, ['node-new', 'py-new', 'win'])
  t.same(allocateDevices({ devices: fleet, jobs: [job('a', 1, 1, { sdk_types: ['Python', 'nodejs'], min_sdk_version: '1.10' })] }).assignments.a, ['node-new', 'py-new'])
  t.same(allocateDevices({ devices: fleet, jobs: [job('a', 1, 1, { sdk_types: [] })] }).idle, ['no-train'], 'an empty sdk_types is no restriction')
  t.same(allocateDevices({ devices: fleet, jobs: [job('a', 1, 1, { sdk_types: ['python'], min_devices: 3 })] }).queued, ['a'])
})

t.test('versions compare as dotted numbers, semver-style', async (t) => {
  const ordered = ['0.9', '1.0.0-alpha', '1.0.0-alpha.1', '1.0.0-beta', '1.0.0', 'v1.0.1', '1.9.2', '1.10.0', '1.10.0.1', '10.0.0']
  for (let i = 0; i < ordered.length - 1; i++) {
    t.equal(compareVersions(ordered[i]!, ordered[i + 1]!), -1, `${ordered[i]} < ${ordered[i + 1]}`)
    t.equal(compareVersions(ordered[i + 1]!, ordered[i]!), 1, `${ordered[i + 1]} > ${ordered[i]}`)
  }
  t.equal(compareVersions('1.2', '1.2.0'), 0)
  t.equal(compareVersions('1.2.0+build.7', '1.2.0'), 0)
})

t.test('a job that can use any device leaves a restricted job the only device it can use', async (t) => {
  // greedy by arrival would give the python device to a and starve b; an augmenting path swaps them
  const plan = allocateDevices({ devices: [device('py'), device('node', { platform: 'nodejs' })], jobs: [job('a', 100, 1), job('b', 1, 2, { sdk_types: ['python'] })] })
  t.same(plan.assignments, { a: ['node'], b: ['py'] })
  t.same(plan.queued, [])
})

t.test('prefer_gpu jobs get the GPU devices first, not exclusively', async (t) => {
  const fleet = [...devices(2, { gpu: true }, 'gpu'), ...devices(4, {}, 'cpu')]
  const both = allocateDevices({ devices: fleet, jobs: [job('plain', 1, 1), job('fast', 1, 2, { prefer_gpu: true })] })
  t.same(both.assignments.fast?.filter((id) => id.startsWith('gpu')), ['gpu0', 'gpu1'])
  t.equal(both.targets.fast, 3)

  const capped = allocateDevices({ devices: fleet, jobs: [job('plain', 1, 1), job('fast', 1, 2, { prefer_gpu: true, max_devices: 1 })] })
  t.equal(capped.assignments.fast?.[0]?.startsWith('gpu'), true)
  t.equal(capped.assignments.plain?.filter((id) => id.startsWith('gpu')).length, 1, 'the GPU it cannot take goes to the other job')

  // keeping devices comes before GPU preference: a running job is not reshuffled for it
  const settled = fleet.map((d) => ({ ...d, current_job: d.device_id.startsWith('gpu') || d.device_id === 'cpu0' ? 'plain' : 'fast' }))
  const stable = allocateDevices({ devices: settled, jobs: [job('plain', 1, 1, { running: true }), job('fast', 1, 2, { prefer_gpu: true, running: true })] })
  t.same(stable.drains, [])
  const swap = allocateDevices({
    devices: [device('gpu0', { gpu: true }), device('cpu0', { current_job: 'fast' })],
    jobs: [job('fast', 1, 1, { prefer_gpu: true, max_devices: 1, running: true }), job('plain', 1, 2)],
  })
  t.same(swap.assignments, { fast: ['cpu0'], plain: ['gpu0'] }, 'not even for a free GPU')
  t.same(swap.drains, [])
})

t.test('devices leaving a job that is no longer listed drain, idle when no job takes them', async (t) => {
  const plan = allocateDevices({ devices: [device('d0', { current_job: 'finished' }), device('d1', { current_job: 'finished', can_train: false })], jobs: [job('a', 1, 1)] })
  t.same(plan.drains, [{ device_id: 'd0', from_job: 'finished', to_job: 'a' }, { device_id: 'd1', from_job: 'finished' }])
  t.same(plan.idle, ['d1'])
})

t.test('the same fleet and jobs in any order give the same plan, ids sorted', async (t) => {
  const fleet = [...devices(5, { gpu: true }, 'g'), ...devices(7, { platform: 'nodejs', sdk_version: '0.5' }, 'n'), ...devices(6)]
  const jobs = [job('z', 5, 3, { prefer_gpu: true }), job('y', 2, 1, { sdk_types: ['nodejs'] }), job('x', 7, 2, { min_sdk_version: '1.0', max_devices: 4 })]
  const plan = allocateDevices({ devices: fleet, jobs })
  t.same(allocateDevices({ devices: [...fleet].reverse(), jobs: [...jobs].reverse() }), plan)
  t.same(Object.keys(plan.assignments), ['x', 'y', 'z'])
  for (const ids of Object.values(plan.assignments)) t.same(ids, [...ids].sort())
})

t.test('duplicate ids and impossible settings are refused', async (t) => {
  t.throws(() => allocateDevices({ devices: [device('d'), device('d')], jobs: [] }), /device d is listed twice/)
  t.throws(() => allocateDevices({ devices: [], jobs: [job('a', 1, 1), job('a', 1, 2)] }), /job a is listed twice/)
  t.throws(() => allocateDevices({ devices: [], jobs: [job('a', -1, 1)] }), /job a: weight must be a finite number >= 0/)
  t.throws(() => allocateDevices({ devices: [], jobs: [job('a', 1, 1, { min_devices: 0 })] }), /min_devices must be an integer >= 1/)
  t.throws(() => allocateDevices({ devices: [], jobs: [job('a', 1, 1, { min_devices: 3, max_devices: 2 })] }), /max_devices must be an integer >= min_devices/)
})

// ---- properties over random fleets ------------------------------------------------------------------------

const platforms = ['nodejs', 'python', 'windows'] as const
const versions = ['0.9.0', '1.0.0', '1.9.2', '1.10.0', '2.0.0']
const arbDevice = fc.record({
  platform: fc.constantFrom(...platforms),
  sdk_version: fc.constantFrom(...versions),
  gpu: fc.boolean(),
  can_train: fc.nat(5).map((n) => n > 0),
  current: fc.nat(6),
})
const arbJob = fc.record({
  weight: fc.oneof(fc.nat(5), fc.integer({ min: 1, max: 1_000_000 })),
  min_devices: fc.integer({ min: 1, max: 4 }),
  extra: fc.option(fc.nat(6)),
  prefer_gpu: fc.boolean(),
  sdk_types: fc.option(fc.subarray([...platforms], { minLength: 1 })),
  min_sdk_version: fc.option(fc.constantFrom(...versions)),
  submitted_seq: fc.nat(5),
  running: fc.boolean(),
})
const arbInput = fc.record({ devices: fc.array(arbDevice, { maxLength: 24 }), jobs: fc.array(arbJob, { maxLength: 6 }) }).map(({ devices: ds, jobs: js }) => {
  const jobs: AllocJob[] = js.map((j, i) => ({
    job_id: `job${i}`,
    weight: j.weight,
    min_devices: j.min_devices,
    ...(j.extra !== null ? { max_devices: j.min_devices + j.extra } : {}),
    prefer_gpu: j.prefer_gpu,
    ...(j.sdk_types ? { sdk_types: j.sdk_types } : {}),
    ...(j.min_sdk_version ? { min_sdk_version: j.min_sdk_version } : {}),
    submitted_seq: j.submitted_seq,
    running: j.running,
  }))
  const fleet: AllocDevice[] = ds.map((d, i) => ({
    device_id: `dev${String(i).padStart(2, '0')}`,
    platform: d.platform,
    sdk_version: d.sdk_version,
    gpu: d.gpu,
    can_train: d.can_train,
    ...(d.current < jobs.length ? { current_job: `job${d.current}` } : d.current === 6 ? { current_job: 'gone' } : {}),
  }))
  return { devices: fleet, jobs }
})

function checkInvariants(input: { devices: AllocDevice[]; jobs: AllocJob[] }, plan: AllocationPlan): void {
  const byId = new Map(input.devices.map((d) => [d.device_id, d]))
  const holder = new Map<string, string>()
  for (const j of input.jobs) {
    const ids = plan.assignments[j.job_id]!
    for (const id of ids) {
      if (holder.has(id)) throw new Error(`${id} is on ${holder.get(id)} and ${j.job_id}`)
      holder.set(id, j.job_id)
      if (!isEligible(byId.get(id)!, j)) throw new Error(`${id} is not eligible for ${j.job_id}`)
    }
    if (plan.targets[j.job_id] !== ids.length) throw new Error(`target of ${j.job_id} is not its device count`)
    if (plan.queued.includes(j.job_id)) {
      if (ids.length !== 0) throw new Error(`queued ${j.job_id} has devices`)
    } else if (ids.length < (j.min_devices ?? 1) || ids.length > (j.max_devices ?? Infinity)) {
      throw new Error(`${j.job_id} has ${ids.length} devices, outside its min and max`)
    }
  }
  // work-conserving: no idle device that an admitted job below its max could use
  for (const id of plan.idle) {
    if (holder.has(id)) throw new Error(`${id} is idle and assigned`)
    const taker = input.jobs.find((j) => !plan.queued.includes(j.job_id) && plan.targets[j.job_id]! < (j.max_devices ?? Infinity) && isEligible(byId.get(id)!, j))
    if (taker) throw new Error(`${id} is idle but ${taker.job_id} could use it`)
  }
  if (plan.idle.length + holder.size !== input.devices.length) throw new Error('a device is neither idle nor assigned')
  // a drain for exactly the devices leaving their current job
  const leaving = input.devices.filter((d) => d.current_job && holder.get(d.device_id) !== d.current_job).map((d) => d.device_id)
  if (JSON.stringify(plan.drains.map((d) => d.device_id)) !== JSON.stringify(leaving.sort())) throw new Error('drains are not the devices that leave their job')
}

t.test('over random fleets: no device twice, only eligible devices, counts within min and max, queued jobs empty', async (t) => {
  t.doesNotThrow(() =>
    fc.assert(
      fc.property(arbInput, (input) => checkInvariants(input, allocateDevices(input))),
      { seed: 20240611, numRuns: 400 },
    ),
  'every plan keeps the invariants')
})

t.test('over random fleets: input order does not matter, and carrying out a plan then planning again moves nothing', async (t) => {
  t.doesNotThrow(() =>
    fc.assert(
      fc.property(arbInput, (input) => {
        const plan = allocateDevices(input)
        const shuffled = allocateDevices({ devices: [...input.devices].reverse(), jobs: [...input.jobs].reverse() })
        if (JSON.stringify(shuffled) !== JSON.stringify(plan)) throw new Error('the plan depends on input order')
        const next = carriedOut(input.devices, input.jobs, plan)
        const again = allocateDevices(next)
        if (again.drains.length > 0) throw new Error(`a settled fleet drains ${JSON.stringify(again.drains)}`)
        if (JSON.stringify(again.assignments) !== JSON.stringify(plan.assignments)) throw new Error('a settled fleet is reassigned')
      }),
      { seed: 7, numRuns: 300 },
    ),
  'plans do not depend on input order, and a settled fleet stays put')
})

t.test('over random homogeneous fleets: shares are Webster-proportional to weight', async (t) => {
  const arb = fc.record({ n: fc.integer({ min: 0, max: 40 }), weights: fc.array(fc.integer({ min: 1, max: 1000 }), { minLength: 1, maxLength: 5 }) })
  t.doesNotThrow(() =>
    fc.assert(
      fc.property(arb, ({ n, weights }) => {
        const jobs = weights.map((w, i) => job(`j${i}`, w, i))
        const plan = allocateDevices({ devices: devices(n), jobs })
        const admitted = jobs.filter((j) => !plan.queued.includes(j.job_id))
        const count = (j: AllocJob) => plan.targets[j.job_id]!
        // divisor-method balance: no admitted job could give a device beyond its minimum to another and stand further from its quota
        for (const a of admitted) {
          for (const b of admitted) {
            if (a === b || count(a) <= 1) continue
            if (b.weight / (count(b) + 0.5) > a.weight / (count(a) - 0.5) + 1e-12) throw new Error(`${a.job_id} should give a device to ${b.job_id}`)
          }
        }
      }),
      { seed: 99, numRuns: 300 },
    ),
  'shares are Webster-proportional')
})
