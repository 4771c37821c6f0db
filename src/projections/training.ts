import { type Kysely, sql } from 'kysely'
import { type TrainingEvent, type TrainingPhase, trainingDecider, trainingEventTypes, type TrainingSpec, trainingStatus } from '../domain/training-job.js'
import type { RecordedEvent } from '../event-store/port.js'
import { liveSchema, type Projection } from './projection.js'

/**
 * Training jobs as `GET /training/:jobId` shows them (`training_jobs`), and every aggregated round
 * (`training_rounds`: loss, accuracy, samples, devices, wall time, energy) for the curves and the
 * efficiency figures. A batch is folded in memory per job and written with one statement per table.
 */
export const trainingProjection: Projection = {
  name: 'training',
  version: 3,
  filter: { types: trainingEventTypes },
  tables: [
    { name: 'training_jobs', primaryKey: ['job_id'] },
    { name: 'training_rounds', primaryKey: ['job_id', 'round'] },
  ],

  async createTables(db) {
    await db.schema
      .createTable('training_jobs')
      .addColumn('job_id', 'text', (c) => c.primaryKey())
      .addColumn('customer_id', 'text', (c) => c.notNull())
      .addColumn('model_id', 'text', (c) => c.notNull())
      .addColumn('spec', 'jsonb', (c) => c.notNull())
      .addColumn('phase', 'text', (c) => c.notNull())
      .addColumn('devices', 'jsonb', (c) => c.notNull())
      .addColumn('round', 'integer', (c) => c.notNull())
      .addColumn('batches_completed', 'bigint', (c) => c.notNull())
      .addColumn('samples', 'bigint', (c) => c.notNull())
      .addColumn('current_loss', 'double precision')
      .addColumn('best_loss', 'double precision')
      .addColumn('accuracy', 'double precision')
      .addColumn('best_accuracy', 'double precision')
      .addColumn('trained_model_id', 'text')
      .addColumn('end_reason', 'text')
      .addColumn('error', 'text')
      .addColumn('refused_updates', 'integer', (c) => c.notNull())
      .addColumn('submitted_at', 'text', (c) => c.notNull())
      .addColumn('started_at', 'text')
      .addColumn('finished_at', 'text')
      .addColumn('updated_at', 'text', (c) => c.notNull())
      .execute()
    await db.schema.createIndex('training_jobs_by_customer').on('training_jobs').columns(['customer_id', 'submitted_at']).execute()
    await db.schema.createIndex('training_jobs_by_phase').on('training_jobs').columns(['phase']).execute()
    await db.schema
      .createTable('training_rounds')
      .addColumn('job_id', 'text', (c) => c.notNull())
      .addColumn('round', 'integer', (c) => c.notNull())
      .addColumn('loss', 'double precision', (c) => c.notNull())
      .addColumn('validation_loss', 'double precision', (c) => c.notNull())
      .addColumn('accuracy', 'double precision', (c) => c.notNull())
      .addColumn('samples', 'bigint', (c) => c.notNull())
      .addColumn('devices', 'integer', (c) => c.notNull())
      .addColumn('wall_ms', 'double precision', (c) => c.notNull())
      .addColumn('energy_joules', 'double precision', (c) => c.notNull())
      .addColumn('contributions', 'jsonb', (c) => c.notNull())
      .addColumn('at', 'text', (c) => c.notNull())
      .addPrimaryKeyConstraint('training_rounds_pk', ['job_id', 'round'])
      .execute()
  },

  async apply(trx, events) {
    const parsed = events.map(parse)
    const ids = [...new Set(parsed.map((e) => e.data.job_id))]
    const existing = await trx.selectFrom('training_jobs').selectAll().where('job_id', 'in', ids.length ? ids : ['']).execute()
    const rows = new Map<string, JobRow>(existing.map((r) => [r.job_id as string, fromRow(r)]))
    const rounds: Record<string, unknown>[] = []
    for (const event of parsed) {
      const round = fold(rows, event)
      if (round) rounds.push(round)
    }
    const changed = ids.map((id) => rows.get(id)).filter((r): r is JobRow => r !== undefined)
    if (changed.length > 0) {
      await trx
        .insertInto('training_jobs')
        .values(changed.map(toRow))
        .onConflict((oc) => oc.column('job_id').doUpdateSet((eb) => Object.fromEntries(JOB_COLUMNS.map((c) => [c, eb.ref(`excluded.${c}`)]))))
        .execute()
    }
    if (rounds.length > 0) await trx.insertInto('training_rounds').values(rounds).onConflict((oc) => oc.doNothing()).execute()
  },
}

const JOB_COLUMNS = [
  'customer_id', 'model_id', 'spec', 'phase', 'devices', 'round', 'batches_completed', 'samples', 'current_loss', 'best_loss',
  'accuracy', 'best_accuracy', 'trained_model_id', 'end_reason', 'error', 'refused_updates', 'submitted_at', 'started_at', 'finished_at', 'updated_at',
] as const

export interface JobRow {
  job_id: string
  customer_id: string
  model_id: string
  spec: TrainingSpec
  phase: TrainingPhase
  devices: string[]
  round: number
  batches_completed: number
  samples: number
  current_loss: number | null
  best_loss: number | null
  accuracy: number | null
  best_accuracy: number | null
  trained_model_id: string | null
  /** Why a completed job ended. */
  end_reason: 'target_accuracy' | 'epochs' | null
  error: string | null
  /** Updates the coordinator refused (TrainingUpdateRefused). */
  refused_updates: number
  submitted_at: string
  started_at: string | null
  finished_at: string | null
  updated_at: string
}

function parse(recorded: RecordedEvent): TrainingEvent {
  return trainingDecider.parse({ type: recorded.type, data: recorded.data, schemaVersion: recorded.metadata.schemaVersion ?? 1 })
}

/** Folds one event into its job's row; a round event also gives its `training_rounds` row. */
function fold(rows: Map<string, JobRow>, event: TrainingEvent): Record<string, unknown> | undefined {
  if (event.type === 'TrainingSubmitted') {
    const spec = event.data
    if (!rows.has(spec.job_id)) rows.set(spec.job_id, newRow(spec))
    return undefined
  }
  const row = rows.get(event.data.job_id)
  if (!row) return undefined
  switch (event.type) {
    case 'TrainingDevicesAssigned':
      row.devices = [...row.devices, ...event.data.devices.map((d) => d.device_id).filter((id) => !row.devices.includes(id))]
      row.started_at ??= event.data.at
      row.updated_at = event.data.at
      return undefined
    case 'TrainingDevicesReleased':
      row.devices = row.devices.filter((id) => !event.data.device_ids.includes(id))
      row.updated_at = event.data.at
      return undefined
    case 'TrainingRoundCompleted': {
      const r = event.data
      if (r.round <= row.round) return undefined // delivered twice
      Object.assign(row, {
        round: r.round,
        batches_completed: r.batches_completed,
        samples: row.samples + r.samples,
        current_loss: r.loss,
        best_loss: row.best_loss === null ? r.loss : Math.min(row.best_loss, r.loss),
        accuracy: r.accuracy,
        best_accuracy: row.best_accuracy === null ? r.accuracy : Math.max(row.best_accuracy, r.accuracy),
        updated_at: r.at,
      })
      // the device's power draw over the time it trained (its compute time when it did not report the wall time)
      const energy = r.contributions.reduce((sum, c) => sum + (c.power_watts * (c.wall_ms > 0 ? c.wall_ms : c.cpu_ms + c.gpu_ms)) / 1000, 0)
      return {
        job_id: r.job_id,
        round: r.round,
        loss: r.loss,
        validation_loss: r.validation_loss,
        accuracy: r.accuracy,
        samples: r.samples,
        devices: new Set(r.contributions.map((c) => c.device_id)).size,
        wall_ms: r.wall_ms,
        energy_joules: energy,
        contributions: JSON.stringify(r.contributions),
        at: r.at,
      }
    }
    case 'TrainingPaused':
      Object.assign(row, { phase: 'paused', updated_at: event.data.at })
      return undefined
    case 'TrainingResumed':
      Object.assign(row, { phase: 'active', updated_at: event.data.at })
      return undefined
    case 'TrainingCancelled':
      Object.assign(row, { phase: 'cancelled', devices: [], finished_at: event.data.at, updated_at: event.data.at })
      return undefined
    case 'TrainingCompleted':
      Object.assign(row, { phase: 'completed', devices: [], trained_model_id: event.data.trained_model_id, end_reason: event.data.reason, finished_at: event.data.at, updated_at: event.data.at })
      return undefined
    case 'TrainingFailed':
      Object.assign(row, { phase: 'failed', devices: [], error: event.data.error, finished_at: event.data.at, updated_at: event.data.at })
      return undefined
    case 'TrainingUpdateRefused':
      Object.assign(row, { refused_updates: row.refused_updates + 1, updated_at: event.data.at })
      return undefined
  }
}

function newRow(spec: TrainingSpec): JobRow {
  return {
    job_id: spec.job_id,
    customer_id: spec.customer_id,
    model_id: spec.model_id,
    spec,
    phase: 'active',
    devices: [],
    round: 0,
    batches_completed: 0,
    samples: 0,
    current_loss: null,
    best_loss: null,
    accuracy: null,
    best_accuracy: null,
    trained_model_id: null,
    end_reason: null,
    error: null,
    refused_updates: 0,
    submitted_at: spec.submitted_at,
    started_at: null,
    finished_at: null,
    updated_at: spec.submitted_at,
  }
}

function toRow(row: JobRow): Record<string, unknown> {
  return { ...row, spec: JSON.stringify(row.spec), devices: JSON.stringify(row.devices) }
}

function fromRow(row: Record<string, unknown>): JobRow {
  return { ...(row as unknown as JobRow), batches_completed: Number(row.batches_completed), samples: Number(row.samples) }
}

const schema = liveSchema(trainingProjection.name)

/** The job as its customer sees it (another customer's is not found). */
export async function findTrainingJob(db: Kysely<any>, customerId: string, jobId: string): Promise<JobRow | undefined> {
  const row = await db.withSchema(schema).selectFrom('training_jobs').selectAll().where('job_id', '=', jobId).where('customer_id', '=', customerId).executeTakeFirst()
  return row ? fromRow(row) : undefined
}

/** The customer's jobs, newest first, a page at a time. */
export async function listTrainingJobs(db: Kysely<any>, customerId: string, page: { limit: number; offset: number; status?: string }) {
  let base = db.withSchema(schema).selectFrom('training_jobs').where('customer_id', '=', customerId)
  if (page.status) base = withStatus(base, page.status)
  const [rows, total] = await Promise.all([
    base.selectAll().orderBy('submitted_at', 'desc').orderBy('job_id').limit(page.limit).offset(page.offset).execute(),
    base.select(sql<string>`count(*)`.as('n')).executeTakeFirst(),
  ])
  return { jobs: rows.map(fromRow), total: Number(total?.n ?? 0) }
}

function withStatus<QB extends { where: (...args: any[]) => QB }>(base: QB, status: string): QB {
  if (status === 'queued') return base.where('phase', '=', 'active').where(sql`jsonb_array_length(devices)`, '=', 0)
  if (status === 'running') return base.where('phase', '=', 'active').where(sql`jsonb_array_length(devices)`, '>', 0)
  return base.where('phase', '=', status)
}

/** Jobs not finished (queued, running or paused): what the coordinator resumes after a restart. */
export async function unfinishedTrainingJobs(db: Kysely<any>): Promise<JobRow[]> {
  const rows = await db.withSchema(schema).selectFrom('training_jobs').selectAll().where('phase', 'in', ['active', 'paused']).orderBy('submitted_at').orderBy('job_id').execute()
  return rows.map(fromRow)
}

/** The job's rounds in order (for its loss and accuracy curves). */
export async function trainingRounds(db: Kysely<any>, jobId: string, page: { limit: number; offset: number }) {
  return db.withSchema(schema).selectFrom('training_rounds').selectAll().where('job_id', '=', jobId).orderBy('round').limit(page.limit).offset(page.offset).execute()
}

export const statusOfRow = (row: JobRow) => trainingStatus(row.phase, row.devices.length)
