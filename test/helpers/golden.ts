/** One event as a golden fixture stores it: its stream, revision and id, and its data and metadata as written. */
export interface GoldenEvent {
  stream_id: string
  revision: number
  event_id: string
  type: string
  data: Record<string, unknown>
  metadata: Record<string, unknown> & { schemaVersion?: number }
}
