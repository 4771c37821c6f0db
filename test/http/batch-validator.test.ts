/**
 * The batch route's body validator (src/http/inference.ts): its fast path for bodies of well-formed tensors
 * gives what the route's zod schema gives, and any other body gets zod's answer itself.
 */
import t from 'tap'
import { validatorCompiler } from 'fastify-type-provider-zod'
import { BatchBody, batchBodyValidator } from '../../src/http/inference.js'

const route = { schema: BatchBody, method: 'POST', url: '/api/v1/inference/batch', httpPart: 'body' } as const
const fast = batchBodyValidator(route)
const zod = validatorCompiler(route)
const tensor = (i: number) => ({ data: [i, i + 0.5, -i], shape: [1, 3] })

t.test('bodies of tensors: the same value as zod, extra keys dropped as zod drops them', async (t) => {
  const bodies = [
    { model_id: 'm', inputs: [tensor(1), tensor(2)] },
    { model_id: 'm', inputs: [{ ...tensor(1), note: 'x' }], name: 'b', project_id: 'p', options: { prefer_gpu: true, instance_type: 'aws', validation: 'spot' }, extra: 1 },
  ]
  for (const body of bodies) t.same(fast(body), zod(body))
})

t.test('anything else gets zod\'s own answer: the error names the field', async (t) => {
  const bodies: unknown[] = [
    { model_id: 'm', inputs: [tensor(1), { data: [1, 2, 4e38], shape: [1, 3] }] },
    { model_id: 'm', inputs: [] },
    { model_id: 'm', inputs: [tensor(1)], options: { instance_type: 'moon' } },
    { inputs: [tensor(1)] },
    { model_id: 'm', inputs: [{ pixels: 'abc' }] },
    { model_id: 'm', inputs: [{ data: [1, 2, 3], shape: [1, 0] }] },
    'not an object',
  ]
  for (const body of bodies) {
    const got = fast(body) as { error?: unknown; value?: unknown }
    t.same(got, zod(body), JSON.stringify(body).slice(0, 80))
  }
  t.ok((fast(bodies[3]) as { error?: unknown }).error, 'a body without model_id is refused')
  // a tensor zod's Tensor refuses is taken as an object (an adapter's business input), as by zod: the route
  // then says what is wrong with it (test/http/float-range.test.ts)
  t.ok((fast(bodies[0]) as { value?: unknown }).value)
})
