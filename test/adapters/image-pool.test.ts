import { monitorEventLoopDelay } from 'node:perf_hooks'
import t from 'tap'
import { adaptersFromEnv, readImageSettings } from '../../src/adapters/config.js'
import { IMAGE_DEFAULTS } from '../../src/adapters/image-pool.js'
import { InProcessAdapters } from '../../src/adapters/runtime.js'
import { DomainError } from '../../src/domain/errors.js'
import { multipart, testApp } from '../helpers/app.js'
import { denseOnnxModel } from '../helpers/onnx.js'
import { jpegBase64, model, pngBase64, pngBytes, RED } from './fixtures.js'

const image = model({ preprocessing: 'image_classification', input_shape: [1, 3, 4, 4], adapter_options: { mean: [0], std: [1] } })
const gradient = (x: number, y: number): [number, number, number] => [x % 256, y % 256, (x + y) % 256]
/** A 4 MP PNG (encoded once: it takes seconds here), well over 20 ms to decode. */
let big: string | undefined
const bigPng = () => (big ??= pngBytes(2000, 2000, gradient).toString('base64'))
const refusal = (code: string, message: RegExp) => ({ constructor: DomainError, code, message })

t.test('the pixel budget: an image larger than it is a VALIDATION_ERROR naming the field', async (t) => {
  const adapters = new InProcessAdapters({ image: { maxPixels: 100 } })
  t.teardown(() => adapters.close())
  const inputs = [{ image: pngBase64(10, 10, () => RED) }, { image: pngBase64(20, 20, () => RED) }, { image: jpegBase64(20, 20, () => RED) }]
  await t.rejects(adapters.preprocess(image, inputs.slice(0, 2), (i) => `inputs.${i}`), refusal('VALIDATION_ERROR', /^inputs\.1\.image: image of 20x20 pixels is larger than 100 pixels$/))
  await t.rejects(adapters.preprocess(image, [inputs[2]], () => 'input'), refusal('VALIDATION_ERROR', /^input\.image: image is larger than 100 pixels$/))
  const [fits] = await adapters.preprocess(image, [inputs[0]], () => 'input')
  t.same(fits?.shape, [1, 3, 4, 4], 'an image within the budget decodes')
})

t.test('the time budget: a decode past it ends with a TIMEOUT naming the field, and the pool goes on', async (t) => {
  const adapters = new InProcessAdapters({ image: { timeoutMs: 20, threads: 1 } })
  t.teardown(() => adapters.close())
  await t.rejects(adapters.preprocess(image, [{ image: bigPng() }], () => 'input'), refusal('TIMEOUT', /^input\.image: not decoded within 20 ms/))
  const [small] = await adapters.preprocess(image, [{ image: pngBase64(4, 4, () => RED) }], () => 'input')
  t.same(small?.shape, [1, 3, 4, 4], 'the next image decodes on a fresh thread')
})

t.test('the event loop stays responsive while a batch of large images decodes', async (t) => {
  const context = await testApp(t)
  const alice = await context.customer()
  const upload = multipart(
    { input_shape: '[1,3,4,4]', preprocessing: 'image_classification' },
    { name: 'm.onnx', content: denseOnnxModel({ imageShape: [3, 4, 4], outputs: 2 }) },
  )
  const uploaded = await context.app.inject({ method: 'POST', url: '/api/v1/models', headers: { ...upload.headers, 'x-api-key': alice.key }, payload: upload.payload })
  t.equal(uploaded.statusCode, 201, uploaded.body)
  const url = await context.app.listen({ port: 0, host: '127.0.0.1' })
  const api = (path: string, body?: unknown) =>
    fetch(`${url}/api/v1${path}`, {
      method: body ? 'POST' : 'GET',
      headers: { 'x-api-key': alice.key, ...(body ? { 'content-type': 'application/json' } : {}) },
      ...(body ? { body: typeof body === 'string' ? body : JSON.stringify(body) } : {}),
    })
  // warm the pool (its first thread loads the decoders), then measure a batch of 4 images of 4 MP (the body
  // made beforehand: this process is the client too)
  await (await api('/inference', { model_id: uploaded.json().id, input: { image: pngBase64(4, 4, () => RED) } })).text()
  const body = JSON.stringify({ model_id: uploaded.json().id, inputs: Array.from({ length: 4 }, () => ({ image: bigPng() })) })
  const delay = monitorEventLoopDelay({ resolution: 10 })
  delay.enable()
  const started = performance.now()
  const batch = api('/inference/batch', body)
  const healthTimes: number[] = []
  let done = false
  void batch.finally(() => (done = true))
  while (!done || healthTimes.length < 3) {
    const asked = performance.now()
    await (await api('/health')).text()
    healthTimes.push(performance.now() - asked)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  const answer = await batch
  delay.disable()
  // the images decoded (no device is connected: the answer after the adapters is NO_DEVICES)
  t.equal(((await answer.json()) as { error: { code: string } }).error.code, 'NO_DEVICES')
  // on the event loop one such image held it about 1 s here (3.7 s for the batch); the bound leaves room for
  // a shared 2-core machine's scheduling and the 13 MB body's parse and collection
  const worst = Math.max(...healthTimes)
  t.ok(worst < 500, `GET /health answered in at most ${Math.round(worst)} ms during the ${Math.round(performance.now() - started)} ms batch (${healthTimes.length} checks)`)
  t.ok(delay.max / 1e6 < 500, `the event loop was held at most ${Math.round(delay.max / 1e6)} ms`)
  // and an image over the default budget is refused at the HTTP edge, naming the field
  const huge = pngBytes(1, 1, () => RED)
  huge.writeUInt32BE(100_000, 16)
  huge.writeUInt32BE(100_000, 20)
  const refused = await api('/inference', { model_id: uploaded.json().id, input: { image: huge.toString('base64') } })
  t.equal(refused.status, 400)
  t.match(((await refused.json()) as { error: { message: string } }).error.message, /^input\.image: image of 100000x100000 pixels is larger than 25000000 pixels$/)
})

t.test('the image settings come from the environment, checked', async (t) => {
  t.same(readImageSettings({}), { threads: IMAGE_DEFAULTS.threads, timeoutMs: 10_000, maxPixels: 25_000_000, duty: 0.5 })
  t.same(readImageSettings({ IMAGE_DECODE_THREADS: '2', IMAGE_DECODE_TIMEOUT_MS: '500', IMAGE_MAX_PIXELS: '', IMAGE_DECODE_DUTY: '1' }), { threads: 2, timeoutMs: 500, maxPixels: 25_000_000, duty: 1 }, 'an empty variable counts as unset')
  t.throws(() => readImageSettings({ IMAGE_DECODE_DUTY: '0' }), /^invalid image settings: IMAGE_DECODE_DUTY="0": must be above 0/)
  t.throws(() => readImageSettings({ IMAGE_DECODE_DUTY: '1.5' }), /IMAGE_DECODE_DUTY="1.5": must be at most 1/)
  t.throws(() => readImageSettings({ IMAGE_MAX_PIXELS: 'lots' }), /^invalid image settings: IMAGE_MAX_PIXELS="lots": must be a whole number/)
  t.throws(() => adaptersFromEnv({ IMAGE_DECODE_THREADS: '0' }), /IMAGE_DECODE_THREADS="0"/)
})

t.test('decoding threads run below the event loop (nice 10 on Linux): a decode storm cannot starve the server', { skip: process.platform !== 'linux' && 'per-thread nice values are Linux' }, async (t) => {
  const { readdir, readFile } = await import('node:fs/promises')
  // fields after the command's closing parenthesis: state is field 3, nice field 19
  const niceOf = async (tid: string | number) => {
    const stat = await readFile(`/proc/self/task/${tid}/stat`, 'utf8').catch(() => '')
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return fields.length > 16 ? Number(fields[16]) : undefined
  }
  const nice = async () => {
    const values: number[] = []
    for (const tid of await readdir('/proc/self/task')) {
      const value = await niceOf(tid)
      if (value !== undefined) values.push(value)
    }
    return values
  }
  t.notOk((await nice()).includes(10), 'no thread is niced before the pool starts')
  const adapters = new InProcessAdapters({ image: { threads: 1 } })
  t.teardown(() => adapters.close())
  await adapters.preprocess(image, [{ image: pngBase64(4, 4, () => RED) }], () => 'input')
  const values = await nice()
  t.ok(values.includes(10), `a decoding thread runs at nice 10 (${values.join(',')})`)
  t.equal(await niceOf(process.pid), 0, 'the main thread (its id is the process id) keeps its priority')
})

t.test('the duty cycle: after an image that took d ms, a thread at duty 0.25 rests 3d before the next', async (t) => {
  const { decode } = await import('../../src/adapters/image-worker.js')
  const plan = { layout: 'NCHW' as const, channels: 3 as const, height: 4, width: 4, mean: [0], std: [1], shape: [1, 3, 4, 4] }
  const task = (image: string, duty: number) => ({ input: { image }, field: 'input', plan, maxPixels: 25_000_000, duty })
  const tiny = pngBase64(4, 4, () => RED)
  let started = performance.now()
  t.match(decode(task(bigPng(), 0.25)), { ok: true })
  const took = performance.now() - started
  started = performance.now()
  t.match(decode(task(tiny, 1)), { ok: true })
  const next = performance.now() - started
  t.ok(next >= 3 * took * 0.95, `the next image began after a rest of about 3 × ${Math.round(took)} ms (it took ${Math.round(next)} ms)`)
  started = performance.now()
  t.match(decode(task(tiny, 1)), { ok: true })
  t.ok(performance.now() - started < took, 'at duty 1 there is no rest')
})
