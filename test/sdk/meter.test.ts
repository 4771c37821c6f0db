import t from 'tap'
import { SharedMeter } from '../../src/sdk/meter.js'

t.test('a task alone is billed all the time that passed while it ran', async (t) => {
  let now = 100
  const meter = new SharedMeter(() => now)
  now = 130 // before it starts: nobody's
  const run = meter.start()
  now = 142.5
  t.equal(meter.stop(run), 12.5)
})

t.test('tasks side by side share each interval equally, and together are billed exactly the time that passed', async (t) => {
  let now = 0
  const meter = new SharedMeter(() => now)
  const a = meter.start()
  now = 10 // a alone: 10
  const b = meter.start()
  now = 30 // a and b: 10 each
  const c = meter.start()
  now = 60 // a, b and c: 10 each
  t.equal(meter.stop(a), 30)
  now = 80 // b and c: 10 each
  t.equal(meter.stop(b), 30)
  now = 85 // c alone: 5
  t.equal(meter.stop(c), 25)
  t.equal(30 + 30 + 25, now, 'nothing counted twice, nothing lost')
})

t.test('a clock that goes back is not billed negative time', async (t) => {
  let now = 50
  const meter = new SharedMeter(() => now)
  const run = meter.start()
  now = 40
  t.equal(meter.stop(run), 0)
})
