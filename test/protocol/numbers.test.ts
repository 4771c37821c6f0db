import t from 'tap'
import { isNumberArray, numberArray } from '../../src/protocol/numbers.js'

t.test('isNumberArray: finite numbers only, integers and a lower bound when asked', async (t) => {
  t.ok(isNumberArray([]), 'an empty array')
  t.ok(isNumberArray([0, -1.5, 3e10]), 'finite numbers')
  t.notOk(isNumberArray([1, '2']), 'a string among them')
  t.notOk(isNumberArray([1, null]), 'a null among them')
  t.notOk(isNumberArray([1, Number.NaN]), 'NaN')
  t.notOk(isNumberArray([Infinity]), 'Infinity')
  t.notOk(isNumberArray([1, [2]]), 'a nested array')
  t.notOk(isNumberArray({ 0: 1, length: 1 }), 'an array-like object')
  t.notOk(isNumberArray('1,2'), 'a string')
  t.ok(isNumberArray([1, 2], { int: true }), 'integers')
  t.notOk(isNumberArray([1, 2.5], { int: true }), 'a fraction where integers are asked')
  t.notOk(isNumberArray([1, 0], { int: true, min: 1 }), 'below the bound')
  // a hole reads as undefined
  t.notOk(isNumberArray([1, , 3]), 'a sparse array')
})

t.test('numberArray: a zod schema with lengths, whose refusal says what was expected', async (t) => {
  const shape = numberArray({ int: true, atLeast: 1, min: 1, max: 3 })
  t.same(shape.parse([1, 2]), [1, 2])
  for (const bad of [[], [1, 2, 3, 4], [0], [1.5], ['1'], 'x', null]) {
    const result = shape.safeParse(bad)
    t.notOk(result.success, `refuses ${JSON.stringify(bad)}`)
    if (!result.success) t.match(result.error.issues[0]!.message, /expected an array of integers of at least 1, 1 to 3 long/)
  }
  const data = numberArray()
  t.same(data.parse([0.5, -2]), [0.5, -2])
  t.notOk(data.safeParse([0.5, 'a']).success)
})
