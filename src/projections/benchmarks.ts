import type { Kysely } from 'kysely'
import { type BENCHMARK_MODES, benchmarkDecider, benchmarkEventTypes, type PerfStep } from '../domain/benchmark.js'
import { liveSchema, type Projection } from './projection.js'

/** Benchmark runs from the dashboard: their settings, status, each perf step as it ends, and the result. */
export const benchmarksProjection: Projection = {
  name: 'benchmarks',
  version: 1,
  filter: { types: benchmarkEventTypes },
  tables: [{ name: 'benchmarks', primaryKey: ['benchmark_id'] }],

  async createTables(db) {
    await db.schema
      .createTable('benchmarks')
      .addColumn('benchmark_id', 'text', (c) => c.primaryKey())
      .addColumn('customer_id', 'text', (c) => c.notNull())
      .addColumn('mode', 'text', (c) => c.notNull())
      .addColumn('config', 'jsonb', (c) => c.notNull())
      .addColumn('project_id', 'text', (c) => c.notNull())
      .addColumn('status', 'text', (c) => c.notNull())
      .addColumn('steps', 'jsonb', (c) => c.notNull())
      .addColumn('result', 'jsonb')
      .addColumn('error', 'text')
      .addColumn('started_at', 'text', (c) => c.notNull())
      .addColumn('ended_at', 'text')
      .execute()
  },

  async apply(trx, events) {
    for (const recorded of events) {
      const event = benchmarkDecider.parse({ type: recorded.type, data: recorded.data, schemaVersion: recorded.metadata.schemaVersion ?? 1 })
      const id = event.data.benchmark_id
      switch (event.type) {
        case 'BenchmarkStarted': {
          const d = event.data
          await trx
            .insertInto('benchmarks')
            .values({ ...d, config: JSON.stringify(d.config), status: 'running', steps: JSON.stringify([]), result: null, error: null, ended_at: null })
            .onConflict((oc) => oc.doNothing())
            .execute()
          break
        }
        case 'BenchmarkStepCompleted': {
          const row = await trx.selectFrom('benchmarks').select('steps').where('benchmark_id', '=', id).executeTakeFirst()
          const steps = (row?.steps ?? []) as PerfStep[]
          if (!row || steps.some((s) => s.index === event.data.step.index)) break // delivered twice
          await trx.updateTable('benchmarks').set({ steps: JSON.stringify([...steps, event.data.step]) }).where('benchmark_id', '=', id).execute()
          break
        }
        case 'BenchmarkCompleted':
          await trx.updateTable('benchmarks').set({ status: 'completed', result: JSON.stringify(event.data.result), ended_at: event.data.completed_at }).where('benchmark_id', '=', id).execute()
          break
        case 'BenchmarkFailed':
          await trx.updateTable('benchmarks').set({ status: 'failed', error: event.data.error, ended_at: event.data.failed_at }).where('benchmark_id', '=', id).execute()
          break
      }
    }
  },
}

const schema = liveSchema(benchmarksProjection.name)

export interface BenchmarkRow {
  benchmark_id: string
  customer_id: string
  mode: (typeof BENCHMARK_MODES)[number]
  config: Record<string, unknown>
  project_id: string
  status: 'running' | 'completed' | 'failed'
  steps: PerfStep[]
  result: Record<string, unknown> | null
  error: string | null
  started_at: string
  ended_at: string | null
}

/** Benchmarks not ended (after a restart: cut short). */
export async function runningBenchmarks(db: Kysely<any>): Promise<{ benchmark_id: string; customer_id: string }[]> {
  return db.withSchema(schema).selectFrom('benchmarks').select(['benchmark_id', 'customer_id']).where('status', '=', 'running').execute()
}

export async function findBenchmark(db: Kysely<any>, customerId: string, benchmarkId: string): Promise<BenchmarkRow | undefined> {
  return (await db.withSchema(schema).selectFrom('benchmarks').selectAll().where('benchmark_id', '=', benchmarkId).where('customer_id', '=', customerId).executeTakeFirst()) as BenchmarkRow | undefined
}
