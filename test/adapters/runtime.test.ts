import t from 'tap'
import { checkAdapterConfig, InProcessAdapters } from '../../src/adapters/runtime.js'
import { DomainError } from '../../src/domain/errors.js'
import { field, model } from './fixtures.js'

const adapters = new InProcessAdapters()

t.test('passthrough (or none) takes a tensor that fills its shape and fits the model', async (t) => {
  const input = { data: [1, 2, 3, 4], shape: [1, 4], note: 'dropped' }
  for (const preprocessing of ['passthrough', null] as const) {
    t.same(await adapters.preprocess(model({ preprocessing, input_shape: [-1, 4] }), [input], field), [{ data: [1, 2, 3, 4], shape: [1, 4] }])
  }
  t.same(await adapters.preprocess(model(), [{ data: [5], shape: [1] }], field), [{ data: [5], shape: [1] }], 'no declared shape: any shape')
})

t.test('a tensor that is not one is refused, named', async (t) => {
  const m = model({ input_shape: [-1, 4] })
  const cases: Array<[unknown, RegExp]> = [
    [[1, 2, 3, 4], /^inputs\.0: must be a tensor/],
    [{ data: [1, 2, 3, 4] }, /^inputs\.0\.shape: must be a non-empty array of sizes/],
    [{ data: [1, 2, 3, 4], shape: [1, 4.5] }, /^inputs\.0\.shape: must be a non-empty array/],
    [{ data: 'abc', shape: [1, 4] }, /^inputs\.0\.data: must be an array of numbers/],
    [{ data: [1, '2', 3, 4], shape: [1, 4] }, /^inputs\.0\.data\.1: must be a number/],
    [{ data: [1, 2, 3], shape: [1, 4] }, /^inputs\.0\.data: 3 values do not fill shape \[1,4\] \(4\)/],
    [{ data: [1, 2, 3], shape: [1, 3] }, /^inputs\.0\.shape: \[1,3\] does not match the model's input shape \[-1,4\]/],
  ]
  for (const [input, message] of cases) await t.rejects(adapters.preprocess(m, [input], field), { constructor: DomainError, code: 'VALIDATION_ERROR', message }, String(message))
})

t.test('adapter_options: an unknown key or a wrong type is the model\'s mistake, named', async (t) => {
  t.match(checkAdapterConfig(model({ postprocessing: 'top_k_labels', adapter_options: { topk: 3 } })), /^model adapter_options: .*"topk"/)
  t.match(checkAdapterConfig(model({ adapter_options: { lowercase: 'no' } })), /^model adapter_options\.lowercase: /)
  await t.rejects(adapters.postprocess(model({ postprocessing: 'regression', adapter_options: { threshold: 'high' } }), [{ data: [1], shape: [1] }]), {
    code: 'VALIDATION_ERROR',
    message: /^model adapter_options\.threshold: /,
  })
  t.equal(checkAdapterConfig(model({ preprocessing: 'passthrough', postprocessing: 'regression' })), null)
  t.equal(checkAdapterConfig(model()), null)
})
