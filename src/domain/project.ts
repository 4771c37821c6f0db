import { z } from 'zod'
import type { Decider } from './decider.js'
import { DomainError } from './errors.js'
import { VALIDATION_MODES } from './validation.js'

/**
 * A project groups a customer's jobs for tracking and analytics. It is active until it is completed (by
 * hand, for a realtime project, or when its expected tasks have all finished: see the projects read model)
 * or cancelled (its jobs are cancelled with it). Only an active project takes new work.
 */
export const PROJECT_TYPES = ['realtime', 'batch', 'training', 'benchmark'] as const

const ProjectCreated = z.object({
  type: z.literal('ProjectCreated'),
  data: z.object({
    project_id: z.string(),
    customer_id: z.string(),
    name: z.string(),
    project_type: z.enum(PROJECT_TYPES),
    model_id: z.string().nullable(),
    /** Tasks the customer expects (for progress), when given. */
    total_tasks: z.number().int().nullable(),
    /** How its inference results are checked unless a request says (src/domain/validation.ts); null: the model's. */
    validation: z.enum(VALIDATION_MODES).nullable().default(null),
    created_at: z.string(),
  }),
})
const ProjectCompleted = z.object({ type: z.literal('ProjectCompleted'), data: z.object({ project_id: z.string(), customer_id: z.string(), completed_at: z.string() }) })
const ProjectCancelled = z.object({ type: z.literal('ProjectCancelled'), data: z.object({ project_id: z.string(), customer_id: z.string(), cancelled_at: z.string() }) })

const ProjectEvent = z.discriminatedUnion('type', [ProjectCreated, ProjectCompleted, ProjectCancelled])
export type ProjectEvent = z.infer<typeof ProjectEvent>
export type NewProject = z.infer<typeof ProjectCreated>['data']
export const projectEventTypes = ProjectEvent.options.map((o) => o.shape.type.value)

export type ProjectCommand =
  | { type: 'CreateProject'; project: NewProject }
  | { type: 'CompleteProject'; customerId: string; at: string }
  | { type: 'CancelProject'; customerId: string; at: string }

export type ProjectStatus = 'new' | 'active' | 'completed' | 'cancelled'

export interface ProjectState {
  status: ProjectStatus
  project: NewProject | undefined
}

export const projectStream = (projectId: string) => `project-${projectId}`

export const projectDecider: Decider<ProjectCommand, ProjectEvent, ProjectState> = {
  initialState: () => ({ status: 'new', project: undefined }),

  evolve(state, event) {
    switch (event.type) {
      case 'ProjectCreated':
        return { status: 'active', project: event.data }
      case 'ProjectCompleted':
        return { ...state, status: 'completed' }
      case 'ProjectCancelled':
        return { ...state, status: 'cancelled' }
    }
  },

  decide(command, state) {
    switch (command.type) {
      case 'CreateProject':
        if (state.project) throw new DomainError('CONFLICT', `project ${command.project.project_id} already exists`)
        return [{ type: 'ProjectCreated', data: command.project }]
      case 'CompleteProject': {
        const project = owned(state, command.customerId)
        if (state.status === 'completed') return []
        if (state.status === 'cancelled') throw new DomainError('CONFLICT', `project ${project.project_id} was cancelled; it cannot be completed`)
        return [{ type: 'ProjectCompleted', data: { project_id: project.project_id, customer_id: project.customer_id, completed_at: command.at } }]
      }
      case 'CancelProject': {
        const project = owned(state, command.customerId)
        if (state.status === 'cancelled') return []
        if (state.status === 'completed') throw new DomainError('CANNOT_CANCEL', `project ${project.project_id} is already completed`)
        return [{ type: 'ProjectCancelled', data: { project_id: project.project_id, customer_id: project.customer_id, cancelled_at: command.at } }]
      }
      default: {
        const unknown: never = command
        throw new Error(`unknown command ${JSON.stringify(unknown)}`)
      }
    }
  },

  parse: ({ type, data }) => ProjectEvent.parse({ type, data }),
}

function owned(state: ProjectState, customerId: string): NewProject {
  if (!state.project || state.project.customer_id !== customerId) throw new DomainError('NOT_FOUND', 'project not found')
  return state.project
}
