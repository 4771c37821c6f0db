import { z } from 'zod'
import type { Decider } from './decider.js'
import { DomainError } from './errors.js'

/**
 * A training dataset a customer uploaded (stream `dataset-<id>`): CSV or JSON lines of features and a
 * label, stored as a blob, checked and described once at upload.
 */
export const DatasetDescription = z.object({
  dataset_id: z.string(),
  customer_id: z.string(),
  name: z.string(),
  format: z.enum(['csv', 'jsonl']),
  size: z.number().int(),
  checksum: z.string(),
  rows: z.number().int(),
  /** Features per row. */
  features: z.number().int(),
  /** `class`: labels are class indices (0..classes-1); `value`: a number to regress. */
  label_kind: z.enum(['class', 'value']),
  /** Highest class index + 1 (0 for values). */
  classes: z.number().int(),
  uploaded_at: z.string(),
})
export type DatasetDescription = z.infer<typeof DatasetDescription>

const DatasetUploaded = z.object({ type: z.literal('DatasetUploaded'), data: DatasetDescription })
const DatasetDeleted = z.object({ type: z.literal('DatasetDeleted'), data: z.object({ dataset_id: z.string(), customer_id: z.string(), deleted_at: z.string() }) })
const DatasetEvent = z.discriminatedUnion('type', [DatasetUploaded, DatasetDeleted])
export type DatasetEvent = z.infer<typeof DatasetEvent>
export const datasetEventTypes = DatasetEvent.options.map((o) => o.shape.type.value)

export type DatasetCommand = { type: 'UploadDataset'; dataset: DatasetDescription } | { type: 'DeleteDataset'; customerId: string; at: string }

export interface DatasetState {
  dataset: DatasetDescription | undefined
  deleted: boolean
}

export const datasetStream = (datasetId: string) => `dataset-${datasetId}`

export const datasetDecider: Decider<DatasetCommand, DatasetEvent, DatasetState> = {
  initialState: () => ({ dataset: undefined, deleted: false }),

  evolve(state, event) {
    switch (event.type) {
      case 'DatasetUploaded':
        return { dataset: event.data, deleted: false }
      case 'DatasetDeleted':
        return { ...state, deleted: true }
    }
  },

  decide(command, state) {
    switch (command.type) {
      case 'UploadDataset':
        if (state.dataset) throw new DomainError('CONFLICT', `dataset ${command.dataset.dataset_id} already exists`)
        return [{ type: 'DatasetUploaded', data: command.dataset }]
      case 'DeleteDataset':
        if (!state.dataset || state.deleted || state.dataset.customer_id !== command.customerId) throw new DomainError('NOT_FOUND', 'dataset not found')
        return [{ type: 'DatasetDeleted', data: { dataset_id: state.dataset.dataset_id, customer_id: command.customerId, deleted_at: command.at } }]
      default: {
        const unknown: never = command
        throw new Error(`unknown command ${JSON.stringify(unknown)}`)
      }
    }
  },

  parse: ({ type, data }) => DatasetEvent.parse({ type, data }),
}
