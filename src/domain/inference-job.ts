import { z } from 'zod'
import type { Decider } from './decider.js'
import { DomainError } from './errors.js'

/**
 * An inference job: one input (`single`, sync or async) or many (`batch`). Its inputs are split into tasks
 * (`task-<job>-<n>`, see task.ts), each a run of consecutive inputs one device takes at once (one input for
 * a single job). The job stream records the request and a cancellation; how far the job got comes from its
 * tasks' events (the inference_jobs read model joins them).
 */
const InferenceRequested = z.object({
  type: z.literal('InferenceRequested'),
  data: z.object({
    job_id: z.string(),
    customer_id: z.string(),
    project_id: z.string().nullable(),
    model_id: z.string(),
    kind: z.enum(['single', 'batch']),
    mode: z.enum(['sync', 'async']),
    name: z.string().nullable(),
    /** Its tasks in input order, with how many inputs each carries. */
    tasks: z.array(z.object({ task_id: z.string(), inputs: z.number().int().min(1) })).min(1),
    requested_at: z.string(),
  }),
})
const InferenceCancelled = z.object({ type: z.literal('InferenceCancelled'), data: z.object({ job_id: z.string(), customer_id: z.string(), cancelled_at: z.string() }) })
const InferenceEvent = z.discriminatedUnion('type', [InferenceRequested, InferenceCancelled])
export type InferenceEvent = z.infer<typeof InferenceEvent>
export type InferenceRequest = z.infer<typeof InferenceRequested>['data']
export const inferenceEventTypes = InferenceEvent.options.map((o) => o.shape.type.value)

export type InferenceCommand =
  | { type: 'RequestInference'; request: InferenceRequest }
  /** `finished`: every task of the job already ended (the caller read it from the tasks). */
  | { type: 'CancelInference'; customerId: string; finished: boolean; at: string }

export interface InferenceState {
  request: InferenceRequest | undefined
  cancelled: boolean
}

export const inferenceStream = (jobId: string) => `inference-${jobId}`
export const inferenceTaskId = (jobId: string, index: number) => `${jobId}-${index}`

export const inferenceDecider: Decider<InferenceCommand, InferenceEvent, InferenceState> = {
  initialState: () => ({ request: undefined, cancelled: false }),

  evolve(state, event) {
    switch (event.type) {
      case 'InferenceRequested':
        return { request: event.data, cancelled: false }
      case 'InferenceCancelled':
        return { ...state, cancelled: true }
    }
  },

  decide(command, state) {
    switch (command.type) {
      case 'RequestInference':
        if (state.request) throw new DomainError('CONFLICT', `job ${command.request.job_id} already exists`)
        return [{ type: 'InferenceRequested', data: command.request }]
      case 'CancelInference': {
        const request = state.request
        if (!request || request.customer_id !== command.customerId) throw new DomainError('NOT_FOUND', 'inference job not found')
        if (state.cancelled) return []
        if (command.finished) throw new DomainError('CANNOT_CANCEL', `job ${request.job_id} has already finished`)
        return [{ type: 'InferenceCancelled', data: { job_id: request.job_id, customer_id: request.customer_id, cancelled_at: command.at } }]
      }
      default: {
        const unknown: never = command
        throw new Error(`unknown command ${JSON.stringify(unknown)}`)
      }
    }
  },

  parse: ({ type, data }) => InferenceEvent.parse({ type, data: upcast(type, data) }),
}

/** Jobs requested before tasks carried several inputs listed `task_ids`, one input each. */
function upcast(type: string, data: unknown): unknown {
  if (type !== 'InferenceRequested' || typeof data !== 'object' || data === null) return data
  const old = data as Record<string, unknown>
  if (old.tasks !== undefined || !Array.isArray(old.task_ids)) return data
  const { task_ids, ...rest } = old
  return { ...rest, tasks: (task_ids as string[]).map((task_id) => ({ task_id, inputs: 1 })) }
}
