/** An event as the domain sees it: a type and its data. Metadata and positions stay in the store. */
export interface DomainEvent<Type extends string = string, Data = unknown> {
  type: Type
  data: Data
}

/**
 * A stream type's rules: `decide` turns a command and the current state into new events (or throws a
 * DomainError); `evolve` folds one event into the state. Both pure: time, ids and randomness come in on
 * the command. `parse` checks an event read back from the log (zod) and upcasts old schema versions.
 */
export interface Decider<Command, Event extends DomainEvent, State> {
  initialState: () => State
  evolve: (state: State, event: Event) => State
  decide: (command: Command, state: State) => Event[]
  parse: (event: { type: string; data: unknown; schemaVersion: number }) => Event
}

const parsedEvents = new WeakMap<object, Map<object, DomainEvent>>()

/**
 * `decider.parse` of an event read from the log, done once per event object and decider: the projections
 * of one batch share the same recorded events, and a task event that five read models handle is checked
 * once, not five times. The parsed event is shared, so it is read, never changed.
 */
export function parseRecorded<Event extends DomainEvent>(
  decider: Pick<Decider<never, Event, never>, 'parse'>,
  recorded: { type: string; data: unknown; metadata: { schemaVersion?: number | undefined } },
): Event {
  let byDecider = parsedEvents.get(recorded)
  if (!byDecider) parsedEvents.set(recorded, (byDecider = new Map()))
  let event = byDecider.get(decider) as Event | undefined
  if (!event) byDecider.set(decider, (event = decider.parse({ type: recorded.type, data: recorded.data, schemaVersion: recorded.metadata.schemaVersion ?? 1 })))
  return event
}
