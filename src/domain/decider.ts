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
