import { type Kysely, sql } from 'kysely'
import { type DatasetDescription, datasetDecider, datasetEventTypes } from '../domain/dataset.js'
import { liveSchema, type Projection } from './projection.js'

/** Uploaded training datasets; a deleted one keeps its row with `deleted_at`. */
export const datasetsProjection: Projection = {
  name: 'datasets',
  version: 1,
  filter: { types: datasetEventTypes },
  tables: [{ name: 'datasets', primaryKey: ['dataset_id'] }],

  async createTables(db) {
    await db.schema
      .createTable('datasets')
      .addColumn('dataset_id', 'text', (c) => c.primaryKey())
      .addColumn('customer_id', 'text', (c) => c.notNull())
      .addColumn('name', 'text', (c) => c.notNull())
      .addColumn('format', 'text', (c) => c.notNull())
      .addColumn('size', 'bigint', (c) => c.notNull())
      .addColumn('checksum', 'text', (c) => c.notNull())
      .addColumn('rows', 'bigint', (c) => c.notNull())
      .addColumn('features', 'integer', (c) => c.notNull())
      .addColumn('label_kind', 'text', (c) => c.notNull())
      .addColumn('classes', 'integer', (c) => c.notNull())
      .addColumn('uploaded_at', 'text', (c) => c.notNull())
      .addColumn('deleted_at', 'text')
      .execute()
    await db.schema.createIndex('datasets_by_customer').on('datasets').columns(['customer_id', 'uploaded_at']).execute()
  },

  async apply(trx, events) {
    for (const recorded of events) {
      const event = datasetDecider.parse({ type: recorded.type, data: recorded.data, schemaVersion: recorded.metadata.schemaVersion ?? 1 })
      if (event.type === 'DatasetUploaded') await trx.insertInto('datasets').values({ ...event.data, deleted_at: null }).onConflict((oc) => oc.doNothing()).execute()
      else await trx.updateTable('datasets').set({ deleted_at: event.data.deleted_at }).where('dataset_id', '=', event.data.dataset_id).execute()
    }
  },
}

export type DatasetRow = DatasetDescription & { deleted_at: string | null }

const schema = liveSchema(datasetsProjection.name)
const fromRow = (row: Record<string, unknown>): DatasetRow => ({ ...(row as DatasetRow), size: Number(row.size), rows: Number(row.rows) })

/** The customer's dataset, if it exists and is not deleted. */
export async function findDataset(db: Kysely<any>, customerId: string, datasetId: string): Promise<DatasetRow | undefined> {
  const row = await db.withSchema(schema).selectFrom('datasets').selectAll().where('dataset_id', '=', datasetId).where('customer_id', '=', customerId).where('deleted_at', 'is', null).executeTakeFirst()
  return row ? fromRow(row) : undefined
}

/** Where a dataset's file is, whoever owns it (a device training on it downloads it). */
export async function findDatasetFile(db: Kysely<any>, datasetId: string): Promise<DatasetRow | undefined> {
  const row = await db.withSchema(schema).selectFrom('datasets').selectAll().where('dataset_id', '=', datasetId).executeTakeFirst()
  return row ? fromRow(row) : undefined
}

export async function listDatasets(db: Kysely<any>, customerId: string, page: { limit: number; offset: number }) {
  const base = db.withSchema(schema).selectFrom('datasets').where('customer_id', '=', customerId).where('deleted_at', 'is', null)
  const [rows, total] = await Promise.all([
    base.selectAll().orderBy('uploaded_at', 'desc').orderBy('dataset_id').limit(page.limit).offset(page.offset).execute(),
    base.select(sql<string>`count(*)`.as('n')).executeTakeFirst(),
  ])
  return { datasets: rows.map(fromRow), total: Number(total?.n ?? 0) }
}
