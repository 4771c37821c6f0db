import type { Kysely } from 'kysely'
import { parseRecorded } from '../domain/decider.js'
import { enrollmentTokenDecider, enrollmentTokenEventTypes } from '../domain/enrollment-token.js'
import { liveSchema, type Projection } from './projection.js'

/**
 * Enrollment tokens for the admin list, and by the hash of the secret for the hub, which looks up the token a
 * new device presents (its stream then decides). The secret itself is never stored.
 */
export const enrollmentTokensProjection: Projection = {
  name: 'enrollment_tokens',
  version: 1,
  filter: { types: enrollmentTokenEventTypes },
  tables: [{ name: 'enrollment_tokens', primaryKey: ['token_id'] }],

  async createTables(db) {
    await db.schema
      .createTable('enrollment_tokens')
      .addColumn('token_id', 'text', (c) => c.primaryKey())
      .addColumn('token_hash', 'text', (c) => c.notNull().unique())
      .addColumn('label', 'text', (c) => c.notNull())
      .addColumn('prefix', 'text', (c) => c.notNull())
      .addColumn('instance_type', 'text', (c) => c.notNull())
      .addColumn('expires_at', 'text')
      .addColumn('max_devices', 'integer')
      .addColumn('devices', 'integer', (c) => c.notNull())
      .addColumn('created_at', 'text', (c) => c.notNull())
      .addColumn('revoked_at', 'text')
      .execute()
  },

  async apply(trx, events) {
    for (const recorded of events) {
      const event = parseRecorded(enrollmentTokenDecider, recorded)
      switch (event.type) {
        case 'EnrollmentTokenCreated':
          await trx.insertInto('enrollment_tokens').values({ ...event.data, devices: 0, revoked_at: null }).onConflict((oc) => oc.doNothing()).execute()
          break
        case 'EnrollmentTokenUsed':
          await trx.updateTable('enrollment_tokens').set((eb) => ({ devices: eb('devices', '+', 1) })).where('token_id', '=', event.data.token_id).execute()
          break
        case 'EnrollmentTokenRevoked':
          await trx.updateTable('enrollment_tokens').set({ revoked_at: event.data.revoked_at }).where('token_id', '=', event.data.token_id).execute()
          break
      }
    }
  },
}

const schema = liveSchema(enrollmentTokensProjection.name)

export interface EnrollmentTokenView {
  id: string
  label: string
  prefix: string
  instance_type: 'aws' | 'user'
  expires_at: string | null
  max_devices: number | null
  devices: number
  created_at: string
  revoked: boolean
  revoked_at: string | null
}

export async function listEnrollmentTokens(db: Kysely<any>): Promise<EnrollmentTokenView[]> {
  const rows = await db.withSchema(schema).selectFrom('enrollment_tokens').selectAll().orderBy('created_at').orderBy('token_id').execute()
  return rows.map((r) => ({
    id: r.token_id,
    label: r.label,
    prefix: r.prefix,
    instance_type: r.instance_type,
    expires_at: r.expires_at,
    max_devices: r.max_devices,
    devices: r.devices,
    created_at: r.created_at,
    revoked: r.revoked_at !== null,
    revoked_at: r.revoked_at,
  }))
}

/** The id of the token whose secret hashes to `tokenHash`. */
export async function enrollmentTokenIdByHash(db: Kysely<any>, tokenHash: string): Promise<string | undefined> {
  const row = await db.withSchema(schema).selectFrom('enrollment_tokens').select('token_id').where('token_hash', '=', tokenHash).executeTakeFirst()
  return row?.token_id
}
