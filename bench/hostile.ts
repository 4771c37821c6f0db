/**
 * Hostile: one well-behaved customer runs synchronous inference at a steady rate (BENCH_HOSTILE_RPS, default
 * 20, for BENCH_SECONDS, default 15) on `dcp start --workers 2`, first on a quiet server, then while other
 * customers at the same time:
 * - send inputs matching a catastrophic `input_schema` pattern (`^(a+)+$`: backtracking regex engines take
 *   exponential time on 40 `a`s and a `!`);
 * - send batches of large images (2048 × 2048 PNGs) to an image-classification model;
 * - hold 100 live project streams open;
 * - flood the API with requests carrying random (bad) API keys;
 * - repeat the same create with an `Idempotency-Key` over and over.
 *
 * `RESULT name=hostile quiet_p99_ms=... hostile_p99_ms=... good_errors=... slowdown=...` (slowdown = hostile
 * p99 / quiet p99). Targets (issue #21): good_errors=0, slowdown <= 2.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import http from 'node:http'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { PNG } from 'pngjs'
import { denseOnnxModel } from '../test/helpers/onnx.js'
import { startDcp, stopDcp } from './dcp-process.js'
import { waitForDevices } from './inference.js'
import type { BenchContext } from './run.js'

const RPS = Number(process.env.BENCH_HOSTILE_RPS ?? 20)
const SECONDS = Number(process.env.BENCH_SECONDS ?? 15)
const STREAMS = 100
/** Which hostile parts run (comma-separated; default all): regex, images, badKeys, duplicates, streams. To find which one costs most. */
const PARTS = new Set((process.env.BENCH_HOSTILE_PARTS ?? 'regex,images,badKeys,duplicates,streams').split(','))
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))
const fixed = (x: number, digits = 1) => (Number.isFinite(x) ? x.toFixed(digits) : 'NaN')

async function upload(base: string, key: string, bytes: Buffer, fields: Record<string, string>): Promise<string> {
  const form = new FormData()
  for (const [k, v] of Object.entries(fields)) form.append(k, v)
  form.append('model', new Blob([bytes]), 'model.onnx')
  const response = await fetch(`${base}/api/v1/models`, { method: 'POST', headers: { 'x-api-key': key }, body: form })
  const body = (await response.json()) as { id: string }
  if (response.status !== 201) throw new Error(`upload: ${response.status} ${JSON.stringify(body).slice(0, 300)}`)
  return body.id
}

/** A GET with a random API key from another loopback address (an attacker is not at the good customer's address). */
function badKey(base: string): Promise<void> {
  return new Promise((resolve) => {
    const request = http.get(`${base}/api/v1/models`, { headers: { 'x-api-key': `dcp_k_${Math.random().toString(36).slice(2)}` }, localAddress: '127.0.0.2' }, (response) => {
      response.resume()
      response.on('end', resolve)
    })
    request.on('error', () => resolve())
    request.setTimeout(10_000, () => request.destroy())
  })
}

/** The good customer's steady load: one sync request every 1000/RPS ms; latencies of successes, errors counted. */
async function steady(base: string, modelId: string, seconds: number): Promise<{ latencies: number[]; errors: number; firstErrors: string[] }> {
  const latencies: number[] = []
  const firstErrors: string[] = []
  let errors = 0
  const body = JSON.stringify({ model_id: modelId, input: { data: Array.from({ length: 10 }, (_, i) => i / 10), shape: [1, 10] } })
  const inFlight: Promise<void>[] = []
  const end = performance.now() + seconds * 1000
  for (let next = performance.now(); next < end; next += 1000 / RPS) {
    await sleep(Math.max(0, next - performance.now()))
    const started = performance.now()
    // a request not answered within 10 s counts as an error (a frozen server must not hang the bench)
    const request = fetch(`${base}/api/v1/inference`, { method: 'POST', headers: { 'content-type': 'application/json', 'x-api-key': 'test-api-key' }, body, signal: AbortSignal.timeout(10_000) })
    inFlight.push(
      request.then(async (response) => ({ status: response.status, text: await response.text() })).then(
        (r) => {
          if (r.status === 200) latencies.push(performance.now() - started)
          else {
            errors++
            if (firstErrors.length < 3) firstErrors.push(`${r.status} ${r.text.slice(0, 200)}`)
          }
        },
        (error: Error) => {
          errors++
          if (firstErrors.length < 3) firstErrors.push(error.message)
        },
      ),
    )
  }
  await Promise.all(inFlight)
  return { latencies, errors, firstErrors }
}

const p99 = (values: number[]) => {
  const sorted = [...values].sort((a, b) => a - b)
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * 0.99))] ?? NaN
}

/** Everything the hostile customers do at once, until `stop` is aborted. Each part counts what it sent. */
function hostile(base: string, key: string, models: { regex: string; image: string }, watched: string, stop: AbortSignal, log: (line: string) => void): Promise<void>[] {
  const sent = { regex: 0, images: 0, badKeys: 0, duplicates: 0, streams: 0 }
  const loop = async (name: keyof typeof sent, once: () => Promise<unknown>, pauseMs: number) => {
    while (!stop.aborted && PARTS.has(name)) {
      await once().catch(() => {})
      sent[name]++
      await sleep(pauseMs)
    }
  }
  const evil = `${'a'.repeat(40)}!`
  const png = (() => {
    const image = new PNG({ width: 2048, height: 2048 })
    for (let i = 0; i < image.data.length; i += 4) image.data.set([(i * 7) % 256, (i * 13) % 256, (i * 31) % 256, 255], i)
    return PNG.sync.write(image).toString('base64')
  })()
  const json = (route: string, body: unknown, headers: Record<string, string> = {}) =>
    fetch(`${base}/api/v1${route}`, { method: 'POST', headers: { 'content-type': 'application/json', 'x-api-key': key, ...headers }, body: JSON.stringify(body), signal: stop }).then((r) => r.arrayBuffer())
  const parts = [
    loop('regex', () => json('/inference', { model_id: models.regex, input: { word: evil }, async: true }), 50),
    loop('images', () => json('/inference/batch', { model_id: models.image, inputs: Array.from({ length: 4 }, () => ({ image: png })) }), 200),
    loop('badKeys', () => badKey(base), 2),
    loop('duplicates', () => json('/projects', { name: 'same', type: 'realtime' }, { 'idempotency-key': 'hostile-duplicate-create' }), 10),
  ]
  // live project streams, held open
  if (PARTS.has('streams')) parts.push(
    (async () => {
      const opened = await Promise.allSettled(
        Array.from({ length: STREAMS }, () =>
          fetch(`${base}/api/v1/dashboard/projects/${watched}/stream?interval=500`, { headers: { 'x-api-key': key }, signal: stop }).then((r) => {
            sent.streams++
            return r.body?.pipeTo(new WritableStream(), { signal: stop }).catch(() => {})
          }),
        ),
      )
      await Promise.allSettled(opened.map((o) => (o.status === 'fulfilled' ? o.value : undefined)))
    })().catch(() => {}),
  )
  stop.addEventListener('abort', () => log(`hostile: sent ${JSON.stringify(sent)}`))
  return parts
}

export async function hostileBench({ database, log }: BenchContext): Promise<string> {
  const dataDir = await mkdtemp(path.join(tmpdir(), 'dcp-bench-hostile-'))
  const adminKey = 'hostile-bench-admin-key-0123456789'
  process.env.ADMIN_KEY = adminKey // for the child: the hostile customers are made through the admin API
  const { child, url } = await startDcp(database.url, dataDir, log, { workers: 2 })
  try {
    // the good customer is the development one (test-api-key); the hostile one is another customer
    const made = await fetch(`${url}/api/v1/admin/customers`, { method: 'POST', headers: { 'x-admin-key': adminKey, 'content-type': 'application/json' }, body: JSON.stringify({ name: 'mallory' }) })
    const mallory = ((await made.json()) as { api_key: string }).api_key
    const plain = await upload(url, 'test-api-key', denseOnnxModel({ inputs: 10, outputs: 2 }), { name: 'good' })
    const regex = await upload(url, mallory, denseOnnxModel({ inputs: 10, outputs: 2 }), {
      name: 'regex',
      input_schema: JSON.stringify({ type: 'object', properties: { word: { type: 'string', pattern: '^(a+)+$' } } }),
    }).catch((error: Error) => {
      log(`hostile: the catastrophic schema was refused at upload (${error.message.slice(0, 160)}); its inputs go to an unknown model`)
      return ''
    })
    const image = await upload(url, mallory, denseOnnxModel({ imageShape: [3, 4, 4], outputs: 2 }), { name: 'image', input_shape: JSON.stringify([1, 3, 4, 4]), preprocessing: 'image_classification' })
    await waitForDevices(url, 2, 60_000)
    await steady(url, plain, 3) // warm-up
    const quiet = await steady(url, plain, SECONDS)
    log(`quiet: ${quiet.latencies.length} answered, ${quiet.errors} errors, p99 ${fixed(p99(quiet.latencies))} ms`)
    const project = await fetch(`${url}/api/v1/projects`, { method: 'POST', headers: { 'x-api-key': mallory, 'content-type': 'application/json' }, body: JSON.stringify({ name: 'watched', type: 'realtime' }) })
    const watched = ((await project.json()) as { project_id: string }).project_id
    const stop = new AbortController()
    const parts = hostile(url, mallory, { regex, image }, watched, stop.signal, log)
    await sleep(1000)
    const loud = await steady(url, plain, SECONDS)
    stop.abort()
    await Promise.allSettled(parts)
    log(`hostile: ${loud.latencies.length} answered, ${loud.errors} errors, p99 ${fixed(p99(loud.latencies))} ms`)
    for (const e of loud.firstErrors) log(`hostile: a good request failed: ${e}`)
    const slowdown = p99(loud.latencies) / p99(quiet.latencies)
    return `RESULT name=hostile quiet_p99_ms=${fixed(p99(quiet.latencies))} hostile_p99_ms=${fixed(p99(loud.latencies))} good_errors=${loud.errors} slowdown=${fixed(slowdown, 2)} ratio=${fixed(1 / slowdown, 3)}`
  } finally {
    await stopDcp(child)
    await rm(dataDir, { recursive: true, force: true }).catch(() => {})
  }
}
