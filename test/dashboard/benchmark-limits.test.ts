import t from 'tap'
import { eventually } from '../helpers/device.js'
import { trainingSetup } from '../helpers/training.js'

t.test('a customer runs at most the allowed number of benchmarks at once (their load bypasses the rate limit)', async (t) => {
  const { api, customer, url } = await trainingSetup(t, { devices: 1, app: { minPerfDurationS: 1 } })
  const first = await api('POST', '/dashboard/benchmark/perf', { duration: 2, rps_steps: [2], max_concurrency: 1 })
  t.equal(first.status, 202, JSON.stringify(first.body))
  const second = await api('POST', '/dashboard/benchmark/perf', { duration: 2, rps_steps: [2], max_concurrency: 1 })
  t.equal(second.status, 429, 'a second one while the first runs is refused')
  t.match(second.body.error, { code: 'RATE_LIMITED', message: /1 benchmark is already running for you/ })
  // another customer is not held back by this one's benchmark
  const bob = await customer()
  const bobs = await fetch(`${url}/api/v1/dashboard/benchmark`, { method: 'POST', headers: { 'x-api-key': bob.key, 'content-type': 'application/json' }, body: JSON.stringify({ mode: 'inference', requests: 4, concurrency: 1 }) })
  t.equal(bobs.status, 202, 'another customer may run one')
  await eventually(async () => ['completed', 'failed'].includes((await api('GET', `/dashboard/benchmark/perf/${first.body.benchmark_id}`)).body.status), 60_000, 'the first benchmark')
  const third = await api('POST', '/dashboard/benchmark', { mode: 'inference', requests: 4, concurrency: 1 })
  t.equal(third.status, 202, 'once it ended, the customer may run another')
})
