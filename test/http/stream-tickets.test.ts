import t from 'tap'
import { redactUrl } from '../../src/http/app.js'
import { StreamTickets } from '../../src/http/stream-tickets.js'

const holder = { customerId: 'cust_a', keyId: 'key_a', keyHash: 'h', projectId: null }

t.test('a ticket is consumed by its first use, valid or not, and expires after its ttl', async (t) => {
  let now = 1_000
  const tickets = new StreamTickets(60_000, () => now)
  const { ticket, expiresAt } = tickets.issue(holder)
  t.match(ticket, /^dcp_t_[A-Za-z0-9_-]{32}$/)
  t.equal(expiresAt.getTime(), 61_000)
  t.same(tickets.consume(ticket), holder)
  t.equal(tickets.consume(ticket), undefined, 'single use')

  const late = tickets.issue(holder).ticket
  now += 60_000
  t.equal(tickets.consume(late), undefined, 'expired at its ttl')
  t.equal(tickets.consume('dcp_t_unknown'), undefined)
  t.not(tickets.issue(holder).ticket, tickets.issue(holder).ticket, 'random')
})

t.test('at most `max` tickets are held: the oldest goes first', async (t) => {
  const tickets = new StreamTickets(60_000, () => 0, 2)
  const [a, b, c] = [tickets.issue(holder).ticket, tickets.issue(holder).ticket, tickets.issue(holder).ticket]
  t.equal(tickets.consume(a), undefined)
  t.ok(tickets.consume(b))
  t.ok(tickets.consume(c))
})

t.test('secrets in a logged URL are masked, other parameters kept', async (t) => {
  t.equal(redactUrl('/api/v1/x/stream?interval=200&ticket=dcp_t_abc&api_key=dcp_k_secret'), '/api/v1/x/stream?interval=200&ticket=[redacted]&api_key=[redacted]')
  t.equal(redactUrl('/a?API%5FKEY=s&token&limit=5'), '/a?API%5FKEY=[redacted]&token=[redacted]&limit=5')
  t.equal(redactUrl('/a?%E0%A4%A=1'), '/a?%E0%A4%A=1', 'a malformed name is kept as it is')
  t.equal(redactUrl('/plain'), '/plain')
})
