import { sql } from 'kysely'
import t from 'tap'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import { readCheckpoint } from '../../src/projections/checkpoints.js'
import { findModel, modelsProjection } from '../../src/projections/models.js'
import type { Projection } from '../../src/projections/projection.js'
import { Projections } from '../../src/projections/projections.js'
import { freshDatabase } from '../helpers/database.js'

const at = '2026-01-01T00:00:00.000Z'
/** A ModelUploaded as recorded before the batching settings existed (no max_batch_size, no max_queue_delay_ms). */
const oldModel = (model_id: string) => ({
  model_id, customer_id: 'cust_a', name: model_id, format: 'onnx', size: 10, checksum: `sha256:${'0'.repeat(64)}`, input_shape: null, output_shape: null,
  inputs: [], outputs: [], input_schema: null, output_schema: null, labels: null, preprocessing: null, postprocessing: null,
  adapter_options: null, validation: null, validation_tolerance: null, uploaded_at: at,
})
const metadata = { schemaVersion: 1, customerId: 'cust_a', occurredAt: at }

t.test('a models read model built before the batching settings (version 3) is rebuilt on start with them', async (t) => {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  // 1. a deployment's read model as version 3 made it: the table without the two columns
  const v3: Projection = {
    ...modelsProjection,
    version: 3,
    async createTables(db) {
      await modelsProjection.createTables(db)
      await db.schema.alterTable('models').dropColumn('max_batch_size').dropColumn('max_queue_delay_ms').execute()
    },
  }
  await new Projections({ db: database.db, store, retryMs: 50 }, [v3]).rebuild('models')
  t.equal((await readCheckpoint(database.db, 'models'))!.version, 3)

  // 2. its log: a model of then, and models with the settings given at upload and by a schema update
  await store.append('model-model_old', [{ type: 'ModelUploaded', data: oldModel('model_old'), metadata }])
  await store.append('model-model_new', [{ type: 'ModelUploaded', data: { ...oldModel('model_new'), max_batch_size: 8, max_queue_delay_ms: 2 }, metadata }])
  await store.append('model-model_patched', [
    { type: 'ModelUploaded', data: oldModel('model_patched'), metadata },
    { type: 'ModelSchemaUpdated', data: { model_id: 'model_patched', customer_id: 'cust_a', changes: { max_batch_size: 1 }, updated_at: at }, metadata },
  ])

  // 3. today's code starts: the version differs, so the read model is built afresh, columns and all
  const projections = new Projections({ db: database.db, store, retryMs: 50 })
  t.teardown(() => projections.stop())
  projections.start()
  await projections.waitFor(await store.headPosition())
  t.equal((await readCheckpoint(database.db, 'models'))!.version, modelsProjection.version)
  t.ok(modelsProjection.version > 3, 'the version was bumped')
  const row = (id: string) => findModel(database.db, 'cust_a', id)
  t.match(await row('model_old'), { max_batch_size: null, max_queue_delay_ms: null }, 'an old model: null, the defaults apply')
  t.match(await row('model_new'), { max_batch_size: 8, max_queue_delay_ms: 2 })
  t.match(await row('model_patched'), { max_batch_size: 1, max_queue_delay_ms: null })
  const { rows } = await sql<{ column_name: string; data_type: string }>`
    select column_name, data_type from information_schema.columns
    where table_name = 'models' and column_name in ('max_batch_size', 'max_queue_delay_ms') and table_schema = 'rm_models' order by column_name`.execute(database.db)
  t.same(rows, [{ column_name: 'max_batch_size', data_type: 'integer' }, { column_name: 'max_queue_delay_ms', data_type: 'integer' }])
})
