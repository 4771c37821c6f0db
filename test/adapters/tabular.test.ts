import t from 'tap'
import { checkAdapterConfig, InProcessAdapters } from '../../src/adapters/runtime.js'
import { DomainError } from '../../src/domain/errors.js'
import { field, model } from './fixtures.js'

const adapters = new InProcessAdapters()
const schema = { type: 'object', properties: { age: { type: 'number' }, income: { type: 'number' }, tenure: { type: 'number' } } }
const tabular = (fields: Partial<ReturnType<typeof model>> = {}) => model({ preprocessing: 'tabular', input_schema: schema, input_shape: [-1, 3], ...fields })
const refusal = (message: RegExp) => ({ constructor: DomainError, code: 'VALIDATION_ERROR', message })

t.test('features in the order of input_schema.properties, wrapped or flat, into [1, n]', async (t) => {
  const tensors = await adapters.preprocess(tabular(), [{ features: { income: 5000, tenure: 2, age: 30 } }, { tenure: 1, age: 41, income: 0.5 }], field)
  t.same(tensors, [
    { data: [30, 5000, 2], shape: [1, 3] },
    { data: [41, 0.5, 1], shape: [1, 3] },
  ])
})

t.test('a schema of the wrapped form names the features under properties.features', async (t) => {
  const wrapped = { type: 'object', properties: { features: { type: 'object', properties: { b: { type: 'number' }, a: { type: 'number' } } } } }
  const [tensor] = await adapters.preprocess(tabular({ input_schema: wrapped, input_shape: null }), [{ features: { a: 1, b: 2 } }], field)
  t.same(tensor, { data: [2, 1], shape: [1, 2] })
})

t.test('adapter_options.features sets the order, over the schema', async (t) => {
  const [tensor] = await adapters.preprocess(tabular({ adapter_options: { features: ['tenure', 'age', 'income'] } }), [{ age: 30, income: 5000, tenure: 2 }], field)
  t.same(tensor?.data, [2, 30, 5000])
})

t.test('a missing, non-number or unknown feature is refused, named', async (t) => {
  const cases: Array<[unknown, RegExp]> = [
    [{ features: { age: 30, income: 5000 } }, /^inputs\.0\.features\.tenure: missing$/],
    [{ age: 30, income: '5000', tenure: 1 }, /^inputs\.0\.income: must be a number, got string$/],
    [{ age: null, income: 1, tenure: 1 }, /^inputs\.0\.age: must be a number, got null$/],
    [{ features: { age: 30, income: 1, tenure: 1, height: 180 } }, /^inputs\.0\.features\.height: unknown feature; the model takes age, income, tenure$/],
    [[30, 5000, 2], /^inputs\.0: must be an object \{"features"/],
  ]
  for (const [input, message] of cases) await t.rejects(adapters.preprocess(tabular(), [input], field), refusal(message), String(message))
})

t.test('a model without feature names, or whose input_shape cannot take them, is refused with what to set', async (t) => {
  const noNames = tabular({ input_schema: null })
  t.match(checkAdapterConfig(noNames), /^model has no feature names: tabular needs adapter_options\.features/)
  await t.rejects(adapters.preprocess(noNames, [{ age: 1 }], field), refusal(/adapter_options\.features/))
  t.match(checkAdapterConfig(tabular({ input_shape: [1, 4] })), /^model input_shape \[1,4\] does not take 3 features as \[1, 3\]; set input_shape to \[-1, 3\]/)
  t.match(checkAdapterConfig(tabular({ adapter_options: { features: ['a', 'b', 'a'] } })), /feature "a" is named twice/)
  t.equal(checkAdapterConfig(tabular()), null)
})
