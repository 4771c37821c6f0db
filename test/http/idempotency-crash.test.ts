import type { FastifyInstance } from 'fastify'
import t from 'tap'
import type { EventStore } from '../../src/event-store/port.js'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import { buildApp } from '../../src/http/app.js'
import { INTERNAL_TOKEN, multipart, testApp } from '../helpers/app.js'
import { answeringDevice, eventually, SimDevice } from '../helpers/device.js'
import { allEvents } from '../helpers/events.js'
import { denseOnnxModel, mlpOnnxModel } from '../helpers/onnx.js'
import { MLP, trainingBody } from '../helpers/training.js'

/**
 * A server killed between a create and the record of its answer (kill -9 in `onSend`) leaves the key's claim
 * with no outcome. The retry, sent to the server started after it once the claim ran out, must get the
 * create's ids and make nothing twice.
 */

// given a database, a clock the test can move, a customer, a model and a device that answers every task
const clock = { offset: 0 }
const now = () => new Date(Date.now() + clock.offset)
const context = await testApp(t, { rateLimit: { max: 100_000, windowMs: 60_000 }, now }, { heartbeatIntervalMs: 10_000 }) // its devices send no heartbeats
const { database } = context
const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
const alice = await context.customer()
const MINUTE = 60_000

/**
 * The log's store as a server killed just before it appends any of these events leaves it: those appends
 * never happen (nor, the server being dead, does the key's release, its answer to a failure).
 */
function killedBefore(store: EventStore, ...types: string[]): EventStore {
  const never = new Set([...types, 'IdempotencyKeyReleased'])
  return new Proxy(store, {
    get(target, property) {
      if (property === 'append') {
        return (async (streamId, events, options) => {
          if (events.some((e) => never.has(e.type))) throw new Error(`killed before ${events[0]!.type} was appended`)
          return target.append(streamId, events, options)
        }) satisfies EventStore['append']
      }
      const value: unknown = Reflect.get(target, property)
      return typeof value === 'function' ? value.bind(target) : value
    },
  })
}

/** A server on the test's database and fleet, with its own store (a restarted process has a fresh one). */
async function server(store: EventStore): Promise<FastifyInstance> {
  const app = await buildApp({ store, projections: context.projections, db: database.db, blobs: context.blobs, hub: context.hub, scheduler: context.scheduler, training: context.training, internalToken: INTERNAL_TOKEN, logLevel: 'silent', now })
  t.teardown(() => app.close())
  return app
}
const dying = await server(killedBefore(context.store, 'IdempotentRequestAnswered'))

interface Answer { status: number; body: any; replayed: unknown }
interface Request { route: string; payload: object | Buffer; headers?: Record<string, string> }
async function send(app: FastifyInstance, request: Request, key: string): Promise<Answer> {
  const response = await app.inject({ method: 'POST', url: `/api/v1${request.route}`, headers: { 'x-api-key': alice.key, 'idempotency-key': key, ...request.headers }, payload: request.payload })
  return { status: response.statusCode, body: response.json(), replayed: response.headers['idempotent-replayed'] }
}
const upload = (fields: Record<string, string>, content: Buffer): Request => {
  const form = multipart(fields, { name: 'm.onnx', content })
  return { route: '/models', payload: form.payload, headers: form.headers }
}
const api = async (route: string) => (await context.app.inject({ url: `/api/v1${route}`, headers: { 'x-api-key': alice.key } })).json()
const count = async (type: string) => (await allEvents(context.store)).filter((e) => e.type === type && e.metadata.customerId === alice.id).length

/**
 * The request, sent to a server that is killed before it records the answer; then, past the claim's time,
 * the same request to the server started after it (`retries` times at once). Resolves with the answers.
 */
async function crashThenRetry(request: Request | (() => Request), key: string, retries = 1): Promise<[Answer, Answer, ...Answer[]]> {
  const make = typeof request === 'function' ? request : () => request
  const first = await send(dying, make(), key)
  clock.offset += 16 * MINUTE // past the claim's time (and the 15 minutes of claims recorded before claims had theirs)
  const restarted = await server(new PostgresEventStore(database.pool))
  const [retry, ...more] = await Promise.all(Array.from({ length: retries }, () => send(restarted, make(), key)))
  return [first, retry!, ...more]
}

const model = (await send(context.app, upload({ name: 'classifier' }, denseOnnxModel({ inputs: 10, outputs: 2 })), 'setup-model')).body
const input = (n: number) => ({ data: Array.from({ length: 10 }, (_, i) => i * n), shape: [1, 10] })
await answeringDevice(url)
const billedInputs = async () => (await api('/usage')).inputs as number
const finished = (jobId: string) => eventually(async () => (await api(`/inference/${jobId}`)).status === 'completed', 20_000, `job ${jobId} to complete`)

t.test('a batch: the retry after the crash gets the same job and project, and its inputs are billed once', async (t) => {
  const billed = await billedInputs()
  const requested = await count('InferenceRequested')
  const batch = { model_id: model.id, inputs: [1, 2, 3].map(input) }
  const [first, retry] = await crashThenRetry({ route: '/inference/batch', payload: batch }, 'crash-batch')
  t.equal(first.status, 202)
  t.equal(retry.status, 202, JSON.stringify(retry.body))
  t.same(retry.body, first.body, 'the same job_id, project_id and total')
  t.equal(retry.replayed, 'true')
  t.equal(await count('InferenceRequested'), requested + 1, 'one job in the log')
  await finished(first.body.job_id)
  t.equal(await billedInputs(), billed + 3, 'its 3 inputs are billed once')
  const other = await send(context.app, { route: '/inference/batch', payload: { ...batch, inputs: batch.inputs.slice(1) } }, 'crash-batch')
  t.equal(other.status, 422, 'another body with the key is still refused')
  t.equal(other.body.error.code, 'IDEMPOTENCY_MISMATCH')
  const again = await send(context.app, { route: '/inference/batch', payload: batch }, 'crash-batch')
  t.same(again.body, first.body, 'the recovered answer is recorded: later repeats get it')
})

t.test('an asynchronous inference, retried 5 times at once: the same job, queued once', async (t) => {
  const requested = await count('InferenceRequested')
  const [first, ...retries] = await crashThenRetry({ route: '/inference', payload: { model_id: model.id, input: input(4), async: true } }, 'crash-async', 5)
  t.equal(first.status, 202)
  for (const retry of retries) t.same(retry, { ...first, replayed: 'true' }, 'the same 202: job_id and poll_url')
  t.equal(await count('InferenceRequested'), requested + 1)
  const other = await send(context.app, { route: '/inference', payload: { model_id: model.id, input: input(5), async: true } }, 'crash-async')
  t.equal(other.body.error?.code, 'IDEMPOTENCY_MISMATCH')
})

t.test('a synchronous inference: the retry gets the result of the one job, billed once', async (t) => {
  const billed = await billedInputs()
  const requested = await count('InferenceRequested')
  const [first, retry] = await crashThenRetry({ route: '/inference', payload: { model_id: model.id, input: input(6) } }, 'crash-sync')
  t.equal(first.status, 200, JSON.stringify(first.body))
  t.equal(retry.status, 200, JSON.stringify(retry.body))
  t.match(retry.body, { job_id: first.body.job_id, status: 'completed', result: first.body.result, device_id: first.body.device_id, latency_ms: Number })
  t.equal(retry.replayed, 'true')
  t.equal(await count('InferenceRequested'), requested + 1)
  await eventually(async () => (await billedInputs()) >= billed + 1, 10_000, 'the job to be billed')
  t.equal(await billedInputs(), billed + 1, 'one input billed')
})

t.test('a model upload: the same model, uploaded once', async (t) => {
  const file = mlpOnnxModel({ ...MLP, seed: 3 })
  const [first, retry] = await crashThenRetry(() => upload({ name: 'crash-mlp' }, file), 'crash-model')
  t.equal(first.status, 201, JSON.stringify(first.body))
  t.equal(retry.status, 201, JSON.stringify(retry.body))
  t.same(retry.body, first.body, 'the same id, checksum and description')
  t.equal((await api('/models?limit=100')).models.filter((m: { name: string }) => m.name === 'crash-mlp').length, 1, 'one model')
  const other = await send(context.app, upload({ name: 'crash-mlp' }, mlpOnnxModel({ ...MLP, seed: 4 })), 'crash-model')
  t.equal(other.status, 422, 'another file is another request')
})

t.test('a training job: the same job, submitted once', async (t) => {
  const mlp = (await send(context.app, upload({ name: 'trainable' }, mlpOnnxModel({ ...MLP, seed: 5 })), 'setup-trainable')).body
  const trainer = await SimDevice.connect(url)
  await trainer.register({ canTrain: true, sdkUuid: 'sdk-nodejs-crash-trainer' })
  t.teardown(() => trainer.kill())
  const submitted = await count('TrainingSubmitted')
  const body = trainingBody(mlp.id, { training: { epochs: 1 } })
  const [first, retry] = await crashThenRetry({ route: '/training', payload: body }, 'crash-training')
  t.equal(first.status, 202, JSON.stringify(first.body))
  t.equal(retry.status, 202, JSON.stringify(retry.body))
  t.equal(retry.body.job_id, first.body.job_id)
  t.equal(retry.replayed, 'true')
  t.equal(await count('TrainingSubmitted'), submitted + 1, 'one job in the log')
  t.equal((await api('/training')).total, 1)
})

t.test('a request killed before it created anything is run by the retry, once', async (t) => {
  // the claim is recorded, then the server dies before the create
  const requested = await count('ProjectCreated')
  const noCreate = await server(killedBefore(context.store, 'ProjectCreated'))
  t.equal((await send(noCreate, { route: '/projects', payload: { name: 'after-crash' } }, 'crash-project')).status, 500)
  clock.offset += 16 * MINUTE
  const retry = await send(await server(new PostgresEventStore(database.pool)), { route: '/projects', payload: { name: 'after-crash' } }, 'crash-project')
  t.equal(retry.status, 201, JSON.stringify(retry.body))
  t.equal(retry.replayed, undefined, 'run now, not replayed')
  const again = await send(context.app, { route: '/projects', payload: { name: 'after-crash' } }, 'crash-project')
  t.same(again.body, retry.body)
  t.equal(await count('ProjectCreated'), requested + 1)
})

t.test('a dataset upload: the same dataset, uploaded once', async (t) => {
  const csv = Buffer.from(['f0,f1,label', ...Array.from({ length: 10 }, (_, i) => `${i},${i % 3},${i % 2}`)].join('\n'))
  const form = () => {
    const parts = multipart({ name: 'crash-data' }, { field: 'file', name: 'd.csv', content: csv })
    return { route: '/datasets', payload: parts.payload, headers: parts.headers }
  }
  const [first, retry] = await crashThenRetry(form, 'crash-dataset')
  t.equal(first.status, 201, JSON.stringify(first.body))
  t.same(retry, { ...first, replayed: 'true' })
  t.equal((await api('/datasets')).total, 1, 'one dataset')
})

t.test('a synchronous inference whose job has not finished: the retry names the one job, as a timeout does', async (t) => {
  // a cloud device that takes tasks and never answers (the request asks for aws, so only it takes it)
  const silent = await SimDevice.connect(url)
  await silent.register({ instanceType: 'aws', enrollmentToken: (await context.enrollmentToken({ instance_type: 'aws' })).token, sdkUuid: 'sdk-nodejs-silent1' })
  t.teardown(() => silent.kill())
  const requested = await count('InferenceRequested')
  const [first, retry] = await crashThenRetry({ route: '/inference', payload: { model_id: model.id, input: input(7), options: { instance_type: 'aws', timeout: 50 } } }, 'crash-running')
  t.equal(first.status, 504, JSON.stringify(first.body))
  t.equal(retry.status, 504, JSON.stringify(retry.body))
  t.match(retry.body.error, { code: 'TIMEOUT', job_id: first.body.error.job_id, message: /poll \/api\/v1\/inference\// })
  t.equal(await count('InferenceRequested'), requested + 1)
})
