import { exec } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { promisify } from 'node:util'
import { EventStoreDBClient } from '@eventstore/db-client'
import t from 'tap'
import { EventStoreDbEventStore } from '../../src/event-store/eventstoredb.js'
import { eventStoreContract } from './contract.js'

// No EventStoreDB can run on the development machines or in CI here: the contract runs where
// EVENTSTORE_URL points at a server (e.g. `docker compose up eventstore`, then
// EVENTSTORE_URL='esdb://localhost:2113?tls=false' npm test -- test/event-store/eventstoredb.test.ts).
// EVENTSTORE_MAX_APPEND_SIZE: the server's MaxAppendSize in bytes, as docker-compose.yml sets it (default
// 1048576, the server's default). EVENTSTORE_RESTART_COMMAND (e.g. `docker compose restart eventstore`):
// runs the test of a subscription across a server restart. The mapping tests in
// eventstoredb-mapping.test.ts run always.
const url = process.env.EVENTSTORE_URL
const restartCommand = process.env.EVENTSTORE_RESTART_COMMAND

t.test('contract against EventStoreDB', { skip: url ? false : 'EVENTSTORE_URL is not set: no EventStoreDB server to test against' }, async (t) => {
  const admin = EventStoreDBClient.connectionString(url!)
  t.teardown(() => admin.dispose())
  eventStoreContract(
    t,
    async (t) => {
      const store = EventStoreDbEventStore.fromConnectionString(url!)
      t.teardown(() => store.close())
      return store
    },
    {
      maxAppendBytes: Number(process.env.EVENTSTORE_MAX_APPEND_SIZE ?? 1_048_576),
      // each metadata write is a `$metadata` event in `$$<stream>`
      writeSystemEvents: async () => {
        const stream = `system-${randomUUID().slice(0, 8)}`
        for (let n = 1; n <= 3; n++) await admin.setStreamMetadata(stream, { maxCount: 10 * n })
      },
      ...(restartCommand ? { restartServer: () => restart(admin, restartCommand) } : {}),
    },
  )
})

/** Runs the restart command, then polls (a one-record read) until the server answers, for up to a minute. */
async function restart(client: EventStoreDBClient, command: string): Promise<void> {
  await promisify(exec)(command)
  const deadline = Date.now() + 60_000
  for (;;) {
    try {
      for await (const _ of client.readAll({ maxCount: 1, deadline: 2000 })) void _
      return
    } catch (error) {
      if (Date.now() > deadline) throw error
      await new Promise((resolve) => setTimeout(resolve, 250))
    }
  }
}
