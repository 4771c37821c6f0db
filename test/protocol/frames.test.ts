import t from 'tap'
import { errorText } from '../../src/protocol/frames.js'

t.test('errorText: an error as a device sends it, without NUL (the hub refuses frames holding one) and cut to length', async (t) => {
  t.equal(errorText(new Error('bad\u0000 input\u0000')), 'bad\ufffd input\ufffd')
  t.equal(errorText('x'.repeat(5000)).length, 4000)
  t.equal(errorText(new Error('y'.repeat(50)), 10), 'y'.repeat(10))
})
