import t from 'tap'
import { checkAdapterConfig, InProcessAdapters } from '../../src/adapters/runtime.js'
import { DomainError } from '../../src/domain/errors.js'
import { model } from './fixtures.js'

const adapters = new InProcessAdapters()
const post = (postprocessing: ReturnType<typeof model>['postprocessing'], fields: Partial<ReturnType<typeof model>> = {}) => model({ postprocessing, ...fields })
const scores = (result: unknown) => (result as { predictions: Array<{ score: number }> }).predictions.map((p) => p.score)

t.test('top_k_labels: probabilities sorted, labelled, k from adapter_options', async (t) => {
  const m = post('top_k_labels', { labels: ['cat', 'dog', 'bird', 'fish'], adapter_options: { top_k: 2 } })
  const [result] = await adapters.postprocess(m, [{ data: [0.1, 0.6, 0.05, 0.25], shape: [1, 4] }])
  t.same(result, { predictions: [{ label: 'dog', index: 1, score: 0.6 }, { label: 'fish', index: 3, score: 0.25 }] })
})

t.test('top_k_labels: logits get a softmax; k defaults to 5, capped at the classes; unlabelled classes are class_<i>', async (t) => {
  const [result] = await adapters.postprocess(post('top_k_labels', { labels: ['a', 'b'] }), [{ data: [2, 1, 0], shape: [3] }])
  const e = [Math.exp(2), Math.exp(1), 1]
  const sum = e[0]! + e[1]! + e[2]!
  t.same((result as { predictions: unknown[] }).predictions.map((p) => ({ ...(p as object), score: Number((p as { score: number }).score.toFixed(9)) })), [
    { label: 'a', index: 0, score: Number((e[0]! / sum).toFixed(9)) },
    { label: 'b', index: 1, score: Number((e[1]! / sum).toFixed(9)) },
    { label: 'class_2', index: 2, score: Number((1 / sum).toFixed(9)) },
  ])
  const [inRange] = await adapters.postprocess(post('top_k_labels'), [{ data: [0.5, 0.2, 0.1], shape: [1, 3] }])
  t.not(scores(inRange)[0], 0.5, 'values in [0,1] that do not sum to 1 are logits too')
  t.equal(Number(scores(inRange).reduce((a, b) => a + b, 0).toFixed(9)), 1, 'softmax: the scores sum to 1')
})

t.test('top_k_labels: a batch of rows gives predictions per row', async (t) => {
  const [result] = await adapters.postprocess(post('top_k_labels', { adapter_options: { top_k: 1 } }), [{ data: [0.9, 0.1, 0.2, 0.8], shape: [2, 2] }])
  t.same(result, { predictions: [[{ label: 'class_0', index: 0, score: 0.9 }], [{ label: 'class_1', index: 1, score: 0.8 }]] })
})

t.test('binary_classification: one probability, one logit, two classes, and the threshold', async (t) => {
  const m = post('binary_classification', { labels: ['ham', 'spam'] })
  const results = await adapters.postprocess(m, [
    { data: [0.7], shape: [1, 1] },
    { data: [-2], shape: [1, 1] },
    { data: [1, 3], shape: [1, 2] },
    { data: [0.6, 0.4], shape: [1, 2] },
  ])
  t.same(results, [
    { label: 'spam', positive: true, score: 0.7 },
    { label: 'ham', positive: false, score: 1 / (1 + Math.exp(2)) },
    { label: 'spam', positive: true, score: 1 / (Math.exp(-2) + 1) },
    { label: 'ham', positive: false, score: 0.4 },
  ])
  const strict = await adapters.postprocess(post('binary_classification', { adapter_options: { threshold: 0.8 } }), [{ data: [0.7], shape: [1] }])
  t.same(strict, [{ label: 'negative', positive: false, score: 0.7 }], 'default labels; 0.7 is under a threshold of 0.8')
  await t.rejects(adapters.postprocess(m, [{ data: [0.1], shape: [1] }, { data: [1, 2, 3], shape: [1, 3] }]), {
    constructor: DomainError,
    code: 'VALIDATION_ERROR',
    message: /^outputs\.1: 3 values \(shape \[1,3\]\): binary_classification needs 1 or 2; set the model's postprocessing to top_k_labels/,
  })
})

t.test('regression: one value, or all of them', async (t) => {
  t.same(await adapters.postprocess(post('regression'), [{ data: [3.5], shape: [1, 1] }, { data: [1, 2], shape: [1, 2] }]), [{ value: 3.5 }, { values: [1, 2] }])
  await t.rejects(adapters.postprocess(post('regression'), [{ data: [], shape: [0] }]), { code: 'VALIDATION_ERROR', message: 'outputs.0: no values to return for regression' })
})

t.test('passthrough (or none) returns the outputs unchanged', async (t) => {
  const outputs = [{ data: [1, -2, 3], shape: [1, 3] }]
  t.same(await adapters.postprocess(post('passthrough'), outputs), outputs)
  t.same(await adapters.postprocess(post(null), outputs), outputs)
})

t.test('a model whose outputs cannot fit its post-processing is refused with what to set', async (t) => {
  t.match(checkAdapterConfig(post('top_k_labels', { labels: ['a', 'b', 'c'], output_shape: [1, 5] })), /^model labels has 3 names but output_shape \[1,5\] has 5 classes/)
  t.equal(checkAdapterConfig(post('top_k_labels', { labels: ['a', 'b', 'c'], output_shape: [1, 3] })), null)
  t.match(checkAdapterConfig(post('binary_classification', { output_shape: [1, 3] })), /^model output_shape \[1,3\]: binary_classification needs 1 value/)
  t.equal(checkAdapterConfig(post('binary_classification', { output_shape: [-1, 2] })), null)
  t.match(checkAdapterConfig(post('top_k_labels', { adapter_options: { top_k: 0 } })), /^model adapter_options\.top_k: /)
  t.match(checkAdapterConfig(post('binary_classification', { adapter_options: { threshold: 2 } })), /^model adapter_options\.threshold: /)
})
