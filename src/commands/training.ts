import { createHash } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { Readable } from 'node:stream'
import type { Kysely } from 'kysely'
import type { BlobStore } from '../blobs/blob-store.js'
import { DomainError } from '../domain/errors.js'
import { aggregate, mixRobust } from '../domain/aggregation.js'
import { decodeWeights, encodeWeights, roundReady, weightsToBase64 } from '../domain/fedavg.js'
import { type ModelDescription, modelDecider, modelStream } from '../domain/model.js'
import { type AllocDevice, allocateDevices, isEligible } from '../domain/training-allocation.js'
import { type Contribution, isFinished, modelFormatOf, type RoundData, robustnessOf, type TrainingCommand, trainingDecider, type TrainingSpec, type TrainingState, trainingStream } from '../domain/training-job.js'
import type { EventStore, Position } from '../event-store/port.js'
import { type HubFrame, minUpdateIntervalMs, type PLATFORMS, type TrainData, type TrainStart, type TrainUpdate } from '../protocol/frames.js'
import { unfinishedTrainingJobs } from '../projections/training.js'
import { handleCommand, type KnownState } from './handle-command.js'
import { TorchTool, TorchToolError } from './torch-tool.js'
import { loadValidation, type ModelFormat, type Validation, type Weights } from './training-validation.js'

/** A connected device that can train, as the hub describes it. */
export interface TrainingDevice {
  deviceId: string
  platform: (typeof PLATFORMS)[number]
  sdkVersion: string
  gpu: boolean
  instanceType: 'aws' | 'user'
  sdkUuid: string
  /** Model formats it trains (registration's `train_formats`; onnx when it said none). */
  trainFormats: readonly ModelFormat[]
  send(frame: HubFrame): boolean
}

export interface TrainingOptions {
  store: EventStore
  db: Kysely<any>
  blobs: BlobStore
  /** Checks and exports TorchScript models (Node has no torch). Default: one run with `pythonRuntime()`; closed by `stop`. */
  torch?: TorchTool
  /** Marks a device as working for a job (the inference scheduler leaves it alone meanwhile). */
  onMembership?: (deviceId: string, jobId: string | undefined) => void
  /** How long a sync round waits for its devices before going on with those that answered. Default 30 s. */
  roundDeadlineMs?: number
  /** Async mode: an update more rounds behind than this is dropped (and its device resynced). Default 20. */
  maxStaleness?: number
  /** Async mode: the weight of a fresh update in the mix, alpha / (1 + staleness). Default 0.9. */
  asyncAlpha?: number
  now?: () => Date
  log?: (message: string) => void
}

interface Member {
  deviceId: string
  instanceType: 'aws' | 'user'
  sdkUuid: string
  /** Leaves the job at its next round boundary (the scheduler gives it to another job). */
  draining: boolean
  /** Its sample stream's seed (stream jobs). */
  streamSeed: number
  /** Dataset jobs: its shard, `index` of `count` (see `reshard`). */
  shard: { index: number; count: number }
  /** Sync modes: the base round of its last update taken (a second update from a round is refused). */
  lastBaseRound: number | undefined
  /** Async: when its last update was taken (ms), for the rate limit. */
  lastUpdateAt: number | undefined
}

interface Pending {
  weights: Weights
  contribution: Contribution
}

/** A job the coordinator runs: its stream as last written, its current weights, its devices and its round. */
interface LiveJob {
  spec: TrainingSpec
  known: KnownState<TrainingState>
  weights: Weights
  /** The weights of the current round, encoded once for every device that needs them. */
  encoded: string | undefined
  members: Map<string, Member>
  /** Devices that reported they cannot train this job: not given it again. */
  failed: Set<string>
  pending: Map<string, Pending>
  roundStartedAt: number
  deadline: NodeJS.Timeout | undefined
  validation: Validation
  model: ModelDescription
  /** Updates of a job are handled one at a time, in arrival order. */
  queue: Promise<void>
}

/**
 * Runs federated training: gives training devices to jobs (src/domain/training-allocation.ts), sends
 * them the model and weights, averages what they send back (src/domain/fedavg.ts) round by round, checks
 * every round on the job's validation set, checkpoints it (weights in the blob store, an event), stops at
 * the target accuracy or after the epochs, and registers the trained model. After a restart it resumes
 * every unfinished job from its last round.
 */
export class TrainingCoordinator {
  private readonly jobs = new Map<string, LiveJob>()
  private readonly devices = new Map<string, TrainingDevice>()
  /** The job each busy device works for. */
  private readonly membership = new Map<string, string>()
  private balancing: Promise<void> = Promise.resolve()
  private rebalanceAgain = false
  private stopped = false
  /** Work under way (each job's queue of it), awaited by `stop`. */
  private readonly working = new Set<Promise<unknown>>()
  private readonly now: () => Date
  /** What TorchScript jobs are checked with, at submission (src/http/training.ts) and every round. */
  readonly torch: TorchTool

  constructor(private readonly options: TrainingOptions) {
    this.now = options.now ?? (() => new Date())
    this.torch = options.torch ?? new TorchTool({ ...(options.log ? { log: options.log } : {}) })
  }

  /**
   * Loads every unfinished job (after a restart its devices are gone: they are released). A job whose last
   * round reached its goal (a crash came between that round and the job's completion) is completed now,
   * instead of training on past its goal.
   */
  async recover(): Promise<void> {
    for (const row of await unfinishedTrainingJobs(this.options.db)) {
      const job = await this.loadOrFail(row.job_id)
      if (!job) continue
      const state = job.known.state
      if (state.devices.length > 0) await this.command(job, { type: 'ReleaseDevices', deviceIds: state.devices, reason: 'server restarted', at: this.at() })
      const target = job.spec.training_config.target_accuracy
      const reached = state.phase !== 'active' ? undefined : target !== null && state.accuracy !== undefined && state.accuracy >= target ? 'target_accuracy' : state.batchesCompleted >= job.spec.total_batches ? 'epochs' : undefined
      if (reached) await this.serially(job, () => this.finish(job, reached))
    }
    this.rebalance()
  }

  /**
   * Starts nothing more (no round deadline, no rebalance) and resolves once the work already under way has
   * settled: a round being closed writes its weights to the blob store and its event before this returns, so
   * what is shut down after it (the store, the blob directory) is not pulled from under it.
   */
  async stop(): Promise<void> {
    this.stopped = true
    for (const job of this.jobs.values()) clearTimeout(job.deadline)
    while (this.working.size > 0) await Promise.allSettled([...this.working])
    this.torch.close()
  }

  /** Devices that could train for a job of this model format (default onnx) with these filters (for NO_TRAINING_DEVICES and `estimated_devices`). */
  eligibleDevices(resources: TrainingSpec['resource_config'], format: ModelFormat = 'onnx'): number {
    return [...this.devices.values()].filter((d) => eligible(d, resources, format)).length
  }

  /** Records a new job and starts it once it has its minimum of devices. */
  async submit(spec: TrainingSpec, options: { idempotencyKey?: string } = {}): Promise<Position> {
    const result = await handleCommand(this.options.store, trainingStream(spec.job_id), trainingDecider, { type: 'SubmitTraining', spec }, { ...options, metadata: this.metadata(spec.customer_id) })
    if (!this.jobs.has(spec.job_id) && !isFinished(result.state.phase)) await this.loadOrFail(spec.job_id)
    this.rebalance()
    return result.position
  }

  async pause(jobId: string, customerId: string): Promise<Position> {
    const position = await this.control(jobId, { type: 'PauseTraining', customerId, at: this.at() })
    this.leaveAll(jobId, 'paused')
    this.rebalance()
    return position
  }

  async resume(jobId: string, customerId: string): Promise<Position> {
    const position = await this.control(jobId, { type: 'ResumeTraining', customerId, at: this.at() })
    this.rebalance()
    return position
  }

  async cancel(jobId: string, customerId: string): Promise<Position> {
    const position = await this.control(jobId, { type: 'CancelTraining', customerId, at: this.at() })
    this.leaveAll(jobId, 'cancelled')
    this.forget(jobId)
    this.rebalance()
    return position
  }

  deviceConnected(device: TrainingDevice): void {
    this.devices.set(device.deviceId, device)
    this.rebalance()
  }

  /** A device that left: its job goes on without it (a sync round no longer waits for it). */
  async deviceLost(deviceId: string): Promise<void> {
    this.devices.delete(deviceId)
    const job = this.jobOf(deviceId)
    if (job) {
      this.leave(job, deviceId)
      this.reshard(job)
      await this.serially(job, async () => {
        await this.command(job, { type: 'ReleaseDevices', deviceIds: [deviceId], reason: 'device disconnected', at: this.at() })
        await this.maybeCloseRound(job, false)
      })
    }
    this.rebalance()
  }

  /** The job the device trains for, if any. */
  jobOfDevice(deviceId: string): string | undefined {
    return this.membership.get(deviceId)
  }

  /** May this device download the model (it trains a job on it)? */
  holdsModel(deviceId: string, modelId: string): boolean {
    return this.jobOf(deviceId)?.spec.model_id === modelId
  }

  holdsDataset(deviceId: string, datasetId: string): boolean {
    return this.jobOf(deviceId)?.spec.data_config.dataset_id === datasetId
  }

  /** A device's trained weights. */
  async update(deviceId: string, frame: TrainUpdate): Promise<void> {
    const job = this.jobs.get(frame.job_id)
    const member = job?.members.get(deviceId)
    if (!job || !member) {
      this.devices.get(deviceId)?.send({ type: 'train_stop', job_id: frame.job_id, reason: 'not assigned to this job' })
      return
    }
    await this.serially(job, async () => {
      await this.refuseIfAbusive(job, member, frame)
      return job.spec.training_config.sync_mode === 'async' ? this.mixIn(job, member, frame) : this.collect(job, member, frame)
    })
  }

  /**
   * One update per device per round (sync modes: a second one from the same or an earlier base round), and
   * in async mode one per `sync_interval_ms / 10` per device: more is refused, recorded (TrainingUpdateRefused)
   * and answered with an `error` frame (the DomainError, through the hub).
   */
  private async refuseIfAbusive(job: LiveJob, member: Member, frame: TrainUpdate): Promise<void> {
    const config = job.spec.training_config
    const refuse = async (reason: 'duplicate_round' | 'too_frequent', message: string) => {
      await this.command(job, { type: 'RefuseUpdate', deviceId: member.deviceId, baseRound: frame.base_round, reason, message, at: this.at() })
      throw new DomainError('UPDATE_REFUSED', message)
    }
    if (config.sync_mode !== 'async') {
      if (member.lastBaseRound !== undefined && frame.base_round <= member.lastBaseRound) {
        await refuse('duplicate_round', `update refused: this device already sent an update from round ${member.lastBaseRound}; one update per round`)
      }
      return
    }
    const interval = minUpdateIntervalMs(config.sync_interval_ms)
    const since = this.now().getTime() - (member.lastUpdateAt ?? -Infinity)
    if (since < interval) await refuse('too_frequent', `update refused: ${Math.round(since)} ms after this device's previous update; at most one per ${interval} ms (sync_interval_ms / 10)`)
    member.lastUpdateAt = this.now().getTime()
  }

  /** The device could not train for the job (its error): it leaves the job, which goes on without it. */
  async trainingFailed(deviceId: string, jobId: string, error: string): Promise<void> {
    const job = this.jobs.get(jobId)
    if (!job?.members.has(deviceId)) return
    this.options.log?.(`training ${jobId}: device ${deviceId} failed: ${error}`)
    await this.serially(job, async () => {
      if (!job.members.has(deviceId)) return
      job.failed.add(deviceId)
      await this.release(job, [deviceId], `training failed on the device: ${error.slice(0, 500)}`)
      await this.maybeCloseRound(job, false)
    })
  }

  /** A device pulls the job's current weights. */
  weightsRequest(deviceId: string, jobId: string): void {
    const job = this.jobs.get(jobId)
    if (job?.members.has(deviceId)) this.sendWeights(job, deviceId)
    else this.devices.get(deviceId)?.send({ type: 'train_stop', job_id: jobId, reason: 'not assigned to this job' })
  }

  // ---- rounds --------------------------------------------------------------------------------------------

  /**
   * Async: each update is mixed in as it comes, weighted down by how stale its starting weights were, and
   * its device gets the mixed weights back to train on from.
   */
  private async mixIn(job: LiveJob, member: Member, frame: TrainUpdate): Promise<void> {
    const staleness = Math.max(0, job.known.state.round - frame.base_round)
    const rule = robustnessOf(job.spec)
    const credited = contribution(job.spec, member, frame, staleness)
    const mixed = mixRobust(job.weights, weightsOf(job, frame), {
      samples: credited.samples,
      staleness,
      alpha: this.options.asyncAlpha ?? 0.9,
      maxStaleness: this.options.maxStaleness ?? 20,
      rule,
      recentNorms: job.known.state.recentNorms,
    })
    if (!mixed.applied) {
      this.options.log?.(`training ${job.spec.job_id}: dropped an update of ${member.deviceId} ${staleness} rounds stale`)
      this.sendWeights(job, member.deviceId)
      return
    }
    const decisions = { aggregation: rule.aggregation, clip_bound: mixed.clipBound, mix: mixed.mix }
    const finished = await this.commitRound(job, mixed.weights, [{ ...credited, delta_norm: mixed.norm, clipped: mixed.clipped }], decisions)
    if (finished) return
    if (member.draining) await this.release(job, [member.deviceId], 'moved to another job')
    // the weight sync: the device goes on from the mixed weights (and pulls them every sync_interval_ms besides)
    else this.sendWeights(job, member.deviceId)
  }

  /**
   * Sync modes: updates of the current round wait until every device (full) or a quorum (semi) sent one.
   * Semi sync also takes an update one round late into the next round, so a slower device's work counts;
   * full sync drops it (the device already has the new round's weights).
   */
  private async collect(job: LiveJob, member: Member, frame: TrainUpdate): Promise<void> {
    const lag = job.known.state.round - frame.base_round
    if (lag < 0 || lag > (job.spec.training_config.sync_mode === 'semi_sync' ? 1 : 0)) return
    const weights = weightsOf(job, frame)
    member.lastBaseRound = frame.base_round
    job.pending.set(member.deviceId, { weights, contribution: contribution(job.spec, member, frame, lag) })
    await this.maybeCloseRound(job, false)
  }

  private async maybeCloseRound(job: LiveJob, deadlinePassed: boolean): Promise<void> {
    const mode = job.spec.training_config.sync_mode
    if (mode === 'async' || !this.jobs.has(job.spec.job_id)) return
    if (job.pending.size === 0) {
      if (deadlinePassed) this.armDeadline(job) // nothing arrived yet: wait another deadline
      return
    }
    const expected = new Set([...job.members.keys(), ...job.pending.keys()]).size
    if (!roundReady(mode, { expected, received: job.pending.size, deadlinePassed })) return
    const updates = [...job.pending.values()]
    job.pending.clear()
    if (deadlinePassed && mode === 'full_sync') {
      // full sync: a device that missed the deadline is dropped from the job, the round goes on without it
      const late = [...job.members.keys()].filter((id) => !updates.some((u) => u.contribution.device_id === id))
      if (late.length > 0) await this.release(job, late, 'missed the round deadline')
    }
    const rule = robustnessOf(job.spec)
    const result = aggregate(job.weights, updates.map((u) => ({ weights: u.weights, samples: u.contribution.samples })), rule)
    const contributions = updates.map((u, i) => ({ ...u.contribution, delta_norm: result.norms[i]!, clipped: result.clipped[i]! }))
    const finished = await this.commitRound(job, result.weights, contributions, { aggregation: rule.aggregation, clip_bound: result.clipBound })
    if (finished) return
    const draining = [...job.members.values()].filter((m) => m.draining).map((m) => m.deviceId)
    if (draining.length > 0) await this.release(job, draining, 'moved to another job')
    for (const deviceId of job.members.keys()) this.sendWeights(job, deviceId)
  }

  /** Checks the new weights, checkpoints the round, and ends the job when it has reached its goal. True when it ended. */
  private async commitRound(job: LiveJob, weights: Weights, contributions: Contribution[], decisions: Pick<RoundData, 'aggregation' | 'clip_bound' | 'mix'>): Promise<boolean> {
    const spec = job.spec
    const state = job.known.state
    const steps = contributions.reduce((n, c) => n + c.steps, 0)
    const samples = contributions.reduce((n, c) => n + c.samples, 0)
    const batches = state.batchesCompleted + steps
    const checked = await job.validation.evaluate(weights)
    // Weights that diverged (finite, but huge) evaluate to a NaN or infinite loss, which JSON cannot carry
    // (it would be stored as null, and the event could not be read back): the job fails, saying why.
    if (!Number.isFinite(checked.loss) || !Number.isFinite(checked.accuracy)) {
      throw new Error(`training diverged: round ${state.round + 1}'s weights give a validation loss of ${checked.loss}; try a lower learning_rate`)
    }
    const sha256 = await this.keep(encodeWeights(weights))
    const at = this.now()
    const round = {
      job_id: spec.job_id,
      customer_id: spec.customer_id,
      round: state.round + 1,
      weights_sha256: sha256,
      loss: contributions.reduce((sum, c) => sum + c.loss * c.samples, 0) / Math.max(1, samples),
      validation_loss: checked.loss,
      accuracy: checked.accuracy,
      samples,
      steps,
      batches_completed: batches,
      epoch: Math.floor((batches * spec.data_config.batch_size) / spec.data_config.total_samples),
      contributions,
      wall_ms: Math.max(0, at.getTime() - job.roundStartedAt),
      at: at.toISOString(),
      ...decisions,
    }
    await this.command(job, { type: 'CompleteRound', round })
    job.weights = weights
    job.encoded = undefined
    job.roundStartedAt = at.getTime()
    this.armDeadline(job)
    const target = spec.training_config.target_accuracy
    if (target !== null && checked.accuracy >= target) return this.finish(job, 'target_accuracy').then(() => true)
    if (batches >= spec.total_batches) return this.finish(job, 'epochs').then(() => true)
    return false
  }

  /** Registers the trained weights as a new model of the customer, then records the job's end. */
  private async finish(job: LiveJob, reason: 'target_accuracy' | 'epochs'): Promise<void> {
    const spec = job.spec
    const bytes = await job.validation.export(job.weights)
    const sha256 = await this.keep(Buffer.from(bytes))
    const at = this.at()
    const trainedModelId = trainedModelIdOf(spec.job_id)
    const model: ModelDescription = {
      ...job.model,
      model_id: trainedModelId,
      customer_id: spec.customer_id,
      name: `${job.model.name} (trained by ${spec.job_id})`,
      size: bytes.length,
      checksum: `sha256:${sha256}`,
      uploaded_at: at,
    }
    try {
      await handleCommand(this.options.store, modelStream(trainedModelId), modelDecider, { type: 'UploadModel', model }, { metadata: this.metadata(spec.customer_id) })
    } catch (error) {
      if (!(error instanceof DomainError && error.code === 'CONFLICT')) throw error // registered before a crash
    }
    await this.command(job, { type: 'CompleteTraining', reason, trainedModelId, at })
    this.leaveAll(spec.job_id, reason === 'epochs' ? 'completed its epochs' : 'reached its target accuracy')
    this.forget(spec.job_id)
    this.rebalance()
  }

  private armDeadline(job: LiveJob): void {
    clearTimeout(job.deadline)
    job.deadline = undefined
    if (job.spec.training_config.sync_mode === 'async' || this.stopped) return
    job.deadline = setTimeout(() => void this.serially(job, () => this.maybeCloseRound(job, true)), this.options.roundDeadlineMs ?? 30_000)
    job.deadline.unref()
  }

  // ---- devices -------------------------------------------------------------------------------------------

  /** Re-plans which device trains for which job; runs once at a time, and again if asked meanwhile. */
  private rebalance(): void {
    if (this.stopped) return
    this.rebalanceAgain = true
    this.balancing = this.balancing.then(async () => {
      while (this.rebalanceAgain && !this.stopped) {
        this.rebalanceAgain = false
        await this.applyPlan().catch((error: Error) => this.options.log?.(`training: rebalancing failed: ${error.message}`))
      }
    })
  }

  private async applyPlan(): Promise<void> {
    const active = [...this.jobs.values()].filter((j) => j.known.state.phase === 'active')
    const plan = allocateDevices({
      devices: this.allocDevices(),
      jobs: active.map((j, i) => allocJob(j.spec.resource_config, modelFormatOf(j.spec), j.spec.job_id, j.spec.weight, i, j.members.size > 0)),
    })
    // a drained device finishes the round it is in and leaves at the boundary (see mixIn and maybeCloseRound)
    for (const drain of plan.drains) {
      const member = this.jobOf(drain.device_id)?.members.get(drain.device_id)
      if (member) member.draining = true
    }
    for (const job of active) {
      const wanted = (plan.assignments[job.spec.job_id] ?? []).filter((id) => !this.membership.has(id) && this.devices.has(id) && !job.failed.has(id))
      if (wanted.length > 0) await this.serially(job, () => this.assign(job, wanted))
    }
  }

  private async assign(job: LiveJob, deviceIds: string[]): Promise<void> {
    if (!this.jobs.has(job.spec.job_id) || job.known.state.phase !== 'active') return
    // a device that left (or joined another job) while this waited behind the job's work is not assigned
    const present = deviceIds.filter((id) => this.devices.has(id) && !this.membership.has(id))
    if (present.length === 0) return
    const at = this.at()
    const devices = present.map((id) => ({ device_id: id, instance_type: this.devices.get(id)!.instanceType, stream_seed: seedOf(job.spec.seed, id, job.known.state.round) }))
    await this.command(job, { type: 'AssignDevices', devices, at })
    // A device that left while its assignment was being recorded: its deviceLost found no membership to end,
    // so it is released here (else it would stay a member that never trains).
    const gone = devices.filter((d) => !this.devices.has(d.device_id) || this.membership.has(d.device_id)).map((d) => d.device_id)
    const joining = devices.filter((d) => !gone.includes(d.device_id))
    if (joining.length > 0 && job.members.size === 0) {
      job.roundStartedAt = this.now().getTime()
      this.armDeadline(job)
    }
    for (const device of joining) {
      const sdkUuid = this.devices.get(device.device_id)?.sdkUuid ?? ''
      const shard = { index: -1, count: 0 } // given by reshard below
      job.members.set(device.device_id, { deviceId: device.device_id, instanceType: device.instance_type, sdkUuid, draining: false, streamSeed: device.stream_seed, shard, lastBaseRound: undefined, lastUpdateAt: undefined })
      this.membership.set(device.device_id, job.spec.job_id)
      this.options.onMembership?.(device.device_id, job.spec.job_id)
    }
    // every member, the new ones and those whose shard the newcomers moved, gets its start frame
    this.reshard(job, new Set(joining.map((d) => d.device_id)))
    if (gone.length > 0) {
      await this.command(job, { type: 'ReleaseDevices', deviceIds: gone, reason: 'the device left while it was being assigned', at: this.at() })
      this.rebalance()
    }
  }

  /**
   * Dataset jobs: the training rows are cut into one contiguous shard per member, in the order they joined
   * (`shardRows`), so whatever devices came and went the members' shards are disjoint and cover every row
   * exactly once. Re-planned whenever a member joins or leaves; a member whose shard moved is sent a new
   * start frame (from the current round's weights) with it, and may send this round's update again (its
   * earlier one is replaced). `starting`: new members, which get their start frame whether or not it moved.
   */
  private reshard(job: LiveJob, starting: ReadonlySet<string> = new Set()): void {
    if (!this.jobs.has(job.spec.job_id) || job.known.state.phase !== 'active') return
    const dataset = job.spec.data_config.type === 'dataset'
    const count = job.members.size
    let index = 0
    for (const member of job.members.values()) {
      const shard = { index: index++, count }
      const moved = dataset && (member.shard.index !== shard.index || member.shard.count !== shard.count)
      member.shard = shard
      if (!starting.has(member.deviceId) && !moved) continue
      if (!starting.has(member.deviceId)) member.lastBaseRound = undefined
      this.devices.get(member.deviceId)?.send(this.startFrame(job, member.streamSeed, shard.index, shard.count))
    }
  }

  private startFrame(job: LiveJob, streamSeed: number, shard: number, shards: number): TrainStart {
    const spec = job.spec
    const config = spec.training_config
    const data: TrainData =
      spec.data_config.type === 'stream'
        ? { type: 'stream', task_seed: spec.seed, stream_seed: streamSeed, clusters_per_class: spec.data_config.clusters_per_class }
        : { type: 'dataset', ...job.validation.datasetShard!(shard, shards), split_seed: spec.seed, validation_fraction: spec.data_config.validation_fraction }
    return {
      type: 'train_start',
      job_id: spec.job_id,
      round: job.known.state.round,
      model: { id: spec.model_id, format: modelFormatOf(spec), checksum: spec.model_checksum, download_path: `/api/v1/sdk/models/${spec.model_id}`, ...(job.model.input_shape ? { input_shape: job.model.input_shape } : {}) },
      ...(job.known.state.round > 0 ? { weights: this.encoded(job) } : {}),
      config: {
        optimizer: config.optimizer,
        learning_rate: config.learning_rate,
        batch_size: spec.data_config.batch_size,
        local_steps: config.local_steps,
        sync_mode: config.sync_mode,
        sync_interval_ms: config.sync_interval_ms,
        loss: config.loss,
      },
      data,
    }
  }

  private async release(job: LiveJob, deviceIds: string[], reason: string): Promise<void> {
    for (const id of deviceIds) {
      this.leave(job, id)
      this.devices.get(id)?.send({ type: 'train_stop', job_id: job.spec.job_id, reason })
    }
    this.reshard(job)
    await this.command(job, { type: 'ReleaseDevices', deviceIds, reason, at: this.at() })
    this.rebalance()
  }

  /** Forgets a device's membership (the event, if any, is the caller's). */
  private leave(job: LiveJob, deviceId: string): void {
    job.members.delete(deviceId)
    job.pending.delete(deviceId)
    if (this.membership.get(deviceId) === job.spec.job_id) {
      this.membership.delete(deviceId)
      this.options.onMembership?.(deviceId, undefined)
    }
  }

  /** Tells every device of a job to stop (its release is in the job's own event: pause, cancel, completion). */
  private leaveAll(jobId: string, reason: string): void {
    const job = this.jobs.get(jobId)
    if (!job) return
    for (const id of [...job.members.keys()]) {
      this.leave(job, id)
      this.devices.get(id)?.send({ type: 'train_stop', job_id: jobId, reason })
    }
    clearTimeout(job.deadline)
  }

  private forget(jobId: string): void {
    const job = this.jobs.get(jobId)
    if (job) clearTimeout(job.deadline)
    this.jobs.delete(jobId)
  }

  private sendWeights(job: LiveJob, deviceId: string): void {
    this.devices.get(deviceId)?.send({ type: 'train_weights', job_id: job.spec.job_id, round: job.known.state.round, weights: this.encoded(job) })
  }

  private encoded(job: LiveJob): string {
    job.encoded ??= weightsToBase64(job.weights)
    return job.encoded
  }

  private allocDevices() {
    return [...this.devices.values()].map((d) => allocDevice(d, this.membership.get(d.deviceId)))
  }

  private jobOf(deviceId: string): LiveJob | undefined {
    const jobId = this.membership.get(deviceId)
    return jobId === undefined ? undefined : this.jobs.get(jobId)
  }

  // ---- the job's stream ----------------------------------------------------------------------------------

  /** Folds the job's stream and loads what running it needs: the model, the last round's weights, the validation set. */
  private async load(jobId: string): Promise<LiveJob> {
    const recorded = await this.options.store.readStream(trainingStream(jobId))
    const state = recorded.map((e) => trainingDecider.parse({ type: e.type, data: e.data, schemaVersion: e.metadata.schemaVersion ?? 1 })).reduce(trainingDecider.evolve, trainingDecider.initialState())
    const spec = state.spec
    if (!spec) throw new Error(`training job ${jobId} has no TrainingSubmitted event`)
    const model = await this.modelOf(spec.model_id)
    const validation = await loadValidation(spec, model.input_shape, this.options.blobs, this.torch)
    const weights = state.weightsSha256 ? decodeWeights(await this.options.blobs.read(state.weightsSha256)) : validation.initialWeights()
    const job: LiveJob = {
      spec,
      known: { state, revision: recorded.at(-1)?.revision ?? -1 },
      weights,
      encoded: undefined,
      members: new Map(),
      failed: new Set(),
      pending: new Map(),
      roundStartedAt: this.now().getTime(),
      deadline: undefined,
      validation,
      model,
      queue: Promise.resolve(),
    }
    this.jobs.set(jobId, job)
    return job
  }

  /**
   * Loads a job, or fails it when what running it needs cannot be had (its TorchScript model on a server
   * without Python since, its files): recorded with why, instead of a job queued for ever with nothing on it.
   */
  private async loadOrFail(jobId: string): Promise<LiveJob | undefined> {
    try {
      return await this.load(jobId)
    } catch (error) {
      // a model the server cannot check (TorchScript without Python) fails its job; anything else (the store) is thrown
      if (!(error instanceof DomainError || error instanceof TorchToolError)) throw error
      const message = `the job cannot run on this server: ${(error as Error).message}`
      this.options.log?.(`training ${jobId}: ${message}`)
      await handleCommand(this.options.store, trainingStream(jobId), trainingDecider, { type: 'FailTraining', error: message.slice(0, 2000), at: this.at() }, { metadata: { occurredAt: this.at() } })
      return undefined
    }
  }

  private async modelOf(modelId: string): Promise<ModelDescription> {
    const recorded = await this.options.store.readStream(modelStream(modelId))
    const state = recorded.map((e) => modelDecider.parse({ type: e.type, data: e.data, schemaVersion: e.metadata.schemaVersion ?? 1 })).reduce(modelDecider.evolve, modelDecider.initialState())
    if (!state.model) throw new Error(`model ${modelId} not found`)
    return state.model
  }

  /** Runs a command on the job's stream from the state the coordinator knows (it is the stream's writer). */
  private async command(job: LiveJob, command: TrainingCommand): Promise<Position> {
    const result = await handleCommand(this.options.store, trainingStream(job.spec.job_id), trainingDecider, command, { known: job.known, metadata: this.metadata(job.spec.customer_id) })
    job.known = { state: result.state, revision: result.nextRevision }
    return result.position
  }

  /** Pause, resume or cancel, from the API: the job may not be loaded (finished, or another customer's). */
  private async control(jobId: string, command: TrainingCommand): Promise<Position> {
    const job = this.jobs.get(jobId)
    if (!job) {
      const result = await handleCommand(this.options.store, trainingStream(jobId), trainingDecider, command, { metadata: { occurredAt: this.at() } })
      if (command.type === 'ResumeTraining' && !isFinished(result.state.phase)) await this.loadOrFail(jobId)
      return result.position
    }
    let position: Position | undefined
    await this.serially(job, async () => {
      position = await this.command(job, command)
    })
    if (position !== undefined) return position
    // The command hit an internal error, and `serially` failed the job (and forgot it) instead of throwing:
    // decided again on the stream, the decider answers for the job as it now is (CANNOT_PAUSE, with why it
    // failed), never an answer for a command that was not recorded.
    if (this.jobs.get(jobId) === job) throw new Error(`training job ${jobId}: ${command.type} was not recorded`)
    return this.control(jobId, command)
  }

  /** Runs `work` after the job's earlier work; an error is logged, and fails the job if it is not a domain refusal. */
  private serially(job: LiveJob, work: () => Promise<unknown>): Promise<void> {
    const run: Promise<void> = job.queue.then(work).then(
      () => undefined,
      async (error: Error) => {
        if (error instanceof DomainError) throw error
        this.options.log?.(`training ${job.spec.job_id}: ${error.stack ?? error.message}`)
        await this.fail(job, error.message)
      },
    )
    const settled = run.catch(() => undefined)
    job.queue = settled
    this.working.add(settled)
    void settled.then(() => this.working.delete(settled))
    return run
  }

  /**
   * Ends the job as failed: its devices leave at once, and the failure is recorded, again and again (backing
   * off to 5 s) while the store refuses it. Forgetting the job with the failure unrecorded would leave it
   * `running` in the log with no device on it until a restart. A refusal of the decider (the job ended
   * meanwhile) needs no record; a stop leaves the job to the next start's recovery, which loads it from the log.
   */
  private async fail(job: LiveJob, message: string): Promise<void> {
    this.leaveAll(job.spec.job_id, 'the job failed')
    const failure: TrainingCommand = { type: 'FailTraining', error: message, at: this.at() }
    for (let pause = 100; ; pause = Math.min(pause * 2, FAIL_RETRY_MAX_MS)) {
      try {
        await this.command(job, failure)
        break
      } catch (error) {
        if (error instanceof DomainError) break
        this.options.log?.(`training ${job.spec.job_id}: recording the failure: ${(error as Error).message}${this.stopped ? '' : `; again in ${pause} ms`}`)
        if (this.stopped) break
        await sleep(pause)
      }
    }
    this.forget(job.spec.job_id)
    this.rebalance()
  }

  private async keep(bytes: Buffer): Promise<string> {
    const pending = await this.options.blobs.write(Readable.from([bytes]))
    await pending.keep()
    return pending.sha256
  }

  private at(): string {
    return this.now().toISOString()
  }

  private metadata(customerId: string) {
    return { customerId, occurredAt: this.at() }
  }
}

/** Longest pause between two tries to record a job's failure. */
const FAIL_RETRY_MAX_MS = 2000

/** The id of the model a job registers: derived from the job, so a retry after a crash finds it. */
const trainedModelIdOf = (jobId: string) => `model_${jobId.replace(/^train_/, '')}_trained`

/**
 * A device's part of a round as the server credits it: its claimed samples capped at what it was given
 * (local_steps × batch_size), its steps derived from those (a claimed step count moves no progress), and
 * the claims kept beside them when they differ.
 */
function contribution(spec: TrainingSpec, member: Member, frame: TrainUpdate, staleness: number): Contribution {
  const batch = spec.data_config.batch_size
  const samples = Math.min(frame.samples, spec.training_config.local_steps * batch)
  const steps = Math.ceil(samples / batch)
  return {
    device_id: member.deviceId,
    sdk_uuid: member.sdkUuid,
    instance_type: member.instanceType,
    samples,
    steps,
    ...(samples !== frame.samples ? { claimed_samples: frame.samples } : {}),
    ...(steps !== frame.steps ? { claimed_steps: frame.steps } : {}),
    loss: frame.loss,
    staleness,
    cpu_ms: frame.metrics.cpu_ms,
    gpu_ms: frame.metrics.gpu_ms,
    wall_ms: frame.metrics.wall_ms ?? 0,
    power_watts: frame.power_watts,
  }
}

/** An update's weights, which must be the job's tensors, of their sizes, all finite: else the update is refused (not the job). */
function weightsOf(job: LiveJob, frame: TrainUpdate): Weights {
  let weights: Weights
  try {
    weights = decodeWeights(Buffer.from(frame.weights, 'base64'))
  } catch (error) {
    throw new DomainError('INVALID_FRAME', `weights: ${(error as Error).message}`)
  }
  const names = Object.keys(job.weights)
  if (Object.keys(weights).length !== names.length) throw new DomainError('INVALID_FRAME', `weights: ${Object.keys(weights).length} tensors, the model has ${names.length}`)
  for (const name of names) {
    const values = weights[name]
    if (!values || values.length !== job.weights[name]!.length) throw new DomainError('INVALID_FRAME', `weights: tensor ${name} is missing or of the wrong size`)
    for (let i = 0; i < values.length; i++) if (!Number.isFinite(values[i]!)) throw new DomainError('INVALID_FRAME', `weights: tensor ${name} has a non-finite value`)
  }
  return weights
}

/** A device's sample stream for a job: reproducible from the job's seed, the device and the round it joined at. */
function seedOf(jobSeed: number, deviceId: string, round: number): number {
  return createHash('sha256').update(`${jobSeed}:${deviceId}:${round}`).digest().readInt32LE(0)
}

function eligible(device: TrainingDevice, resources: TrainingSpec['resource_config'], format: ModelFormat): boolean {
  return isEligible(allocDevice(device, undefined), allocJob(resources, format, 'probe', 1, 0, false))
}

function allocDevice(device: TrainingDevice, currentJob: string | undefined): AllocDevice {
  return { device_id: device.deviceId, platform: device.platform, sdk_version: device.sdkVersion, gpu: device.gpu, can_train: true, train_formats: device.trainFormats, instance_type: device.instanceType, ...(currentJob ? { current_job: currentJob } : {}) }
}

function allocJob(resources: TrainingSpec['resource_config'], format: ModelFormat, jobId: string, weight: number, seq: number, running: boolean) {
  return {
    job_id: jobId,
    model_format: format,
    weight,
    min_devices: resources.min_devices,
    ...(resources.max_devices !== null ? { max_devices: resources.max_devices } : {}),
    prefer_gpu: resources.prefer_gpu,
    ...(resources.sdk_types ? { sdk_types: resources.sdk_types } : {}),
    ...(resources.min_sdk_version ? { min_sdk_version: resources.min_sdk_version } : {}),
    ...(resources.instance_types ? { instance_types: resources.instance_types } : {}),
    submitted_seq: seq,
    running,
  }
}
