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
  const found = unfitJson(value, root, Infinity)
  return found?.problem === 'nul' ? found.field : undefined
}

/**
 * The deepest nesting of arrays and objects taken from outside (an HTTP body). JSON.parse reads any depth,
 * but JSON.stringify (every event appended) and recursive checks overflow the stack some thousands of levels
 * down; no dcp input needs more than a few levels.
 */
export const MAX_JSON_DEPTH = 64

export interface UnfitJson {
  /** `nul`: `field` holds U+0000; `depth`: the value nests deeper than the limit at `field`. */
  problem: 'nul' | 'depth'
  field: string
}

interface Visit {
  value: object
  depth: number
  parent: Visit | undefined
  key: string | number
}

/**
 * A place the value holds U+0000 or nests more than `maxDepth` arrays and objects deep (the value itself is
 * depth 1). Iterative (an explicit stack), so no input can overflow the call stack; the path is built only
 * when there is a finding (this runs on every request and frame).
 */
export function unfitJson(value: unknown, root: string, maxDepth = MAX_JSON_DEPTH): UnfitJson | undefined {
  if (typeof value === 'string') return value.includes('\u0000') ? { problem: 'nul', field: root } : undefined
  if (typeof value !== 'object' || value === null) return undefined
  const stack: Visit[] = [{ value, depth: 1, parent: undefined, key: root }]
  const found = (problem: UnfitJson['problem'], at: Visit, key?: string | number): UnfitJson => {
    const path: (string | number)[] = key === undefined ? [] : [key]
    for (let v: Visit | undefined = at; v; v = v.parent) path.unshift(v.key)
    return { problem, field: path.join('.') }
  }
  while (stack.length > 0) {
    const visit = stack.pop()!
    if (visit.depth > maxDepth) return found('depth', visit)
    const node = visit.value
    if (Array.isArray(node)) {
      for (let i = 0; i < node.length; i++) {
        const item: unknown = node[i]
        if (typeof item === 'string') {
          if (item.includes('\u0000')) return found('nul', visit, i)
        } else if (typeof item === 'object' && item !== null) stack.push({ value: item, depth: visit.depth + 1, parent: visit, key: i })
      }
      continue
    }
    for (const key of Object.keys(node)) {
      if (key.includes('\u0000')) return found('nul', visit, JSON.stringify(key))
      const item: unknown = (node as Record<string, unknown>)[key]
      if (typeof item === 'string') {
        if (item.includes('\u0000')) return found('nul', visit, key)
      } else if (typeof item === 'object' && item !== null) stack.push({ value: item, depth: visit.depth + 1, parent: visit, key })
    }
  }
  return undefined
}

export const NUL_MESSAGE = 'must not contain the NUL character (\\u0000)'
