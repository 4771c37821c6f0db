import t from 'tap'
import { checkAdapterConfig, InProcessAdapters } from '../../src/adapters/runtime.js'
import { fnv1a, tokenize } from '../../src/adapters/tokenize.js'
import { DomainError } from '../../src/domain/errors.js'
import { field, model } from './fixtures.js'

const adapters = new InProcessAdapters()
const vocabulary = ['[PAD]', '[UNK]', 'hello', 'world', ',', '!', 'the']
const text = (input_shape: number[] | null, adapter_options: Record<string, unknown> | null = { vocabulary }) => model({ preprocessing: 'text_tokens', input_shape, adapter_options })
const ids = async (m: ReturnType<typeof model>, value: string) => (await adapters.preprocess(m, [{ text: value }], field))[0]!

t.test('words and punctuation, lowercased, looked up in the vocabulary, padded to the sequence length', async (t) => {
  t.same(tokenize('Hello, World! Don\'t  stop', true), ['hello', ',', 'world', '!', 'don', "'", 't', 'stop'])
  const tensor = await ids(text([1, 8]), 'Hello, WORLD! Bye')
  t.same(tensor, { data: [2, 4, 3, 5, 1, 0, 0, 0], shape: [1, 8] }, 'bye is unknown (1), then padding (0)')
})

t.test('a long text is cut; unk_id, pad_id and lowercase are options', async (t) => {
  t.same((await ids(text([-1, 3]), 'hello world hello world')).data, [2, 3, 2])
  const options = { vocabulary, unk_id: 6, pad_id: 9, lowercase: false }
  t.same((await ids(text([1, 4], options), 'Hello hello')).data, [6, 2, 9, 9])
})

t.test('without a vocabulary, words hash (FNV-1a) into vocab_size ids past pad and unk', async (t) => {
  t.equal(fnv1a(''), 0x811c9dc5, 'FNV-1a offset basis')
  t.equal(fnv1a('a'), 0xe40c292c, 'FNV-1a of "a" (published test vector)')
  const hashed = await ids(text([1, 4], null), 'The cat, the')
  t.same(hashed.data, [2 + (fnv1a('the') % 30520), 2 + (fnv1a('cat') % 30520), 2 + (fnv1a(',') % 30520), 2 + (fnv1a('the') % 30520)])
  const small = await ids(text([1, 50], { vocab_size: 5 }), 'a b c d e f g h i j k l m n o p q r s t u v w x y z')
  t.ok(small.data.slice(0, 26).every((id) => id >= 2 && id < 5), `ids within [2, 5): ${small.data.slice(0, 26)}`)
  t.same(small.data.slice(26), new Array(24).fill(0))
})

t.test('a missing or non-string text is refused, named', async (t) => {
  await t.rejects(adapters.preprocess(text([1, 4]), [{ text: 'ok' }, { words: 'x' }], field), { constructor: DomainError, code: 'VALIDATION_ERROR', message: 'inputs.1.text: required' })
  await t.rejects(adapters.preprocess(text([1, 4]), [{ text: 7 }], field), { code: 'VALIDATION_ERROR', message: 'inputs.0.text: must be a string, got number' })
  await t.rejects(adapters.preprocess(text([1, 4]), ['plain'], field), { code: 'VALIDATION_ERROR', message: /^inputs\.0: must be an object \{"text"/ })
})

t.test('a model without a fixed sequence length, or with bad options, is refused with what to set', async (t) => {
  t.match(checkAdapterConfig(text([1, -1])), /^model input_shape \[1,-1\]: text_tokens needs a fixed sequence length .* e\.g\. \[1, 128\]/)
  t.match(checkAdapterConfig(text(null)), /text_tokens needs a fixed sequence length/)
  t.match(checkAdapterConfig(text([4, 16])), /set the batch dimension to 1 or -1/)
  t.match(checkAdapterConfig(text([1, 16], { vocab_size: 2 })), /^model adapter_options\.vocab_size: /)
  t.match(checkAdapterConfig(text([1, 16], { vocabulary: 'hello world' })), /^model adapter_options\.vocabulary: /)
  t.equal(checkAdapterConfig(text([1, 16])), null)
})
