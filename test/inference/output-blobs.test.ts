import { unlink } from 'node:fs/promises'
import { sql } from 'kysely'
import t from 'tap'
import { BlobCollector } from '../../src/blobs/blob-gc.js'
import { liveSchema } from '../../src/projections/projection.js'
import { eventually } from '../helpers/device.js'
import { close, inferenceSetup } from '../helpers/inference.js'

/** `n` values with full float64 digits (about 19 characters of JSON each). */
const values = (seed: number, n: number) => Array.from({ length: n }, (_, i) => Math.sin(seed * 1000 + i + 0.5) / 3)

t.test('a batch whose outputs exceed the inline limit: small TaskCompleted events naming blobs; pages read them back, after a rebuild and a GC too; a lost blob is its rows\' error', async (t) => {
  const inlineInputsMaxBytes = 1024
  const { api, model, direct, database, blobs, store, projections } = await inferenceSetup(t, { workers: 1, inlineInputsMaxBytes })
  const inputs = Array.from({ length: 600 }, (_, i) => ({ data: values(i, 10), shape: [1, 10] }))
  const queued = await api('POST', '/inference/batch', { model_id: model.id, inputs })
  t.equal(queued.status, 202)
  const jobId = queued.body.job_id as string
  await eventually(async () => {
    const r = await api('GET', `/inference/${jobId}?limit=1`)
    return r.body.status === 'completed' || r.body.status === 'failed' ? r.body : undefined
  }, 60_000, 'batch completion')

  /** Every page of the job's results, 128 inputs at a time. */
  const pages = async () => {
    const all = []
    for (let offset = 0; offset < 600; offset += 128) {
      const r = await api('GET', `/inference/${jobId}?limit=128&offset=${offset}`)
      t.equal(r.status, 200)
      all.push(...r.body.results)
    }
    return all
  }
  const before = await pages()
  t.equal(before.length, 600)
  let same = 0
  for (const r of before) if (r.status === 'completed' && close(r.result.data, await direct(inputs[r.index]!.data))) same++
  t.equal(same, 600, 'every result read back equals onnxruntime on its input')

  // 1. what the log holds: a reference per completed task, no tensors
  const events = await sql<{ bytes: number; data: any }>`select octet_length(data::text) as bytes, data from events where type = 'TaskCompleted'`.execute(database.db)
  t.ok(events.rows.length >= 2, `${events.rows.length} tasks`)
  for (const { bytes, data } of events.rows) {
    t.equal(data.outputs, undefined, 'no outputs inline')
    t.match(data.outputs_blob, { sha256: /^[0-9a-f]{64}$/, count: data.inputs, bytes: Number, values: data.inputs * 2 })
    t.ok(data.outputs_blob.bytes > inlineInputsMaxBytes, 'only outputs above the limit leave the event')
    t.ok(bytes < 1024, `the stored event is ${bytes} bytes`)
    t.equal(JSON.parse((await blobs.read(data.outputs_blob.sha256)).toString()).length, data.outputs_blob.count, 'the blob holds its count of outputs')
  }

  // 2. the read model rebuilt from the log answers the same pages
  const rows = sql.table(`${liveSchema('inference')}.inference_results`)
  const stored = await sql<{ n: number }>`select count(*)::int as n from ${rows} where outputs_sha256 is not null and outputs is null`.execute(database.db)
  t.equal(stored.rows[0]!.n, events.rows.length, 'result rows name their blob instead of holding outputs')
  await projections.rebuild('inference')
  t.same(await pages(), before, 'the same pages after a rebuild')

  // 3. ten minutes on (past the grace period), the GC keeps outputs blobs while their result rows exist
  const collector = new BlobCollector({ blobs, store, db: database.db, waitFor: (p, ms) => projections.waitFor(p, ms), graceMs: 60_000, now: () => new Date(Date.now() + 600_000) })
  await collector.collect()
  for (const { data } of events.rows) t.ok(await blobs.has(data.outputs_blob.sha256), 'the outputs blob is kept')
  t.same(await pages(), before, 'the same pages after a collection')

  // 4. a lost blob: its rows answer completed with an error, the others their results, no 500
  const lost = events.rows[0]!.data
  await unlink(blobs.pathOf(lost.outputs_blob.sha256))
  const after = await pages()
  const first = before.findIndex((r) => r.index === after.find((a) => a.error)?.index)
  const broken = after.filter((r) => r.error)
  t.equal(broken.length, lost.inputs, 'every input of the task whose blob is gone')
  for (const r of broken) {
    t.equal(r.status, 'completed')
    t.equal(r.result, undefined)
    t.match(r.error, /stored outputs \(blob [0-9a-f]{64}\) are missing/)
  }
  t.same(after.filter((r) => !r.error), before.filter((r) => !broken.some((b) => b.index === r.index)), 'the other rows as before')
  t.ok(first >= 0)
})

t.test('a synchronous request whose output goes to a blob is answered from the result itself, and read back from the blob later', async (t) => {
  // a limit far below any output, so that even one output of two values leaves its event
  const { api, model, direct, store } = await inferenceSetup(t, { workers: 1, inlineInputsMaxBytes: 16 })
  const data = values(7, 10)
  const response = await api('POST', '/inference', { model_id: model.id, input: { data, shape: [1, 10] } })
  t.equal(response.status, 200, JSON.stringify(response.body))
  t.ok(close(response.body.result.data, await direct(data)), 'the answer equals onnxruntime')
  const completed = (await store.readAll(0n, 10_000)).filter((e) => e.type === 'TaskCompleted').map((e) => e.data as { outputs?: unknown; outputs_blob?: unknown })
  t.equal(completed.length, 1)
  t.match(completed[0], { outputs_blob: { count: 1, values: 2 } }, 'the event names a blob')
  t.equal(completed[0]!.outputs, undefined)
  const job = await api('GET', `/inference/${response.body.job_id}`)
  t.match(job.body, { status: 'completed', result: { data: response.body.result.data } }, 'read back from the blob')
})
