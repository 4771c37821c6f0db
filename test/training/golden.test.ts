import { readFileSync, writeFileSync } from 'node:fs'
import { sql } from 'kysely'
import t, { type Test } from 'tap'
import { datasetDecider } from '../../src/domain/dataset.js'
import { trainingDecider } from '../../src/domain/training-job.js'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import type { Database } from '../../src/postgres/database.js'
import { datasetsProjection } from '../../src/projections/datasets.js'
import { Projections } from '../../src/projections/projections.js'
import { trainingProjection } from '../../src/projections/training.js'
import { usageProjection } from '../../src/projections/usage.js'
import { syntheticTask } from '../../src/sdk/trainer/synthetic.js'
import { multipart } from '../helpers/app.js'
import { freshDatabase } from '../helpers/database.js'
import { allEvents } from '../helpers/events.js'
import type { GoldenEvent } from '../helpers/golden.js'
import { MLP, trainingBody, trainingSetup } from '../helpers/training.js'

/**
 * The golden training history: the events of a recorded run (a dataset uploaded; a dataset job trained in
 * full sync to its target on two devices; a stream job in async mode paused, resumed and cancelled),
 * replayed through today's deciders and the training, datasets and usage projections, must still give what
 * they gave when it was recorded. `GOLDEN_RECORD=1` records it again (new ids and times: do it only for a
 * new schema era, in a new file).
 */
const FIXTURE = new URL('../fixtures/golden/training-v1.jsonl', import.meta.url)
const EXPECTED = new URL('../fixtures/golden/training-v1.expected.json', import.meta.url)
const RECORD = process.env.GOLDEN_RECORD === '1'
const PROJECTIONS = [trainingProjection, datasetsProjection, usageProjection]

if (RECORD) {
  t.test('record the golden training history', async (t) => {
    const { api, app, alice, model, waitFor, store } = await trainingSetup(t, { devices: 2 })
    const sample = syntheticTask({ inputs: MLP.inputs, outputs: MLP.outputs, seed: 5 }).sample(600, 1)
    const rows = Array.from({ length: 600 }, (_, r) => [...Array.from(sample.x.subarray(r * MLP.inputs, (r + 1) * MLP.inputs), (v) => v.toFixed(4)), sample.labels[r]].join(','))
    const form = multipart({ name: 'golden' }, { field: 'file', name: 'golden.csv', content: Buffer.from([[...Array.from({ length: MLP.inputs }, (_, i) => `f${i}`), 'label'].join(','), ...rows].join('\n')) })
    const dataset = (await app.inject({ method: 'POST', url: '/api/v1/datasets', headers: { ...form.headers, 'x-api-key': alice.key }, payload: form.payload })).json() as { id: string }
    const byDataset = (await api('POST', '/training', trainingBody(model.id, { data: { type: 'dataset', dataset_id: dataset.id, total_samples: undefined }, training: { epochs: 30, sync_mode: 'full_sync' }, resources: { min_devices: 2 } }))).body.job_id
    await waitFor(byDataset, (job) => job.status === 'completed', 60_000)
    const stream = (await api('POST', '/training', trainingBody(model.id, { data: { total_samples: 1_000_000 }, training: { target_accuracy: undefined, epochs: 10 } }))).body.job_id
    await waitFor(stream, (job) => job.progress.rounds >= 3)
    await api('POST', `/training/${stream}/pause`)
    await api('POST', `/training/${stream}/resume`)
    await waitFor(stream, (job) => job.status === 'running' && job.progress.rounds >= 6)
    await api('DELETE', `/training/${stream}`)
    const events = (await allEvents(store)).filter((e) => e.streamId.startsWith('training-') || e.streamId.startsWith('dataset-'))
    const lines = events.map((e): GoldenEvent => ({ stream_id: e.streamId, revision: e.revision, event_id: e.id, type: e.type, data: e.data as Record<string, unknown>, metadata: e.metadata as GoldenEvent['metadata'] }))
    writeFileSync(FIXTURE, `${lines.map((l) => JSON.stringify(l)).join('\n')}\n`)
    t.ok(lines.length > 0)
  })
}

/** Folds each stream through today's parse and evolve, and what the fixture records of its state. */
function foldStreams(golden: GoldenEvent[]) {
  const states: Record<string, unknown> = {}
  const raw = new Map<string, unknown>()
  for (const e of golden) {
    const event = { type: e.type, data: e.data, schemaVersion: e.metadata.schemaVersion ?? 1 }
    if (e.stream_id.startsWith('training-')) {
      const state = trainingDecider.evolve((raw.get(e.stream_id) as never) ?? trainingDecider.initialState(), trainingDecider.parse(event))
      raw.set(e.stream_id, state)
      states[e.stream_id] = { phase: state.phase, round: state.round, batches: state.batchesCompleted, devices: state.devices.length, weights: state.weightsSha256 ?? null, trained: state.trainedModelId ?? null }
    } else {
      const state = datasetDecider.evolve((raw.get(e.stream_id) as never) ?? datasetDecider.initialState(), datasetDecider.parse(event))
      raw.set(e.stream_id, state)
      states[e.stream_id] = { rows: state.dataset?.rows, deleted: state.deleted }
    }
  }
  return states
}

async function replay(t: Test, database: Database, golden: GoldenEvent[]) {
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  for (const e of golden) {
    await store.append(e.stream_id, [{ id: e.event_id, type: e.type, data: e.data, metadata: e.metadata }], { expectedRevision: e.revision === 0 ? 'no_stream' : e.revision - 1 })
  }
  const projections = new Projections({ db: database.db, store, retryMs: 50 }, PROJECTIONS)
  t.teardown(() => projections.stop())
  projections.start()
  await projections.waitFor(await store.headPosition(), 30_000)
  const q = async (query: ReturnType<typeof sql>) => (await query.execute(database.db)).rows
  return {
    training_jobs: await q(sql`select * from rm_training.training_jobs order by submitted_at, job_id`),
    training_rounds: await q(sql`select * from rm_training.training_rounds order by job_id, round`),
    datasets: await q(sql`select * from rm_datasets.datasets order by dataset_id`),
    usage: await q(sql`select * from rm_usage.usage_hourly order by customer_id, hour, sdk_uuid, instance_type, outcome`),
  }
}

t.test('the golden training history folds and replays to what it gave when recorded', async (t) => {
  const golden: GoldenEvent[] = readFileSync(FIXTURE, 'utf8').split('\n').filter(Boolean).map((line) => JSON.parse(line))
  for (const type of ['TrainingSubmitted', 'TrainingDevicesAssigned', 'TrainingDevicesReleased', 'TrainingRoundCompleted', 'TrainingPaused', 'TrainingResumed', 'TrainingCancelled', 'TrainingCompleted', 'DatasetUploaded']) {
    t.ok(golden.some((e) => e.type === type), `the history holds a ${type}`)
  }
  const states = foldStreams(golden)
  const database = await freshDatabase(t)
  const models = JSON.parse(JSON.stringify(await replay(t, database, golden)))
  if (RECORD) {
    writeFileSync(EXPECTED, `${JSON.stringify({ states, read_models: models }, null, 2)}\n`)
    return
  }
  const expected = JSON.parse(readFileSync(EXPECTED, 'utf8'))
  t.same(states, expected.states, "every stream folds through today's deciders to its recorded state")
  t.same(models.training_jobs, expected.read_models.training_jobs, 'training jobs')
  t.same(models.training_rounds, expected.read_models.training_rounds, 'training rounds')
  t.same(models.datasets, expected.read_models.datasets, 'datasets')
  t.same(models.usage, expected.read_models.usage, 'training usage')
})
