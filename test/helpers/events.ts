import { type EventStore, type RecordedEvent, START } from '../../src/event-store/port.js'

/** Every event of the log, in position order. */
export async function allEvents(store: EventStore): Promise<RecordedEvent[]> {
  const events: RecordedEvent[] = []
  for (let from = START; ; ) {
    const page = await store.readAll(from, 10_000)
    events.push(...page)
    if (page.length < 10_000) return events
    from = page.at(-1)!.position
  }
}
