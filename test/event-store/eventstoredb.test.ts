import t from 'tap'
import { EventStoreDbEventStore } from '../../src/event-store/eventstoredb.js'
import { eventStoreContract } from './contract.js'

// No EventStoreDB can run on the development machines or in CI here: the contract runs where
// EVENTSTORE_URL points at a server (e.g. `docker compose up eventstore`, then
// EVENTSTORE_URL='esdb://localhost:2113?tls=false' npm test -- test/event-store/eventstoredb.test.ts).
// The mapping tests in eventstoredb-mapping.test.ts run always.
const url = process.env.EVENTSTORE_URL

t.test('contract against EventStoreDB', { skip: url ? false : 'EVENTSTORE_URL is not set: no EventStoreDB server to test against' }, async (t) => {
  eventStoreContract(t, async (t) => {
    const store = EventStoreDbEventStore.fromConnectionString(url!)
    t.teardown(() => store.close())
    return store
  })
})
