import type { Kysely, Transaction } from 'kysely'
import { customerDecider, customerEventTypes } from '../domain/customer.js'
import { deviceDecider, type DeviceEvent } from '../domain/device.js'
import { parseRecorded } from '../domain/decider.js'
import { liveSchema, type Projection } from './projection.js'

/**
 * Customers, and every credential that identifies a caller (customers' API keys, devices' SDK tokens),
 * keyed by the SHA-256 of the secret: one lookup for every authentication method. A device's SDK token is
 * revoked with its enrollment token, and refused while the device is banned (`banned_at`).
 */
export const customersProjection: Projection = {
  name: 'customers',
  version: 2,
  filter: { types: [...customerEventTypes, 'DeviceRegistered', 'DeviceBanned', 'DeviceUnbanned', 'DeviceEnrollmentRevoked'] },
  tables: [
    { name: 'customers', primaryKey: ['customer_id'] },
    { name: 'credentials', primaryKey: ['key_hash'] },
  ],

  async createTables(db) {
    await db.schema
      .createTable('customers')
      .addColumn('customer_id', 'text', (c) => c.primaryKey())
      .addColumn('name', 'text', (c) => c.notNull())
      .addColumn('created_at', 'text', (c) => c.notNull())
      .execute()
    await db.schema
      .createTable('credentials')
      .addColumn('key_hash', 'text', (c) => c.primaryKey())
      .addColumn('kind', 'text', (c) => c.notNull())
      .addColumn('key_id', 'text', (c) => c.notNull())
      .addColumn('customer_id', 'text')
      .addColumn('prefix', 'text', (c) => c.notNull())
      .addColumn('created_at', 'text', (c) => c.notNull())
      .addColumn('revoked_at', 'text')
      .addColumn('banned_at', 'text')
      .execute()
    await db.schema.createIndex('credentials_key_id').on('credentials').column('key_id').execute()
  },

  async apply(trx, events) {
    for (const recorded of events) {
      if (recorded.type.startsWith('Device')) {
        await applyDevice(trx, parseRecorded(deviceDecider, recorded))
        continue
      }
      const event = customerDecider.parse({ type: recorded.type, data: recorded.data, schemaVersion: recorded.metadata.schemaVersion ?? 1 })
      switch (event.type) {
        case 'CustomerCreated':
          await trx.insertInto('customers').values(event.data).onConflict((oc) => oc.doNothing()).execute()
          break
        case 'ApiKeyIssued': {
          const { key_hash, key_id, customer_id, prefix, created_at } = event.data
          await trx
            .insertInto('credentials')
            .values({ key_hash, kind: 'api_key', key_id, customer_id, prefix, created_at, revoked_at: null, banned_at: null })
            .onConflict((oc) => oc.doNothing())
            .execute()
          break
        }
        case 'ApiKeyRevoked':
          await trx.updateTable('credentials').set({ revoked_at: event.data.revoked_at }).where('key_id', '=', event.data.key_id).execute()
          break
      }
    }
  },
}

async function applyDevice(trx: Transaction<any>, event: DeviceEvent): Promise<void> {
  const sdkToken = (deviceId: string) => trx.updateTable('credentials').where('key_id', '=', deviceId).where('kind', '=', 'sdk_token')
  switch (event.type) {
    case 'DeviceRegistered': {
      const { token_hash, device_id, registered_at } = event.data
      await trx
        .insertInto('credentials')
        .values({ key_hash: token_hash, kind: 'sdk_token', key_id: device_id, customer_id: null, prefix: 'dcp_s_', created_at: registered_at, revoked_at: null, banned_at: null })
        .onConflict((oc) => oc.doNothing())
        .execute()
      return
    }
    case 'DeviceBanned':
      await sdkToken(event.data.device_id).set({ banned_at: event.data.banned_at }).execute()
      return
    case 'DeviceUnbanned':
      await sdkToken(event.data.device_id).set({ banned_at: null }).execute()
      return
    case 'DeviceEnrollmentRevoked':
      await sdkToken(event.data.device_id).set({ revoked_at: event.data.revoked_at }).execute()
      return
  }
}

export interface Credential {
  kind: 'api_key' | 'sdk_token'
  key_id: string
  key_hash: string
  customer_id: string | null
  revoked_at: string | null
  /** An SDK token's device is banned. */
  banned_at: string | null
}

const schema = liveSchema(customersProjection.name)

export async function findCredential(db: Kysely<any>, keyHash: string): Promise<Credential | undefined> {
  return db.withSchema(schema).selectFrom('credentials').select(['kind', 'key_id', 'key_hash', 'customer_id', 'revoked_at', 'banned_at']).where('key_hash', '=', keyHash).executeTakeFirst()
}

export async function listCustomers(db: Kysely<any>): Promise<{ customer_id: string; name: string; created_at: string; active_keys: number }[]> {
  const rows = await db
    .withSchema(schema)
    .selectFrom('customers as c')
    .leftJoin('credentials as k', (j) => j.onRef('k.customer_id', '=', 'c.customer_id').on('k.revoked_at', 'is', null))
    .select(['c.customer_id', 'c.name', 'c.created_at', (eb) => eb.fn.count<string>('k.key_id').as('active_keys')])
    .groupBy(['c.customer_id', 'c.name', 'c.created_at'])
    .orderBy('c.created_at')
    .orderBy('c.customer_id')
    .execute()
  return rows.map((r) => ({ ...r, active_keys: Number(r.active_keys) }))
}

export async function listKeys(db: Kysely<any>, customerId: string) {
  return db
    .withSchema(schema)
    .selectFrom('credentials')
    .select(['key_id', 'prefix', 'created_at', 'revoked_at'])
    .where('customer_id', '=', customerId)
    .where('kind', '=', 'api_key')
    .orderBy('created_at')
    .orderBy('key_id')
    .execute()
}

export async function customerExists(db: Kysely<any>, customerId: string): Promise<boolean> {
  const row = await db.withSchema(schema).selectFrom('customers').select('customer_id').where('customer_id', '=', customerId).executeTakeFirst()
  return row !== undefined
}
