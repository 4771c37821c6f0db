import type { EventStore, NewEvent, AppendOptions, AppendResult } from '../../src/event-store/port.js'

export interface SingleStreamOptions {
  /** Runs before each append reaches the store; throwing there makes that append fail unwritten (a crash). */
  beforeAppend?(streamId: string, events: readonly NewEvent[]): void | Promise<void>
  /** Appends one at a time, each waiting for the one before (separate commits: a kill can land between them). */
  serial?: boolean
}

/**
 * A real store used only through its single-stream path, as a store without `appendMany` (EventStoreDB) is:
 * every call is forwarded except `appendMany`, which it does not have.
 */
export function withoutAppendMany(store: EventStore, options: SingleStreamOptions = {}): EventStore {
  let previous: Promise<unknown> = Promise.resolve()
  const append = (streamId: string, events: readonly NewEvent[], appendOptions?: AppendOptions): Promise<AppendResult> => {
    const write = async () => {
      await options.beforeAppend?.(streamId, events)
      return store.append(streamId, events, appendOptions)
    }
    if (!options.serial) return write()
    const next = previous.then(write, write)
    previous = next.catch(() => {})
    return next
  }
  return {
    append,
    readStream: (streamId, readOptions) => store.readStream(streamId, readOptions),
    readAll: (after, limit) => store.readAll(after, limit),
    subscribe: (subscribeOptions) => store.subscribe(subscribeOptions),
    headPosition: () => store.headPosition(),
    close: () => store.close(),
  }
}
