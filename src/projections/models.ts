import { type Kysely, sql } from 'kysely'
import { applyChanges, type ModelDescription, modelDecider, modelEventTypes } from '../domain/model.js'
import { liveSchema, type Projection } from './projection.js'

const JSON_COLUMNS = ['input_shape', 'output_shape', 'inputs', 'outputs', 'input_schema', 'output_schema', 'labels', 'adapter_options'] as const

/** Every customer's models as the API shows them; deleted ones keep their row with `deleted_at`. */
export const modelsProjection: Projection = {
  name: 'models',
  // 3: validation and validation_tolerance; 4: max_batch_size and max_queue_delay_ms (dynamic batching)
  version: 4,
  filter: { types: modelEventTypes },
  tables: [{ name: 'models', primaryKey: ['model_id'] }],

  async createTables(db) {
    let table = db.schema
      .createTable('models')
      .addColumn('model_id', 'text', (c) => c.primaryKey())
      .addColumn('customer_id', 'text', (c) => c.notNull())
      .addColumn('name', 'text', (c) => c.notNull())
      .addColumn('format', 'text', (c) => c.notNull())
      .addColumn('size', 'bigint', (c) => c.notNull())
      .addColumn('checksum', 'text', (c) => c.notNull())
      .addColumn('preprocessing', 'text')
      .addColumn('postprocessing', 'text')
      .addColumn('validation', 'text')
      .addColumn('validation_tolerance', 'double precision')
      .addColumn('max_batch_size', 'integer')
      .addColumn('max_queue_delay_ms', 'integer')
      .addColumn('uploaded_at', 'text', (c) => c.notNull())
      .addColumn('updated_at', 'text', (c) => c.notNull())
      .addColumn('deleted_at', 'text')
    for (const column of JSON_COLUMNS) table = table.addColumn(column, 'jsonb')
    await table.execute()
    await db.schema.createIndex('models_by_customer').on('models').columns(['customer_id', 'uploaded_at']).execute()
  },

  async apply(trx, events) {
    for (const recorded of events) {
      const event = modelDecider.parse({ type: recorded.type, data: recorded.data, schemaVersion: recorded.metadata.schemaVersion ?? 1 })
      switch (event.type) {
        case 'ModelUploaded':
          await trx
            .insertInto('models')
            .values({ ...toRow(event.data), updated_at: event.data.uploaded_at, deleted_at: null })
            .onConflict((oc) => oc.doNothing())
            .execute()
          break
        case 'ModelSchemaUpdated': {
          const current = await trx.selectFrom('models').selectAll().where('model_id', '=', event.data.model_id).executeTakeFirst()
          if (!current) break
          const next = applyChanges(fromRow(current), event.data.changes)
          await trx.updateTable('models').set({ ...toRow(next), updated_at: event.data.updated_at }).where('model_id', '=', event.data.model_id).execute()
          break
        }
        case 'ModelDeleted':
          await trx.updateTable('models').set({ deleted_at: event.data.deleted_at, updated_at: event.data.deleted_at }).where('model_id', '=', event.data.model_id).execute()
          break
      }
    }
  },
}

function toRow(model: ModelDescription): Record<string, unknown> {
  const row: Record<string, unknown> = { ...model }
  for (const column of JSON_COLUMNS) row[column] = model[column] === null ? null : JSON.stringify(model[column])
  return row
}

export type ModelRow = ModelDescription & { updated_at: string; deleted_at: string | null }

function fromRow(row: Record<string, unknown>): ModelRow {
  return { ...(row as ModelRow), size: Number(row.size) }
}

const schema = liveSchema(modelsProjection.name)

/** The customer's models that are not deleted, newest first, a page at a time. */
export async function listModels(db: Kysely<any>, customerId: string, page: { limit: number; offset: number }) {
  const base = db.withSchema(schema).selectFrom('models').where('customer_id', '=', customerId).where('deleted_at', 'is', null)
  const [rows, total] = await Promise.all([
    base.selectAll().orderBy('uploaded_at', 'desc').orderBy('model_id').limit(page.limit).offset(page.offset).execute(),
    base.select(sql<string>`count(*)`.as('n')).executeTakeFirst(),
  ])
  return { models: rows.map(fromRow), total: Number(total?.n ?? 0) }
}

/** The model if it exists, is not deleted, and belongs to the customer. */
export async function findModel(db: Kysely<any>, customerId: string, modelId: string): Promise<ModelRow | undefined> {
  const row = await db
    .withSchema(schema)
    .selectFrom('models')
    .selectAll()
    .where('model_id', '=', modelId)
    .where('customer_id', '=', customerId)
    .where('deleted_at', 'is', null)
    .executeTakeFirst()
  return row ? fromRow(row) : undefined
}

export async function countModels(db: Kysely<any>): Promise<number> {
  const row = await db.withSchema(schema).selectFrom('models').select(sql<string>`count(*)`.as('n')).where('deleted_at', 'is', null).executeTakeFirst()
  return Number(row?.n ?? 0)
}

/** Where a model's file is, whoever owns it and even if deleted (work already leased on it finishes). */
export async function findModelFile(db: Kysely<any>, modelId: string): Promise<{ model_id: string; checksum: string; size: number } | undefined> {
  const row = await db.withSchema(schema).selectFrom('models').select(['model_id', 'checksum', 'size']).where('model_id', '=', modelId).executeTakeFirst()
  return row ? { model_id: row.model_id, checksum: row.checksum, size: Number(row.size) } : undefined
}

/** Bytes of a customer's models and datasets that are not deleted (its storage quota counts them). */
export async function storageUsed(db: Kysely<any>, customerId: string): Promise<number> {
  const { rows } = await sql<{ bytes: string | null }>`
    select (select coalesce(sum(size), 0) from ${sql.table(`${schema}.models`)} where customer_id = ${customerId} and deleted_at is null)
         + (select coalesce(sum(size), 0) from ${sql.table(`${liveSchema('datasets')}.datasets`)} where customer_id = ${customerId} and deleted_at is null) as bytes`.execute(db)
  return Number(rows[0]?.bytes ?? 0)
}
