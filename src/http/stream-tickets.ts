import { randomBytes } from 'node:crypto'

/** A ticket's holder: the customer, the API key it was issued to (by id and hash), and the project if one was named. */
export interface TicketHolder {
  customerId: string
  keyId: string
  /** SHA-256 of the API key: the stream re-checks it in the credentials read model to end when it is revoked. */
  keyHash: string
  projectId: string | null
}

export const STREAM_TICKET_PREFIX = 'dcp_t_'

/**
 * Short-lived, single-use tickets that open one live stream (`?ticket=`), so that no API key is ever put in a
 * URL (EventSource cannot send headers, and URLs end up in logs, proxies and browser history).
 *
 * Kept in memory: a ticket opens a stream on the node that issued it. With several nodes behind a balancer,
 * the ticket request and the stream must reach the same node (sticky sessions), or the tickets must move to
 * shared storage.
 */
export class StreamTickets {
  private readonly tickets = new Map<string, TicketHolder & { expiresAt: number }>()

  /** `ttlMs`: how long a ticket may wait to be used, default 60 s; `max`: tickets held at once, default 100,000. */
  constructor(
    readonly ttlMs = 60_000,
    private readonly now: () => number = Date.now,
    private readonly max = 100_000,
  ) {}

  issue(holder: TicketHolder): { ticket: string; expiresAt: Date } {
    this.sweep()
    if (this.tickets.size >= this.max) this.tickets.delete(this.tickets.keys().next().value!) // the oldest
    const ticket = `${STREAM_TICKET_PREFIX}${randomBytes(24).toString('base64url')}`
    const expiresAt = this.now() + this.ttlMs
    this.tickets.set(ticket, { ...holder, expiresAt })
    return { ticket, expiresAt: new Date(expiresAt) }
  }

  /** The ticket's holder, once: the ticket is gone after this call, whether it was valid or not. */
  consume(ticket: string): TicketHolder | undefined {
    const entry = this.tickets.get(ticket)
    if (!entry) return undefined
    this.tickets.delete(ticket)
    if (entry.expiresAt <= this.now()) return undefined
    const { expiresAt: _, ...holder } = entry
    return holder
  }

  private sweep(): void {
    const now = this.now()
    // insertion order is expiry order (one ttl for all), so the expired ones are at the front
    for (const [ticket, entry] of this.tickets) {
      if (entry.expiresAt > now) break
      this.tickets.delete(ticket)
    }
  }
}
