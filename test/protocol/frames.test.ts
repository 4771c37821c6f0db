import t from 'tap'
import { errorText, MAX_REPORTED_BYTES, MAX_REPORTED_MS, TaskResult } from '../../src/protocol/frames.js'

t.test('errorText: an error as a device sends it, without NUL (the hub refuses frames holding one) and cut to length', async (t) => {
  t.equal(errorText(new Error('bad\u0000 input\u0000')), 'bad\ufffd input\ufffd')
  t.equal(errorText('x'.repeat(5000)).length, 4000)
  t.equal(errorText(new Error('y'.repeat(50)), 10), 'y'.repeat(10))
})

t.test('a task result reports figures the read models can hold: past the bounds it is refused', async (t) => {
  const result = (metrics: Record<string, number>) => ({ type: 'task_result', task_id: 't1', lease_id: 'l1', status: 'completed', output: { data: [1], shape: [1] }, metrics: { cpu_ms: 1, gpu_ms: 0, bytes_in: 1, bytes_out: 1, ...metrics } })
  t.ok(TaskResult.safeParse(result({ cpu_ms: MAX_REPORTED_MS, gpu_ms: MAX_REPORTED_MS, bytes_in: MAX_REPORTED_BYTES })).success, 'the bounds themselves pass')
  // 1e16 ms is 1e19 µs: past Postgres' bigint, where usage keeps microseconds (the usage projection stopped on it)
  for (const bad of [{ cpu_ms: 1e16 }, { gpu_ms: MAX_REPORTED_MS * 2 }, { bytes_out: 1e18 }, { cpu_ms: -1 }] as Record<string, number>[]) {
    t.notOk(TaskResult.safeParse(result(bad)).success, JSON.stringify(bad))
  }
})
