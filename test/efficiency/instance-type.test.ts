import t from 'tap'
import { legacySlot, SimDevice } from '../helpers/device.js'
import { inferenceSetup, input } from '../helpers/inference.js'

t.test('the aws/user comparison counts inference under the type it was billed as, also when its device came back as another', async (t) => {
  const { api, model, url, scheduler, enrollmentToken } = await inferenceSetup(t)
  const first = await SimDevice.connect(url)
  await first.register({ instanceType: 'aws', enrollmentToken: (await enrollmentToken()).token })
  t.teardown(() => first.kill())
  // the same device, now contributed by a user (an older hub allowed it): the work it does now is user work
  legacySlot(scheduler, first.deviceId, 'user')
  const answered = api('POST', '/inference', { model_id: model.id, input: { data: input(1), shape: [1, 10] } })
  t.equal((await answered).status, 200)
  const comparison = (await api('GET', '/efficiency/comparison')).body
  t.equal(comparison.user.inference.inputs, 1, 'usage: billed as user')
  t.ok(comparison.user.inference.inputs_per_s > 0, `the user rate counts the input (${comparison.user.inference.inputs_per_s}/s)`)
  t.equal(comparison.aws.inference.inputs, 0)
  t.equal(comparison.aws.inference.inputs_per_s, null, 'the aws rate has no input to count')
})
