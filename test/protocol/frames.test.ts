import t from 'tap'
import { Capabilities, errorText, MAX_REPORTED_BYTES, MAX_REPORTED_MS, TaskResult, trainFormatsOf } from '../../src/protocol/frames.js'

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

t.test('a task result\'s tensors hold finite numbers and an integer shape, or the frame is refused', async (t) => {
  const result = (output: unknown) => ({ type: 'task_result', task_id: 't1', lease_id: 'l1', status: 'completed', output, metrics: { cpu_ms: 1, gpu_ms: 0, bytes_in: 1, bytes_out: 1 } })
  t.ok(TaskResult.safeParse(result({ data: [0.25, 0.75], shape: [1, 2] })).success, 'a tensor')
  for (const bad of [{ data: [0.25, 'x'], shape: [1, 2] }, { data: [0.25, null], shape: [1, 2] }, { data: [1], shape: [0.5] }, { data: [1], shape: [] }, { data: [1], shape: [-1] }, { data: 'x', shape: [1] }]) {
    const parsed = TaskResult.safeParse(result(bad))
    t.notOk(parsed.success, JSON.stringify(bad))
    if (!parsed.success) t.match(parsed.error.issues[0]!.path.join('.'), /^output\.(data|shape)$/, 'the issue names the field')
  }
})

t.test('train_formats: the formats a device trains; absent, a trainer trains ONNX; a device that cannot train trains none', async (t) => {
  const parse = (fields: object) => Capabilities.parse({ formats: ['onnx', 'torchscript'], ...fields })
  t.same(trainFormatsOf(parse({ can_train: true })), ['onnx'], 'a Node device says none: ONNX')
  t.same(trainFormatsOf(parse({ can_train: true, train_formats: ['torchscript'] })), ['torchscript'])
  t.same(trainFormatsOf(parse({ can_train: false, train_formats: ['torchscript'] })), [], 'without can_train, nothing')
  for (const bad of [[], ['pytorch'], ['onnx', 'torchscript', 'onnx'], 'torchscript']) t.notOk(Capabilities.safeParse({ formats: ['onnx'], can_train: true, train_formats: bad }).success, JSON.stringify(bad))
})
