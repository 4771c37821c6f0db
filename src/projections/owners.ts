import type { Kysely } from 'kysely'
import { liveSchema } from './projection.js'

/** Where each kind of customer-owned id lives: read model, table, id column (all have `customer_id`). */
const OWNED = [
  { schema: liveSchema('inference'), table: 'inference_jobs', column: 'job_id' },
  { schema: liveSchema('training'), table: 'training_jobs', column: 'job_id' },
  { schema: liveSchema('models'), table: 'models', column: 'model_id' },
  { schema: liveSchema('projects'), table: 'projects', column: 'project_id' },
  { schema: liveSchema('datasets'), table: 'datasets', column: 'dataset_id' },
] as const

/**
 * The customer owning each of `ids` (job, model, project and dataset ids), from the read models. Ids no
 * customer owns (unknown, or not a dcp id after all) are absent from the map.
 */
export async function ownersOf(db: Kysely<any>, ids: readonly string[]): Promise<Map<string, string>> {
  const owners = new Map<string, string>()
  if (ids.length === 0) return owners
  const found = await Promise.all(
    OWNED.map(({ schema, table, column }) =>
      db.withSchema(schema).selectFrom(table).select([`${column} as id`, 'customer_id']).where(column, 'in', [...ids]).execute() as Promise<{ id: string; customer_id: string }[]>,
    ),
  )
  for (const rows of found) for (const row of rows) owners.set(row.id, row.customer_id)
  return owners
}
