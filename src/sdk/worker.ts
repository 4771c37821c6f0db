import { EventEmitter } from 'node:events'
import { readFileSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import WebSocket from 'ws'
import { z } from 'zod'
import {
  CLOSE,
  type DeviceFrame,
  errorText,
  type Hardware,
  HubFrame,
  MAX_BATCH_INPUTS,
  MAX_FRAME_BYTES,
  MAX_HEARTBEAT_LEASES,
  PROTOCOL_VERSION,
  type Registered,
  type TaskAssignment,
  type TrainStart,
  type TrainWeights,
} from '../protocol/frames.js'
import { type DeviceState, loadDeviceState, saveDeviceState } from './device-state.js'
import { HeldTasks } from './held-tasks.js'
import { type LogSink, WorkerLog } from './log.js'
import { describeHardware, machineReadings } from './machine.js'
import { ModelStore } from './models.js'
import { taskMeters } from './meter.js'
import { runTask, type TaskResultFrame } from './task.js'
import { TrainingSession } from './training.js'
import { sendText } from '../protocol/send.js'

const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }
export const SDK_VERSION: string = pkg.version

/** Closes after which retrying cannot help: the hub refused us, or another copy of this device took over. */
const FATAL_CLOSES = new Map<number, string>([
  [CLOSE.UNAUTHORIZED, 'the hub refused the enrollment token or secret, or the SDK token'],
  [CLOSE.FORBIDDEN, 'the hub does not let this device in (banned, enrollment token revoked or expired, or instance type refused)'],
  [CLOSE.UNSUPPORTED_PROTOCOL, `the hub does not speak protocol ${PROTOCOL_VERSION}`],
  [CLOSE.REPLACED, 'the same device connected from elsewhere (is another worker using this state dir?)'],
])
/** A silent socket is declared dead after this long (at least three heartbeat intervals). */
const MIN_DEAD_AFTER_MS = 10_000
const DEFAULT_BATCH_INPUTS = 1024

export interface DeviceWorkerOptions {
  /** Hub base URL, e.g. `http://127.0.0.1:3000`; the socket is `ws(s)://<host>/api/v1/devices/connect`. */
  server: string
  /** Default 'user'. */
  instanceType?: 'aws' | 'user'
  /** Where `device.json` (device id, SDK token, SDK UUID) lives. Default `~/.dcp-worker`. */
  stateDir?: string
  /** Model files. Default `<stateDir>/models`. */
  cacheDir?: string
  enrollmentSecret?: string | undefined
  /** Enrollment token (`dcp_e_...`) from an operator; it sets the device's instance type (use the same `instanceType`). */
  enrollmentToken?: string | undefined
  /** Tasks run at once; more are queued locally. Default 1. */
  maxConcurrentTasks?: number
  /**
   * onnxruntime threads one task's run may use (intra-op). Default: the machine's cores divided by
   * `maxConcurrentTasks`, at least 1, so that tasks running side by side do not each spread over every core.
   */
  threadsPerTask?: number
  /** Most inputs it takes in one task (chunks of a batch; stacked into one run when the model allows). Default 1024. */
  maxBatchInputs?: number
  /** Offer the device for federated training (the trainer runs in this process). Default true. */
  canTrain?: boolean
  /** Ask onnxruntime for the CUDA execution provider (falls back to CPU with a warning). Default false. */
  cuda?: boolean
  /** Receives every log line (they are also kept for the hub's `logs_request`). */
  log?: LogSink
  /** Log lines kept for `logs_request`. Default 2,000. */
  logCapacity?: number
}

export interface DeviceWorkerEvents {
  registered: [{ deviceId: string; protocol: number }]
  task: [TaskAssignment]
  result: [TaskResultFrame]
  disconnected: [{ code: number; reason: string; reconnectInMs?: number }]
  /** The worker gave up (e.g. close 4401) after having registered; before that, `start()` rejects instead. */
  fatal: [Error]
}

/** 250 ms doubling to 10 s, with the upper half jittered so a fleet does not reconnect in lockstep. */
export function backoffDelay(attempt: number, random: () => number = Math.random): number {
  const ceiling = Math.min(10_000, 250 * 2 ** Math.min(attempt, 16))
  return Math.round(ceiling / 2 + (random() * ceiling) / 2)
}

type Phase = 'idle' | 'running' | 'draining' | 'stopped'

/** A device: connects to the hub, registers, heartbeats, and runs the ONNX tasks it is given. */
export class DeviceWorker extends EventEmitter<DeviceWorkerEvents> {
  /** Settles when the worker ends: resolves after `stop()`, rejects when it gives up (see `fatal`). */
  readonly finished: Promise<void>
  private readonly log: WorkerLog
  private readonly models: ModelStore
  private readonly base: string
  private readonly socketUrl: string
  private readonly stateDir: string
  private readonly maxTasks: number
  private readonly maxBatchInputs: number
  private phase: Phase = 'idle'
  private state: DeviceState | undefined
  private hardware: Hardware | undefined
  private socket: WebSocket | undefined
  private registered = false
  private attempt = 0
  private reconnectTimer: NodeJS.Timeout | undefined
  private heartbeatTimer: NodeJS.Timeout | undefined
  private lastHeardAt = 0
  private readonly tasks: HeldTasks
  private gpuRuns = 0
  private readonly outbox: TaskResultFrame[] = []
  private readonly training = new Map<string, TrainingSession>()
  /**
   * Jobs whose (new) session is being set up, holding the newest weights that came meanwhile: the hub may send
   * a job's train_start again (its dataset shard moved) right before a round's train_weights, which the old
   * session, already stopped, would drop (and the new one would wait for the next round's in vain).
   */
  private readonly starting = new Map<string, { weights: TrainWeights | undefined }>()
  private cutDrainShort: (() => void) | undefined
  private firstRegistration: { resolve: () => void; reject: (error: Error) => void } | undefined
  private settleFinished!: { resolve: () => void; reject: (error: Error) => void }
  private stopping: Promise<void> | undefined

  constructor(private readonly options: DeviceWorkerOptions) {
    super()
    const url = new URL(options.server)
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new TypeError(`server must be an http(s) URL, got ${options.server}`)
    this.base = options.server.replace(/\/+$/, '')
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:'
    url.pathname = `${url.pathname.replace(/\/+$/, '')}/api/v1/devices/connect`
    this.socketUrl = url.toString()
    this.maxTasks = options.maxConcurrentTasks ?? 1
    if (!Number.isInteger(this.maxTasks) || this.maxTasks < 1 || this.maxTasks > 256) throw new RangeError('maxConcurrentTasks must be 1..256')
    const threads = options.threadsPerTask ?? Math.max(1, Math.floor(os.availableParallelism() / this.maxTasks))
    if (!Number.isInteger(threads) || threads < 1 || threads > 256) throw new RangeError('threadsPerTask must be 1..256')
    this.maxBatchInputs = options.maxBatchInputs ?? DEFAULT_BATCH_INPUTS
    if (!Number.isInteger(this.maxBatchInputs) || this.maxBatchInputs < 1 || this.maxBatchInputs > MAX_BATCH_INPUTS) throw new RangeError(`maxBatchInputs must be 1..${MAX_BATCH_INPUTS}`)
    this.stateDir = options.stateDir ?? path.join(os.homedir(), '.dcp-worker')
    this.log = new WorkerLog(options.log, options.logCapacity)
    this.models = new ModelStore({
      server: this.base,
      cacheDir: options.cacheDir ?? path.join(this.stateDir, 'models'),
      cuda: options.cuda ?? false,
      threads,
      log: this.log,
      token: () => this.state?.sdk_token,
    })
    const hooks = {
      onRunStart: (gpu: boolean) => void (gpu && this.gpuRuns++),
      onRunEnd: (gpu: boolean) => void (gpu && this.gpuRuns--),
      meters: taskMeters(),
    }
    this.tasks = new HeldTasks(
      this.maxTasks,
      (task) => runTask(task, this.models, hooks),
      (task, result, cancelled) => this.finishTask(task, result, cancelled),
    )
    this.finished = new Promise<void>((resolve, reject) => (this.settleFinished = { resolve, reject }))
    this.finished.catch(() => undefined) // observed through `fatal` / start(); never an unhandled rejection
  }

  /** The id the hub gave this device (persisted from an earlier run until the hub answers). */
  get deviceId(): string | undefined {
    return this.state?.device_id
  }

  /** Registered on an open socket. */
  get connected(): boolean {
    return this.registered && this.socket?.readyState === WebSocket.OPEN
  }

  /** Connects, and resolves once the hub has answered `registered` (retrying connection failures meanwhile). */
  async start(): Promise<void> {
    if (this.phase !== 'idle') throw new Error('DeviceWorker.start() can be called once')
    this.phase = 'running'
    const registered = new Promise<void>((resolve, reject) => (this.firstRegistration = { resolve, reject }))
    try {
      this.state = await loadDeviceState(this.stateDir)
      this.hardware = await describeHardware(this.options.cuda ?? false)
    } catch (error) {
      this.fail(error as Error)
    }
    this.connect()
    return registered
  }

  /**
   * drain (default): tell the hub, take nothing new, finish every task held (queued ones too) and send the
   * results, then close. Otherwise close at once; results of tasks still running are dropped.
   */
  stop({ drain = true }: { drain?: boolean } = {}): Promise<void> {
    // stop({ drain: false }) during a drain cuts it short: what is still held is dropped.
    if (!drain && this.phase === 'draining') this.cutDrainShort?.()
    this.stopping ??= (async () => {
      if (drain && this.phase === 'running') {
        this.phase = 'draining'
        this.log.info(`draining: finishing ${this.tasks.size} task(s), taking no new ones`)
        this.send({ type: 'draining' })
        for (const jobId of [...this.training.keys()]) this.stopTraining(jobId, 'draining')
        await new Promise<void>((resolve) => {
          this.cutDrainShort = resolve
          void this.tasks.whenEmpty().then(resolve)
        })
        if (this.outbox.length > 0) this.log.warn(`${this.outbox.length} result(s) could not be delivered before stopping`)
      }
      this.phase = 'stopped'
      this.tasks.halt()
      for (const jobId of [...this.training.keys()]) this.stopTraining(jobId, 'the worker stopped')
      this.firstRegistration?.reject(new Error('the worker was stopped before it registered'))
      this.firstRegistration = undefined
      await this.closeSocket(1000, 'worker stopped')
      this.log.info('stopped')
      this.settleFinished.resolve()
      // Runs still in flight (no drain) keep their sessions until they end.
      void this.tasks.whenQuiet().then(() => this.models.release())
    })()
    return this.stopping
  }

  // ---- connection ----------------------------------------------------------------------------------------

  private connect() {
    this.reconnectTimer = undefined
    if (this.phase === 'stopped') return
    this.log.info(`connecting to ${this.socketUrl}`)
    const socket = new WebSocket(this.socketUrl, { maxPayload: MAX_FRAME_BYTES })
    this.socket = socket
    socket.on('open', () => {
      this.lastHeardAt = Date.now()
      this.send(this.registerFrame())
    })
    socket.on('message', (data, isBinary) => {
      this.lastHeardAt = Date.now()
      this.onMessage(data, isBinary)
    })
    socket.on('pong', () => (this.lastHeardAt = Date.now()))
    // 'close' follows every 'error'; the reason of a close without one (1006) is the error.
    let failure = ''
    socket.on('error', (error) => {
      failure = error.message
      this.log.debug(`connection error: ${error.message}`)
    })
    socket.on('close', (code, reason) => this.onClose(socket, code, reason.toString() || failure))
  }

  private onClose(socket: WebSocket, code: number, reason: string) {
    if (socket !== this.socket) return
    this.socket = undefined
    this.registered = false
    clearInterval(this.heartbeatTimer)
    // the hub released this device from its jobs when the socket went; it gives it work again on reconnecting
    for (const jobId of [...this.training.keys()]) this.stopTraining(jobId, 'disconnected')
    const why = `code ${code}${reason ? `: ${reason}` : ''}`
    if (this.phase === 'stopped') {
      this.emit('disconnected', { code, reason })
      return
    }
    const fatal = FATAL_CLOSES.get(code)
    if (fatal) {
      this.emit('disconnected', { code, reason })
      this.fail(new Error(`${fatal} (${why})`))
      return
    }
    const delay = backoffDelay(this.attempt++)
    this.log.warn(`disconnected (${why}); reconnecting in ${delay} ms`)
    this.emit('disconnected', { code, reason, reconnectInMs: delay })
    this.reconnectTimer = setTimeout(() => this.connect(), delay)
  }

  /** Gives up for good: no reconnect; start() rejects, or `fatal` fires when it had registered. */
  private fail(error: Error) {
    if (this.phase === 'stopped') return
    this.phase = 'stopped'
    this.tasks.halt()
    this.log.error(`giving up: ${error.message}`)
    clearTimeout(this.reconnectTimer)
    clearInterval(this.heartbeatTimer)
    this.socket?.terminate()
    if (this.firstRegistration) this.firstRegistration.reject(error)
    else this.emit('fatal', error)
    this.firstRegistration = undefined
    this.settleFinished.reject(error)
  }

  private async closeSocket(code: number, reason: string) {
    clearTimeout(this.reconnectTimer)
    clearInterval(this.heartbeatTimer)
    const socket = this.socket
    if (!socket || socket.readyState === WebSocket.CLOSED) return
    const closed = new Promise((resolve) => socket.once('close', resolve))
    if (socket.readyState === WebSocket.CONNECTING) socket.terminate()
    else socket.close(code, reason)
    // A hub that does not finish the closing handshake does not hold us up.
    const timer = setTimeout(() => socket.terminate(), 1000)
    await closed
    clearTimeout(timer)
  }

  /** false when the frame cannot go now: no open socket, or (for anything but `register`) not registered on it, as the hub refuses other frames before that. */
  private send(frame: DeviceFrame): boolean {
    if (this.socket?.readyState !== WebSocket.OPEN) return false
    if (frame.type !== 'register' && !this.registered) return false
    sendText(this.socket, JSON.stringify(frame))
    return true
  }

  private registerFrame(): DeviceFrame {
    const state = this.state!
    return {
      type: 'register',
      protocol: PROTOCOL_VERSION,
      ...(this.options.enrollmentSecret ? { enrollment_secret: this.options.enrollmentSecret } : {}),
      ...(this.options.enrollmentToken ? { enrollment_token: this.options.enrollmentToken } : {}),
      ...(state.device_id ? { device_id: state.device_id } : {}),
      ...(state.sdk_token ? { sdk_token: state.sdk_token } : {}),
      platform: 'nodejs',
      sdk_version: SDK_VERSION,
      sdk_uuid: state.sdk_uuid,
      instance_type: this.options.instanceType ?? 'user',
      hardware: this.hardware!,
      capabilities: { formats: ['onnx'], gpu: this.options.cuda ?? false, can_train: this.options.canTrain ?? true, max_concurrent_tasks: this.maxTasks, max_batch_inputs: this.maxBatchInputs },
    }
  }

  // ---- hub frames ----------------------------------------------------------------------------------------

  private onMessage(data: WebSocket.RawData, isBinary: boolean) {
    if (isBinary) return this.log.warn('ignored a binary frame from the hub')
    let json: unknown
    try {
      json = JSON.parse(data.toString())
    } catch {
      return this.log.warn('ignored a frame from the hub that is not JSON')
    }
    const parsed = HubFrame.safeParse(json)
    if (!parsed.success) {
      const type = typeof json === 'object' && json && 'type' in json ? ` of type ${JSON.stringify(json.type)}` : ''
      return this.log.warn(`ignored an invalid frame${type} from the hub: ${z.prettifyError(parsed.error).slice(0, 500)}`)
    }
    const frame = parsed.data
    switch (frame.type) {
      case 'registered':
        return void this.onRegistered(frame).catch((error: Error) => this.log.error(`after registering: ${error.message}`))
      case 'task':
        return this.onTask(frame)
      case 'cancel_task':
        return this.onCancel(frame.task_id, frame.lease_id)
      case 'logs_request':
        return void this.send({ type: 'logs', request_id: frame.request_id, lines: this.fitInFrame(this.log.tail(frame.lines, frame.level)) })
      case 'error':
        return this.log.error(`hub error ${frame.code}: ${frame.message}`)
      case 'train_start':
        return void this.startTraining(frame).catch((error: Error) => {
          this.log.error(`training ${frame.job_id} could not start: ${error.message}`)
          this.send({ type: 'train_error', job_id: frame.job_id, error: errorText(error) })
        })
      case 'train_weights': {
        const starting = this.starting.get(frame.job_id)
        if (starting && (!starting.weights || frame.round >= starting.weights.round)) starting.weights = frame
        return this.training.get(frame.job_id)?.weights(frame)
      }
      case 'train_stop':
        return this.stopTraining(frame.job_id, frame.reason)
      default: {
        const unknown: never = frame
        throw new Error(`unknown frame ${JSON.stringify(unknown)}`)
      }
    }
  }

  private async onRegistered(frame: z.infer<typeof Registered>) {
    const before = this.state!
    // A new identity without a token means the old token belongs to another device: forget it.
    const sameDevice = before.device_id === frame.device_id
    const state: DeviceState = { ...before, device_id: frame.device_id, sdk_token: frame.sdk_token ?? (sameDevice ? before.sdk_token : undefined) }
    this.state = state
    this.registered = true
    this.attempt = 0
    if (frame.protocol !== PROTOCOL_VERSION) this.log.warn(`the hub answered protocol ${frame.protocol}; this SDK speaks ${PROTOCOL_VERSION}`)
    this.log.info(`registered as ${frame.device_id} (protocol ${frame.protocol}, heartbeat every ${frame.heartbeat_interval_ms} ms)`)
    clearInterval(this.heartbeatTimer)
    this.heartbeatTimer = setInterval(() => this.heartbeat(frame.heartbeat_interval_ms), frame.heartbeat_interval_ms)
    this.heartbeat(frame.heartbeat_interval_ms)
    if (this.phase === 'draining') this.send({ type: 'draining' })
    for (const result of this.outbox.splice(0)) this.send(result)
    if (state.device_id !== before.device_id || state.sdk_token !== before.sdk_token) {
      // Not fatal for this run; the next start would come back as a new device.
      await saveDeviceState(this.stateDir, state).catch((error: Error) => this.log.error(`cannot save the device state: ${error.message}`))
    }
    this.firstRegistration?.resolve()
    this.firstRegistration = undefined
    this.emit('registered', { deviceId: frame.device_id, protocol: frame.protocol })
  }

  private heartbeat(intervalMs: number) {
    if (!this.connected) return
    // The hub sends nothing on its own: a ws ping every beat, and a socket silent for long, is a dead one.
    if (Date.now() - this.lastHeardAt > Math.max(3 * intervalMs, MIN_DEAD_AFTER_MS)) {
      this.log.warn('the hub stopped answering pings; reconnecting')
      this.socket?.terminate()
      return
    }
    this.socket?.ping()
    // every lease it still holds: running, queued, or done with a result not sent yet (the first heartbeat
    // after a reconnect tells the hub which of its earlier leases the device still has)
    const leases = [...this.tasks.leases(), ...this.outbox.map((result) => result.lease_id)]
    this.send({ type: 'heartbeat', ...machineReadings({ gpus: this.gpuCount(), gpuBusy: this.gpuRuns > 0 }), leases: leases.slice(0, MAX_HEARTBEAT_LEASES) })
  }

  private gpuCount() {
    return this.options.cuda ? Math.max(1, this.hardware?.gpus.length ?? 0) : 0
  }

  /** Keeps the newest log lines that fit in one frame. */
  private fitInFrame<T>(lines: T[]): T[] {
    let kept = lines
    while (kept.length > 0 && JSON.stringify(kept).length > MAX_FRAME_BYTES - 1024) kept = kept.slice(Math.ceil(kept.length / 10))
    return kept
  }

  // ---- training ------------------------------------------------------------------------------------------

  private async startTraining(frame: TrainStart) {
    if (this.phase !== 'running') return this.log.warn(`ignored training job ${frame.job_id}: the worker is ${this.phase}`)
    this.training.get(frame.job_id)?.stop()
    this.log.info(`training job ${frame.job_id}: joining at round ${frame.round} (${frame.config.sync_mode}, ${frame.config.local_steps} steps of ${frame.config.batch_size})`)
    const starting = { weights: undefined as TrainWeights | undefined }
    this.starting.set(frame.job_id, starting)
    const bytes = this.trainingBytes(frame).finally(() => {
      if (this.starting.get(frame.job_id) === starting) this.starting.delete(frame.job_id)
    })
    const { modelBytes, datasetBytes } = await bytes
    // weights of a later round that came meanwhile: the session starts from them
    const held = starting.weights
    const session = new TrainingSession({
      frame: held && held.round > frame.round ? { ...frame, round: held.round, weights: held.weights } : frame,
      modelBytes,
      ...(datasetBytes ? { datasetBytes } : {}),
      send: (f) => this.send(f),
      powerWatts: () => machineReadings({ gpus: this.gpuCount(), gpuBusy: this.gpuRuns > 0 }).power_watts,
      log: (level, message) => this.log[level](message),
    })
    this.training.set(frame.job_id, session)
    void session.finished.then(() => {
      if (this.training.get(frame.job_id) === session) this.training.delete(frame.job_id)
    })
  }

  /** The model's bytes and, for a dataset job, the dataset's (downloaded once, then from the cache). */
  private async trainingBytes(frame: TrainStart) {
    const modelBytes = await this.models.bytes(frame.model)
    const data = frame.data
    const datasetBytes = data.type === 'dataset' ? await this.models.bytes({ id: data.dataset_id, checksum: data.checksum, download_path: data.download_path }) : undefined
    return { modelBytes, datasetBytes }
  }

  private stopTraining(jobId: string, reason: string) {
    const session = this.training.get(jobId)
    if (!session) return
    this.log.info(`training job ${jobId}: leaving (${reason})`)
    session.stop()
    this.training.delete(jobId)
  }

  // ---- tasks ---------------------------------------------------------------------------------------------

  private onTask(task: TaskAssignment) {
    if (this.phase !== 'running') return this.log.warn(`ignored task ${task.task_id}: the worker is ${this.phase}`)
    if (this.tasks.adopt(task)) return this.log.info(`task ${task.task_id} is held already: now under lease ${task.lease_id}`)
    if (this.tasks.has(task.task_id)) return this.log.debug(`task ${task.task_id} is already held`)
    this.log.info(`task ${task.task_id} received (model ${task.model.id}, lease ${task.lease_id})`)
    this.emit('task', task)
    this.tasks.add(task)
  }

  private onCancel(taskId: string, leaseId: string) {
    if (this.tasks.cancel(taskId, leaseId)) this.log.info(`task ${taskId} cancelled by the hub`)
    else this.log.debug(`cancel for task ${taskId} that is not held under lease ${leaseId}`)
  }

  private finishTask(task: TaskAssignment, result: TaskResultFrame, cancelled: boolean) {
    const id = task.task_id
    if (cancelled) return this.log.info(`task ${id} ended after being cancelled; result dropped`)
    if (this.phase === 'stopped') return this.log.warn(`task ${id} ended after the worker stopped; result dropped`)
    if (result.status === 'completed') this.log.info(`task ${id} completed (cpu ${result.metrics.cpu_ms.toFixed(2)} ms)`)
    else this.log.warn(`task ${id} failed: ${result.error}`)
    let frame = result
    if (JSON.stringify(result).length > MAX_FRAME_BYTES - 1024) {
      const { output: _tooLarge, outputs: _tooMany, ...rest } = result
      frame = { ...rest, status: 'failed', error: 'the output is too large for one frame' }
      this.log.warn(`task ${id}: output too large for one frame, reported as failed`)
    }
    this.emit('result', frame)
    if (!this.send(frame)) this.outbox.push(frame) // sent once registered again
  }
}
