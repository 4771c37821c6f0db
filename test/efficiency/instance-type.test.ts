import t from 'tap'
import { SimDevice } from '../helpers/device.js'
import { inferenceSetup, input } from '../helpers/inference.js'

t.test('the aws/user comparison counts inference under the type it was billed as, also when its device came back as another', async (t) => {
  const { api, model, url } = await inferenceSetup(t)
  const first = await SimDevice.connect(url)
  await first.register({ instanceType: 'aws' })
  first.kill()
  // the same device, now contributed by a user: the work it does now is user work
  const device = await SimDevice.connect(url)
  t.teardown(() => device.kill())
  await device.register({ as: { deviceId: first.deviceId, sdkToken: first.sdkToken }, instanceType: 'user' })
  const answered = api('POST', '/inference', { model_id: model.id, input: { data: input(1), shape: [1, 10] } })
  const task = await device.next((f) => f.type === 'task')
  device.send({ type: 'task_result', task_id: task.task_id, lease_id: task.lease_id, status: 'completed', output: { data: [0.25, 0.75], shape: [1, 2] }, metrics: { cpu_ms: 2, gpu_ms: 0, bytes_in: 40, bytes_out: 8 } })
  t.equal((await answered).status, 200)
  const comparison = (await api('GET', '/efficiency/comparison')).body
  t.equal(comparison.user.inference.inputs, 1, 'usage: billed as user')
  t.ok(comparison.user.inference.inputs_per_s > 0, `the user rate counts the input (${comparison.user.inference.inputs_per_s}/s)`)
  t.equal(comparison.aws.inference.inputs, 0)
  t.equal(comparison.aws.inference.inputs_per_s, null, 'the aws rate has no input to count')
})
