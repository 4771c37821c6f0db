import { z } from 'zod'
import type { Decider } from './decider.js'
import { DomainError } from './errors.js'

/**
 * A benchmark run from the dashboard (stream `benchmark-<id>`): a quick one (`inference`, `training`,
 * `gpu-training`) or a step-load `perf` run whose every step is recorded as it ends. Runs are events like
 * everything else, so their results survive a restart and can be audited.
 */
export const BENCHMARK_MODES = ['inference', 'training', 'gpu-training', 'perf'] as const

export const PerfStep = z.object({
  index: z.number().int(),
  target_rps: z.number(),
  achieved_rps: z.number(),
  requests: z.number().int(),
  completed: z.number().int(),
  errors: z.number().int(),
  /** Requests not sent because max_concurrency were already in flight. */
  skipped: z.number().int(),
  latency_ms: z.object({ p50: z.number().nullable(), p90: z.number().nullable(), p95: z.number().nullable(), p99: z.number().nullable(), mean: z.number().nullable() }),
  started_at: z.string(),
  ended_at: z.string(),
})
export type PerfStep = z.infer<typeof PerfStep>

const BenchmarkStarted = z.object({
  type: z.literal('BenchmarkStarted'),
  data: z.object({
    benchmark_id: z.string(),
    customer_id: z.string(),
    mode: z.enum(BENCHMARK_MODES),
    config: z.record(z.string(), z.unknown()),
    project_id: z.string(),
    started_at: z.string(),
  }),
})
const BenchmarkStepCompleted = z.object({ type: z.literal('BenchmarkStepCompleted'), data: z.object({ benchmark_id: z.string(), step: PerfStep }) })
const BenchmarkCompleted = z.object({ type: z.literal('BenchmarkCompleted'), data: z.object({ benchmark_id: z.string(), result: z.record(z.string(), z.unknown()), completed_at: z.string() }) })
const BenchmarkFailed = z.object({ type: z.literal('BenchmarkFailed'), data: z.object({ benchmark_id: z.string(), error: z.string(), failed_at: z.string() }) })
const BenchmarkEvent = z.discriminatedUnion('type', [BenchmarkStarted, BenchmarkStepCompleted, BenchmarkCompleted, BenchmarkFailed])
export type BenchmarkEvent = z.infer<typeof BenchmarkEvent>
export const benchmarkEventTypes = BenchmarkEvent.options.map((o) => o.shape.type.value)
export type BenchmarkStartedData = z.infer<typeof BenchmarkStarted>['data']

export type BenchmarkCommand =
  | { type: 'StartBenchmark'; benchmark: BenchmarkStartedData }
  | { type: 'RecordStep'; step: PerfStep }
  | { type: 'CompleteBenchmark'; result: Record<string, unknown>; at: string }
  | { type: 'FailBenchmark'; error: string; at: string }

export interface BenchmarkState {
  benchmarkId: string | undefined
  status: 'none' | 'running' | 'completed' | 'failed'
  steps: number
}

export const benchmarkStream = (benchmarkId: string) => `benchmark-${benchmarkId}`

export const benchmarkDecider: Decider<BenchmarkCommand, BenchmarkEvent, BenchmarkState> = {
  initialState: () => ({ benchmarkId: undefined, status: 'none', steps: 0 }),

  evolve(state, event) {
    switch (event.type) {
      case 'BenchmarkStarted':
        return { benchmarkId: event.data.benchmark_id, status: 'running', steps: 0 }
      case 'BenchmarkStepCompleted':
        return { ...state, steps: state.steps + 1 }
      case 'BenchmarkCompleted':
        return { ...state, status: 'completed' }
      case 'BenchmarkFailed':
        return { ...state, status: 'failed' }
    }
  },

  decide(command, state) {
    if (command.type === 'StartBenchmark') {
      if (state.status !== 'none') throw new DomainError('CONFLICT', `benchmark ${command.benchmark.benchmark_id} already exists`)
      return [{ type: 'BenchmarkStarted', data: command.benchmark }]
    }
    if (state.status !== 'running') throw new DomainError('CONFLICT', `benchmark ${state.benchmarkId ?? ''} is ${state.status}`)
    const id = state.benchmarkId!
    switch (command.type) {
      case 'RecordStep':
        return [{ type: 'BenchmarkStepCompleted', data: { benchmark_id: id, step: command.step } }]
      case 'CompleteBenchmark':
        return [{ type: 'BenchmarkCompleted', data: { benchmark_id: id, result: command.result, completed_at: command.at } }]
      case 'FailBenchmark':
        return [{ type: 'BenchmarkFailed', data: { benchmark_id: id, error: command.error, failed_at: command.at } }]
      default: {
        const unknown: never = command
        throw new Error(`unknown command ${JSON.stringify(unknown)}`)
      }
    }
  },

  parse: ({ type, data }) => BenchmarkEvent.parse({ type, data }),
}
