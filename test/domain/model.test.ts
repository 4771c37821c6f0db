import t from 'tap'
import { batchingOf, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE_DELAY_MS, type ModelCommand, modelDecider, type ModelState } from '../../src/domain/model.js'

const at = '2026-12-01T00:00:00.000Z'
/** A ModelUploaded's data as recorded before the batching settings existed. */
const recordedBefore = {
  model_id: 'model_1', customer_id: 'cust_1', name: 'm', format: 'onnx', size: 10, checksum: 'sha256:00', input_shape: null, output_shape: null,
  inputs: [], outputs: [], input_schema: null, output_schema: null, labels: null, preprocessing: null, postprocessing: null, uploaded_at: at,
}

/** Decides and folds, as the command handler does; the events pass through their own schema (what is stored). */
function run(state: ModelState, command: ModelCommand) {
  const events = modelDecider.decide(command, state).map((e) => modelDecider.parse({ type: e.type, data: JSON.parse(JSON.stringify(e.data)), schemaVersion: 1 }))
  return { events, state: events.reduce(modelDecider.evolve, state) }
}

t.test('given a model recorded before the batching settings, it reads with them null and the defaults apply', async (t) => {
  const event = modelDecider.parse({ type: 'ModelUploaded', data: recordedBefore, schemaVersion: 1 })
  const state = modelDecider.evolve(modelDecider.initialState(), event)
  t.strictSame([state.model!.max_batch_size, state.model!.max_queue_delay_ms], [null, null], 'null, not absent')
  t.same(batchingOf(state.model!), { max_batch_size: DEFAULT_MAX_BATCH_SIZE, max_queue_delay_ms: DEFAULT_MAX_QUEUE_DELAY_MS })
  t.same([DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE_DELAY_MS], [32, 0])
})

t.test('when the schema update sets or clears a setting, then only that one changes', async (t) => {
  const uploaded = modelDecider.evolve(modelDecider.initialState(), modelDecider.parse({ type: 'ModelUploaded', data: recordedBefore, schemaVersion: 1 }))
  const set = run(uploaded, { type: 'UpdateModelSchema', customerId: 'cust_1', changes: { max_batch_size: 1, max_queue_delay_ms: 250 }, at })
  t.match(set.events, [{ type: 'ModelSchemaUpdated', data: { changes: { max_batch_size: 1, max_queue_delay_ms: 250 } } }])
  t.same(batchingOf(set.state.model!), { max_batch_size: 1, max_queue_delay_ms: 250 })
  const cleared = run(set.state, { type: 'UpdateModelSchema', customerId: 'cust_1', changes: { max_queue_delay_ms: null }, at })
  t.match(cleared.state.model, { max_batch_size: 1, max_queue_delay_ms: null })
  t.same(batchingOf(cleared.state.model!), { max_batch_size: 1, max_queue_delay_ms: DEFAULT_MAX_QUEUE_DELAY_MS })
})

t.test('a recorded value outside the bounds does not parse (the bounds hold for what is stored)', async (t) => {
  for (const bad of [{ max_batch_size: 0 }, { max_batch_size: 4097 }, { max_batch_size: 2.5 }, { max_queue_delay_ms: -1 }, { max_queue_delay_ms: 10_001 }]) {
    t.throws(() => modelDecider.parse({ type: 'ModelUploaded', data: { ...recordedBefore, ...bad }, schemaVersion: 1 }), JSON.stringify(bad))
  }
})
