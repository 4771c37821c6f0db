import t from 'tap'
import { handleCommand } from '../../src/commands/handle-command.js'
import type { Decider } from '../../src/domain/decider.js'
import { DomainError } from '../../src/domain/errors.js'
import { PostgresEventStore } from '../../src/event-store/postgres.js'
import { freshDatabase } from '../helpers/database.js'

// A small account stream: enough rules to see fold, decide, conflicts and idempotency at work.
type Command = { type: 'Open'; owner: string } | { type: 'Deposit'; amount: number } | { type: 'Withdraw'; amount: number }
type Event = { type: 'Opened'; data: { owner: string } } | { type: 'Deposited'; data: { amount: number } } | { type: 'Withdrawn'; data: { amount: number } }
type State = { open: boolean; balance: number }

const account: Decider<Command, Event, State> = {
  initialState: () => ({ open: false, balance: 0 }),
  evolve: (state, event) => {
    switch (event.type) {
      case 'Opened':
        return { ...state, open: true }
      case 'Deposited':
        return { ...state, balance: state.balance + event.data.amount }
      case 'Withdrawn':
        return { ...state, balance: state.balance - event.data.amount }
    }
  },
  decide: (command, state) => {
    switch (command.type) {
      case 'Open':
        if (state.open) throw new DomainError('CONFLICT', 'already open')
        return [{ type: 'Opened', data: { owner: command.owner } }]
      case 'Deposit':
        if (!state.open) throw new DomainError('NOT_FOUND', 'no such account')
        return [{ type: 'Deposited', data: { amount: command.amount } }]
      case 'Withdraw':
        if (state.balance < command.amount) throw new DomainError('INSUFFICIENT_FUNDS', `balance ${state.balance}`)
        return [{ type: 'Withdrawn', data: { amount: command.amount } }]
      default: {
        const unknown: never = command
        throw new Error(`unknown command ${String(unknown)}`)
      }
    }
  },
  parse: ({ type, data }) => ({ type, data }) as Event,
}

t.test('given events, when a command, then new events; business errors are typed', async (t) => {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  await handleCommand(store, 'account-1', account, { type: 'Open', owner: 'ada' })
  const result = await handleCommand(store, 'account-1', account, { type: 'Deposit', amount: 10 }, { metadata: { customerId: 'c1' } })
  t.same(result.events, [{ type: 'Deposited', data: { amount: 10 } }])
  t.same(result.state, { open: true, balance: 10 })
  t.equal(result.nextRevision, 1)
  const error = await handleCommand(store, 'account-1', account, { type: 'Withdraw', amount: 11 }).catch((e: unknown) => e)
  t.type(error, DomainError)
  t.equal((error as DomainError).code, 'INSUFFICIENT_FUNDS')
  const stored = await store.readStream('account-1')
  t.same(stored.map((e) => e.type), ['Opened', 'Deposited'])
  t.equal(stored[1]!.metadata.customerId, 'c1')
  t.equal(stored[1]!.position, result.position)
})

t.test('concurrent commands on one stream: conflicts are retried on the newer state', async (t) => {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  await handleCommand(store, 'account-2', account, { type: 'Open', owner: 'bob' })
  await handleCommand(store, 'account-2', account, { type: 'Deposit', amount: 5 })
  // 10 withdrawals of 1 race for a balance of 5: exactly 5 may succeed, never a negative balance
  const results = await Promise.allSettled(
    Array.from({ length: 10 }, () => handleCommand(store, 'account-2', account, { type: 'Withdraw', amount: 1 }, { maxConflictRetries: 20 })),
  )
  t.equal(results.filter((r) => r.status === 'fulfilled').length, 5)
  for (const r of results) if (r.status === 'rejected') t.equal((r.reason as DomainError).code, 'INSUFFICIENT_FUNDS')
  const stored = await store.readStream('account-2')
  t.same(stored.map((e) => e.revision), [...Array(7).keys()], 'contiguous revisions')
})

t.test('a repeated idempotency key returns the first result and appends nothing', async (t) => {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  await handleCommand(store, 'account-3', account, { type: 'Open', owner: 'cy' })
  const first = await handleCommand(store, 'account-3', account, { type: 'Deposit', amount: 7 }, { idempotencyKey: 'req-42' })
  const again = await Promise.all(
    Array.from({ length: 5 }, () => handleCommand(store, 'account-3', account, { type: 'Deposit', amount: 7 }, { idempotencyKey: 'req-42' })),
  )
  t.notOk(first.repeated)
  for (const r of again) {
    t.ok(r.repeated)
    t.equal(r.position, first.position)
    t.same(r.events, first.events)
  }
  t.same((await store.readStream('account-3')).map((e) => e.type), ['Opened', 'Deposited'], 'deposited once')
  const other = await handleCommand(store, 'account-3', account, { type: 'Deposit', amount: 7 }, { idempotencyKey: 'req-43' })
  t.equal(other.state.balance, 14, 'a new key is a new command')
})

t.test('a known state skips the read; when it is stale the stream decides', async (t) => {
  const database = await freshDatabase(t)
  const store = new PostgresEventStore(database.pool)
  t.teardown(() => store.close())
  let reads = 0
  const counting = Object.create(store) as PostgresEventStore
  counting.readStream = (...args) => {
    reads++
    return store.readStream(...args)
  }
  const opened = await handleCommand(counting, 'acct-k', account, { type: 'Open', owner: 'ann' }, { known: { state: account.initialState(), revision: -1 } })
  t.equal(reads, 0, 'a new stream is not read')
  const deposited = await handleCommand(counting, 'acct-k', account, { type: 'Deposit', amount: 10 }, { known: { state: opened.state, revision: opened.nextRevision } })
  t.equal(reads, 0, 'nor a stream whose state the caller holds')
  t.same(deposited.state, { open: true, balance: 10 })
  // Someone else withdrew meanwhile: the known state is stale, the append conflicts, the stream is read.
  await handleCommand(store, 'acct-k', account, { type: 'Withdraw', amount: 8 })
  await t.rejects(handleCommand(counting, 'acct-k', account, { type: 'Withdraw', amount: 5 }, { known: { state: deposited.state, revision: deposited.nextRevision } }), { code: 'INSUFFICIENT_FUNDS' })
  t.equal(reads, 1, 'read once the known state proved stale')
  // A refusal on a stale state is checked on the stream: here the stale state says closed, the stream says open.
  const ok = await handleCommand(counting, 'acct-k', account, { type: 'Deposit', amount: 1 }, { known: { state: account.initialState(), revision: -1 } })
  t.same(ok.state, { open: true, balance: 3 })
  const again = handleCommand(counting, 'acct-k', account, { type: 'Open', owner: 'bob' }, { known: { state: account.initialState(), revision: -1 } })
  await t.rejects(again, { code: 'CONFLICT' }, 'a stream that exists is not created twice')
})
