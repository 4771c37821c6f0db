import { UnstorableEventError } from './errors.js'
import { newEventId } from './event-id.js'
import type { NewEvent } from './port.js'

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i
/** JSON's escape of U+0000: `\u0000` preceded by an even number of backslashes. */
const NUL_ESCAPE = /(^|[^\\])(\\\\)*\\u0000/

/** The event's id as both adapters store it: a UUID, lowercased (a fresh one when the event has none). */
export function storedId(event: NewEvent): string {
  const id = event.id ?? newEventId()
  if (!UUID.test(id)) throw new TypeError(`event id ${JSON.stringify(id)} is not a UUID`)
  return id.toLowerCase()
}

/** Refuses an event's JSON (its data or metadata) when it holds U+0000: see UnstorableEventError. */
export function assertStorable(type: string, json: string): void {
  // the plain search first: it runs on every event written, and the pattern costs more per character
  if (json.includes('\\u0000') && NUL_ESCAPE.test(json)) throw new UnstorableEventError(type)
}

/**
 * Where a value from outside holds U+0000 (as `body.a.b`, `querystring.x`), if it does. The stores refuse
 * events that hold it (assertStorable), so input carrying one, an HTTP request or a device's frame, is refused
 * where it comes in, naming the field, rather than failing an append later. Object keys count too: they end
 * up in stored JSON just the same.
 */
export function nulField(value: unknown, root: string): string | undefined {
  const path = nulPath(value)
  return path && [root, ...path].join('.')
}

/** The path to the first U+0000, built only when there is one (this runs on every request and frame). */
function nulPath(value: unknown): (string | number)[] | undefined {
  if (typeof value === 'string') return value.includes('\u0000') ? [] : undefined
  if (typeof value !== 'object' || value === null) return undefined
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) {
      const item: unknown = value[i]
      if (typeof item !== 'object' && typeof item !== 'string') continue // numbers mostly: tensors
      const path = nulPath(item)
      if (path) return (path.unshift(i), path)
    }
    return undefined
  }
  for (const key in value) {
    if (!Object.hasOwn(value, key)) continue
    if (key.includes('\u0000')) return [JSON.stringify(key)]
    const item: unknown = (value as Record<string, unknown>)[key]
    if (typeof item !== 'object' && typeof item !== 'string') continue
    const path = nulPath(item)
    if (path) return (path.unshift(key), path)
  }
  return undefined
}

export const NUL_MESSAGE = 'must not contain the NUL character (\\u0000)'
