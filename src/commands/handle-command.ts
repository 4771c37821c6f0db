import type { Decider, DomainEvent } from '../domain/decider.js'
import { WrongExpectedRevisionError } from '../event-store/errors.js'
import { eventIdFor, newEventId } from '../event-store/event-id.js'
import type { EventMetadata, EventStore, Position, RecordedEvent } from '../event-store/port.js'
import { appendAll, START } from '../event-store/port.js'

export interface CommandOptions {
  /**
   * Makes the command's event ids deterministic: a retry with the same key (after a timeout, a lost
   * reply, a crash) returns the first run's result instead of appending again.
   */
  idempotencyKey?: string
  /** Stored with every event (customerId, correlationId, causationId, occurredAt). */
  metadata?: EventMetadata
  /** How often to re-read and decide again after a concurrent writer won. Default 5. */
  maxConflictRetries?: number
}

/**
 * The stream's state and last revision (-1: no stream yet) as the caller already knows them, for example as
 * the stream's only writer, or for a stream it has just named: the first attempt decides on it without
 * reading the stream (one round trip fewer). If the stream moved meanwhile, the append conflicts and the
 * command is handled the usual way.
 */
export interface KnownState<State> {
  state: State
  revision: number
}

export interface CommandResult<Event, State> {
  /** The events this command appended (or, for a repeated idempotency key, appended the first time). */
  events: Event[]
  /** The stream's state after them. */
  state: State
  nextRevision: number
  /** Where the command's last event sits in the log: give it to `projections.waitFor` for read-your-writes. */
  position: Position
  /** True when the idempotency key had already been handled and nothing new was appended. */
  repeated: boolean
}

/**
 * The one command handler: read the stream, fold it, decide, append with the expected revision; on a
 * conflict, do it all again with the newer state.
 */
export async function handleCommand<Command, Event extends DomainEvent, State>(
  store: EventStore,
  streamId: string,
  decider: Decider<Command, Event, State>,
  command: Command,
  options: CommandOptions & { known?: KnownState<State> } = {},
): Promise<CommandResult<Event, State>> {
  const maxRetries = options.maxConflictRetries ?? 5
  const known = options.idempotencyKey ? undefined : options.known
  if (known) {
    const events = decideOn(decider, command, known.state)
    // Only a decision to append is taken on what the caller knew; a refusal or a no-op is checked on the stream.
    if (events && events.length > 0) {
      try {
        const result = await store.append(streamId, toNewEvents(events, options), { expectedRevision: known.revision < 0 ? 'no_stream' : known.revision })
        return { events, state: events.reduce(decider.evolve, known.state), nextRevision: result.nextRevision, position: result.position, repeated: false }
      } catch (error) {
        if (!(error instanceof WrongExpectedRevisionError)) throw error
        // the stream moved: read it and decide again below
      }
    }
  }
  for (let attempt = 0; ; attempt++) {
    // 1. read the stream and fold it
    const recorded = await store.readStream(streamId)
    const history = recorded.map((e) => decider.parse({ type: e.type, data: e.data, schemaVersion: e.metadata.schemaVersion ?? 1 }))
    let state = history.reduce(decider.evolve, decider.initialState())
    // 2. a repeated idempotency key answers with what the first run appended
    const repeat = options.idempotencyKey ? findRepeat(recorded, options.idempotencyKey) : undefined
    if (repeat) {
      const events = repeat.map((i) => history[i]!)
      const last = recorded[repeat.at(-1)!]!
      return { events, state, nextRevision: recorded.at(-1)!.revision, position: last.position, repeated: true }
    }
    // 3. decide
    const events = decider.decide(command, state)
    if (events.length === 0) {
      const last = recorded.at(-1)
      return { events, state, nextRevision: last?.revision ?? -1, position: last?.position ?? START, repeated: false }
    }
    // 4. append with the revision the decision was based on
    const expectedRevision = recorded.length === 0 ? 'no_stream' : recorded.at(-1)!.revision
    try {
      const result = await store.append(streamId, toNewEvents(events, options), { expectedRevision })
      state = events.reduce(decider.evolve, state)
      return { events, state, nextRevision: result.nextRevision, position: result.position, repeated: false }
    } catch (error) {
      // 5. someone else appended first: decide again on the newer state
      if (error instanceof WrongExpectedRevisionError && attempt < maxRetries) continue
      throw error
    }
  }
}

function decideOn<Command, Event extends DomainEvent, State>(decider: Decider<Command, Event, State>, command: Command, state: State): Event[] | undefined {
  try {
    return decider.decide(command, state)
  } catch {
    return undefined
  }
}

/** A command that starts a new stream, for `startStreams`. */
export interface StreamStart<Command = any, Event extends DomainEvent = any, State = any> {
  streamId: string
  decider: Decider<Command, Event, State>
  command: Command
  metadata?: EventMetadata
}

/**
 * Commands that each start a new stream (fresh ids: there is nothing to read), decided on their deciders'
 * initial state and appended together, all or nothing (`appendAll`): on Postgres a job and its first tasks
 * are recorded in one transaction, and one commit; on EventStoreDB as one recorded intent, applied stream
 * by stream and completed by recovery after a crash (readers may see the job before its tasks meanwhile).
 * A stream that exists already refuses the whole lot with WrongExpectedRevisionError.
 */
export async function startStreams(store: EventStore, starts: readonly StreamStart[]): Promise<CommandResult<DomainEvent, unknown>[]> {
  const decided = starts.map((start) => {
    const state = start.decider.initialState()
    return { start, state, events: start.decider.decide(start.command, state) }
  })
  const results = await appendAll(
    store,
    decided.map(({ start, events }) => ({ streamId: start.streamId, events: toNewEvents(events, { ...(start.metadata ? { metadata: start.metadata } : {}) }), options: { expectedRevision: 'no_stream' as const } })),
  )
  return decided.map(({ start, state, events }, i) => ({
    events,
    state: events.reduce(start.decider.evolve, state),
    nextRevision: results[i]!.nextRevision,
    position: results[i]!.position,
    repeated: false,
  }))
}

function toNewEvents(events: DomainEvent[], options: CommandOptions) {
  return events.map((event, i) => ({
    id: options.idempotencyKey ? eventIdFor(options.idempotencyKey, i) : newEventId(),
    type: event.type,
    data: event.data,
    metadata: { schemaVersion: 1, ...options.metadata },
  }))
}

/** Indexes of the events the first run with this key appended, if it did. */
function findRepeat(recorded: RecordedEvent[], idempotencyKey: string): number[] | undefined {
  const byId = new Map(recorded.map((e, i) => [e.id, i]))
  const indexes: number[] = []
  for (let at = byId.get(eventIdFor(idempotencyKey, 0)); at !== undefined; at = byId.get(eventIdFor(idempotencyKey, indexes.length))) {
    indexes.push(at)
  }
  return indexes.length > 0 ? indexes : undefined
}

/** A stream's state, folded from its events; undefined for a stream that does not exist. */
export async function loadState<Command, Event extends DomainEvent, State>(store: EventStore, streamId: string, decider: Decider<Command, Event, State>): Promise<State | undefined> {
  const recorded = await store.readStream(streamId)
  if (recorded.length === 0) return undefined
  return recorded.map((e) => decider.parse({ type: e.type, data: e.data, schemaVersion: e.metadata.schemaVersion ?? 1 })).reduce(decider.evolve, decider.initialState())
}
