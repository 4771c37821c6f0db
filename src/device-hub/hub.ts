import { randomUUID } from 'node:crypto'
import type { IncomingMessage, Server } from 'node:http'
import type { Duplex } from 'node:stream'
import { type WebSocket, WebSocketServer } from 'ws'
import { handleCommand } from '../commands/handle-command.js'
import type { DeviceSlot, TaskScheduler } from '../commands/scheduler.js'
import type { TrainingCoordinator } from '../commands/training.js'
import type { TrainingDevice } from '../commands/training.js'
import { type DeviceCommand, type DeviceDescription, deviceDecider, deviceStream, heartbeatStream } from '../domain/device.js'
import { DomainError } from '../domain/errors.js'
import type { EventStore, Position } from '../event-store/port.js'
import { NUL_MESSAGE, nulField } from '../event-store/storable.js'
import { newId, newSecret } from '../http/ids.js'
import { numberArrayProblem } from '../protocol/numbers.js'
import { CLOSE, DeviceFrame, type HubFrame, Metrics, type LogLine, MAX_FRAME_BYTES, PROTOCOL_VERSION, trainFormatsOf } from '../protocol/frames.js'
import { sendText } from '../protocol/send.js'
import { type Admitted, enrollDevice, reconnectDevice } from './enrollment.js'
import { DEFAULT_LIMITS, FrameLimiter, type HubLimits } from './limits.js'

export const DEVICE_PATH = '/api/v1/devices/connect'

export interface HubOptions {
  store: EventStore
  scheduler: TaskScheduler
  /** Federated training: devices that can train are offered to it, and their training frames go to it. */
  training?: TrainingCoordinator
  /** Read-your-writes: a new device's SDK token must be usable for downloads as soon as it is told it. */
  waitFor?: (position: Position) => Promise<void>
  /** How often devices heartbeat; three missed ones mark a device offline. Default 5000 ms. */
  heartbeatIntervalMs?: number
  /** ENROLLMENT_SECRET: when set, a new device without an enrollment token must send it (it enrolls `user` devices). */
  enrollmentSecret?: string | undefined
  /** Production: with no secret, a new device without an enrollment token is refused (4403). Default false (open enrollment for `user` devices). */
  production?: boolean
  /** Looks up an enrollment token's id by the SHA-256 of its secret (the enrollment_tokens read model); without it, tokens are refused. */
  findEnrollmentToken?: (tokenHash: string) => Promise<string | undefined>
  /** Per-device frame limits. Default DEFAULT_LIMITS (src/protocol/frames.ts HUB_LIMITS). */
  limits?: Partial<HubLimits>
  /** Time a socket has to register. Default 10 s. */
  registerTimeoutMs?: number
  now?: () => Date
  log?: (message: string) => void
}

/** The watch goes round all sockets once per heartbeat interval, in this many slices. */
const WATCH_SLICES = 10
/** Malformed frames a device may send before it is disconnected. */
const MAX_MALFORMED = 10

interface Connection {
  socket: WebSocket
  deviceId?: string
  slot?: DeviceSlot
  lastHeartbeat: number
  /** Last pong: the device still reads what the hub sends (heartbeats prove only the other way). */
  lastPong: number
  malformed: number
  /** When the device's connection on this socket was recorded (DeviceConnected's connected_at). */
  connectedAt?: string
  limiter: FrameLimiter
  /** The hub closed it (banned, revoked, over a limit): what it still sends is ignored. */
  shut?: boolean
  /** What the training coordinator was told of it (a device that can train), to offer it again after a quarantine. */
  trainingDevice?: TrainingDevice
}

/** A close reason within the 123 bytes (UTF-8) WebSocket allows: an operator's ban reason may be longer, or not ASCII. */
export function closeReason(text: string): string {
  let reason = text
  while (Buffer.byteLength(reason) > 123) reason = reason.slice(0, -1)
  return reason
}

export class DeviceOfflineError extends DomainError {
  constructor(deviceId: string) {
    super('DEVICE_OFFLINE', `device ${deviceId} is not connected`)
  }
}

/**
 * The WebSocket server devices connect to (`/api/v1/devices/connect`): enrollment (src/device-hub/enrollment.ts:
 * tokens, the secret, the instance type the platform asserts) and SDK tokens, heartbeats (stored about once an
 * interval), task frames to and from the scheduler, log pulls; and the platform's decisions about a device
 * (ban, quarantine, revoked enrollment). Devices are untrusted: every frame is checked against
 * src/protocol/frames.ts and the limits of src/device-hub/limits.ts; a bad one gets an error frame, too many
 * or too fast close the socket, none crashes the hub.
 */
export class DeviceHub {
  private readonly wss: WebSocketServer
  /** The live connection of each registered device. */
  private readonly byDevice = new Map<string, Connection>()
  /**
   * Devices banned or cut off by this process, with why: one whose registration was being decided when that
   * was recorded (and so was let in) is turned away before it gets a slot.
   */
  private readonly barred = new Map<string, string>()
  /** The recording of a disconnect the hub itself made (shut), for those that wait on it. */
  private readonly disconnecting = new WeakMap<Connection, Promise<void>>()
  private readonly pendingLogs = new Map<string, { deviceId: string; resolve: (lines: LogLine[]) => void }>()
  private readonly timer: NodeJS.Timeout
  private watchRound: Connection[] = []
  private readonly watchEveryMs: number
  private lastWatch = Date.now()
  private closing = false
  readonly heartbeatIntervalMs: number
  private readonly now: () => Date
  private readonly limits: HubLimits
  /** Heartbeats dropped over the limit, on all sockets since start. */
  droppedHeartbeats = 0

  constructor(private readonly options: HubOptions) {
    this.heartbeatIntervalMs = options.heartbeatIntervalMs ?? 5000
    this.limits = { ...DEFAULT_LIMITS, ...options.limits }
    this.now = options.now ?? (() => new Date())
    this.wss = new WebSocketServer({ noServer: true, maxPayload: MAX_FRAME_BYTES })
    this.wss.on('connection', (socket) => this.accept(socket))
    // the watch visits a tenth of the sockets at a time, so 10,000 pings never stall the event loop at once
    this.watchEveryMs = Math.max(50, this.heartbeatIntervalMs / WATCH_SLICES)
    this.timer = setInterval(() => this.watch(), this.watchEveryMs)
    this.timer.unref()
  }

  /** Takes over WebSocket upgrades on the device path of an HTTP server. */
  attach(server: Server): void {
    server.on('upgrade', (request: IncomingMessage, socket: Duplex, head: Buffer) => {
      if (new URL(request.url ?? '/', 'http://x').pathname !== DEVICE_PATH) {
        socket.end('HTTP/1.1 404 Not Found\r\n\r\n')
        return
      }
      this.wss.handleUpgrade(request, socket, head, (ws) => this.wss.emit('connection', ws, request))
    })
  }

  get connections(): number {
    return this.wss.clients.size
  }

  /** Is a device connected (and not draining or quarantined) that can run this model format? */
  hasCapableDevice(format: string): boolean {
    for (const connection of this.byDevice.values()) {
      if (connection.slot && !connection.slot.draining && !connection.slot.quarantined && connection.slot.formats.includes(format)) return true
    }
    return false
  }

  /** Connected devices that take work (not draining or quarantined), by the model formats they run. */
  devicesByFormat(): Record<'onnx' | 'torchscript', number> {
    const counts = { onnx: 0, torchscript: 0 }
    for (const connection of this.byDevice.values()) {
      const slot = connection.slot
      if (!slot || slot.draining || slot.quarantined) continue
      for (const format of slot.formats) counts[format as keyof typeof counts]++
    }
    return counts
  }

  /**
   * What the connected devices that run `format` can take: task slots in all, and the largest chunk of a
   * batch every one of them that takes several inputs at once accepts (1 when none does).
   */
  capacity(format: string, instanceType?: 'aws' | 'user'): { slots: number; batchInputs: number } {
    let slots = 0
    let batchInputs = Infinity
    for (const connection of this.byDevice.values()) {
      const slot = connection.slot
      if (!slot || slot.draining || slot.quarantined || !slot.formats.includes(format)) continue
      if (instanceType && slot.instanceType !== instanceType) continue
      slots += slot.maxConcurrent
      if (slot.maxBatchInputs > 1) batchInputs = Math.min(batchInputs, slot.maxBatchInputs)
    }
    return { slots, batchInputs: Number.isFinite(batchInputs) ? batchInputs : 1 }
  }

  /** Live task slots of the connected devices: in all, in use, and of devices draining or training (which take no tasks). */
  utilization(): { devices: number; slots: number; used: number; draining: number; training: number } {
    const figures = { devices: 0, slots: 0, used: 0, draining: 0, training: 0 }
    for (const connection of this.byDevice.values()) {
      const slot = connection.slot
      if (!slot) continue
      figures.devices++
      figures.slots += slot.maxConcurrent
      figures.used += Math.min(slot.leases.size, slot.maxConcurrent) // held beyond that, tasks wait on the device
      if (slot.draining) figures.draining++
      if (slot.training) figures.training++
    }
    return figures
  }

  isConnected(deviceId: string): boolean {
    return this.byDevice.has(deviceId)
  }

  /** Asks a device for its recent log lines over its socket. */
  requestLogs(deviceId: string, request: { lines: number; level: 'all' | LogLine['level']; timeoutMs: number }): Promise<LogLine[]> {
    const connection = this.byDevice.get(deviceId)
    if (!connection) return Promise.reject(new DeviceOfflineError(deviceId))
    const requestId = randomUUID()
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pendingLogs.delete(requestId)
        reject(new DomainError('TIMEOUT', `device ${deviceId} did not answer the log request within ${request.timeoutMs} ms`))
      }, request.timeoutMs)
      this.pendingLogs.set(requestId, {
        deviceId,
        resolve: (lines) => {
          clearTimeout(timer)
          resolve(lines)
        },
      })
      this.send(connection, { type: 'logs_request', request_id: requestId, lines: request.lines, level: request.level })
    })
  }

  /**
   * Marks offline every device the read model still shows connected: after a restart (or a crash) no
   * socket survives, and devices that come back connect again. Single node: with several hub nodes this
   * would need to be per node.
   */
  async markAllOffline(deviceIds: readonly string[]): Promise<void> {
    const at = this.now().toISOString()
    for (let i = 0; i < deviceIds.length; i += 200) {
      await Promise.all(
        deviceIds.slice(i, i + 200).map((id) =>
          handleCommand(this.options.store, deviceStream(id), deviceDecider, { type: 'DisconnectDevice', reason: 'server restarted', at }, { metadata: { occurredAt: at } }),
        ),
      )
    }
  }

  // ---- the platform's decisions about a device ------------------------------------------------------------

  /**
   * Bans a device: recorded, disconnected at once (4403), its leases back to the queue without using attempts;
   * it cannot register or come back, and its SDK token is refused, until unbanned. NOT_FOUND for an unknown device.
   */
  async ban(deviceId: string, reason: string): Promise<Position> {
    const position = await this.record(deviceId, { type: 'BanDevice', reason, at: this.now().toISOString() })
    this.barred.set(deviceId, `device banned: ${reason}`)
    await this.evict(deviceId, `device banned: ${reason}`)
    return position
  }

  async unban(deviceId: string): Promise<Position> {
    const position = await this.record(deviceId, { type: 'UnbanDevice', at: this.now().toISOString() })
    if (this.barred.get(deviceId)?.startsWith('device banned')) this.barred.delete(deviceId)
    return position
  }

  /**
   * Holds a device back (e.g. its results failed validation): recorded; while connected, and on every later
   * connection until released, it gets no tasks and is not offered to training (it leaves a job it trains for).
   */
  async quarantine(deviceId: string, reason: string): Promise<void> {
    const position = await this.record(deviceId, { type: 'QuarantineDevice', reason, at: this.now().toISOString() })
    const connection = this.byDevice.get(deviceId)
    if (connection?.slot) connection.slot.quarantined = true
    if (connection?.trainingDevice) await this.options.training?.deviceLost(deviceId)
    await this.options.waitFor?.(position)
  }

  /** Ends a quarantine: recorded; a connected device takes tasks (and training) again. */
  async release(deviceId: string): Promise<Position> {
    const position = await this.record(deviceId, { type: 'ReleaseDevice', at: this.now().toISOString() })
    const connection = this.byDevice.get(deviceId)
    this.options.scheduler.deviceReleased(deviceId) // its reputation starts afresh, connected or not
    if (connection?.slot?.quarantined) {
      connection.slot.quarantined = false
      if (connection.trainingDevice) this.options.training?.deviceConnected(connection.trainingDevice)
    }
    return position
  }

  /** Whether the device is quarantined (its live slot when connected, else its stream). */
  async isQuarantined(deviceId: string): Promise<boolean> {
    const slot = this.byDevice.get(deviceId)?.slot
    if (slot) return slot.quarantined === true
    const events = await this.options.store.readStream(deviceStream(deviceId))
    const state = events.reduce((s, e) => deviceDecider.evolve(s, deviceDecider.parse({ type: e.type, data: e.data, schemaVersion: e.metadata.schemaVersion ?? 1 })), deviceDecider.initialState())
    return state.quarantined !== undefined
  }

  /** An enrollment token was revoked: each device enrolled with it is cut off for good (recorded, disconnected). */
  async enrollmentRevoked(tokenId: string, deviceIds: readonly string[]): Promise<Position | undefined> {
    let last: Position | undefined
    for (const deviceId of deviceIds) {
      last = await this.record(deviceId, { type: 'RevokeEnrollment', deviceId, tokenId, at: this.now().toISOString() })
      this.barred.set(deviceId, 'the enrollment token of this device was revoked')
      await this.evict(deviceId, 'the enrollment token of this device was revoked')
    }
    return last
  }

  private async record(deviceId: string, command: DeviceCommand): Promise<Position> {
    const result = await handleCommand(this.options.store, deviceStream(deviceId), deviceDecider, command, { metadata: { occurredAt: command.at } })
    return result.position
  }

  /** Disconnects a device the platform removed; its leases (also those of a device not connected) return without using attempts. */
  private async evict(deviceId: string, reason: string): Promise<void> {
    const connection = this.byDevice.get(deviceId)
    if (connection) {
      this.shut(connection, CLOSE.FORBIDDEN, reason, { returnAll: true })
      await this.disconnecting.get(connection)
    } else {
      await this.options.scheduler.deviceLost(deviceId, reason, { returnAll: true })
    }
  }

  /** Closes every socket. Their disconnects are not recorded: the next start marks the devices offline. */
  async close(): Promise<void> {
    this.closing = true
    clearInterval(this.timer)
    for (const client of this.wss.clients) client.close(1001, 'server shutting down')
    await new Promise<void>((resolve) => this.wss.close(() => resolve()))
  }

  private accept(socket: WebSocket): void {
    const connection: Connection = { socket, lastHeartbeat: Date.now(), lastPong: Date.now(), malformed: 0, limiter: new FrameLimiter(this.limits, this.heartbeatIntervalMs) }
    const registerTimer = setTimeout(() => {
      if (!connection.deviceId) socket.close(CLOSE.TIMEOUT, 'register first')
    }, this.options.registerTimeoutMs ?? 10_000)
    socket.on('pong', () => (connection.lastPong = Date.now()))
    socket.on('message', (raw, isBinary) => this.admit(connection, raw as Buffer) && void this.receive(connection, raw as Buffer, isBinary))
    socket.on('error', () => {}) // a protocol error (e.g. an oversized frame) closes the socket; 'close' follows
    socket.on('close', () => {
      clearTimeout(registerTimer)
      void this.disconnected(connection, 'socket closed')
    })
  }

  /** The limits that cost nothing to check come before parsing: a flood is cut off without touching the store. */
  private admit(connection: Connection, raw: Buffer): boolean {
    if (connection.shut) return false
    const verdict = connection.limiter.frame(raw.length, connection.deviceId !== undefined, Date.now())
    if (verdict.ok) return true
    if (verdict.close === 'too_large') this.shut(connection, 1009, `frames before registration are limited to ${this.limits.maxUnregisteredFrameBytes} bytes`)
    else this.shut(connection, CLOSE.RATE_LIMITED, `more than ${this.limits.maxFramesPerSecond} frames in a second`)
    return false
  }

  /** Closes a socket from the hub's side and records the device's disconnect at once (not when the peer answers). */
  private shut(connection: Connection, code: number, reason: string, options: { returnAll?: boolean } = {}): void {
    if (connection.shut) return
    connection.shut = true
    connection.socket.close(code, closeReason(reason))
    // a peer that never answers the close is dropped (ws would wait 30 s)
    setTimeout(() => connection.socket.terminate(), 2000).unref()
    this.disconnecting.set(connection, this.disconnected(connection, reason, options))
  }

  private async receive(connection: Connection, raw: Buffer, isBinary: boolean): Promise<void> {
    let frame: DeviceFrame
    let json: unknown
    try {
      if (isBinary) throw new Error('frames are JSON text')
      json = JSON.parse(raw.toString('utf8'))
      const parsed = DeviceFrame.safeParse(json)
      if (!parsed.success) throw new Error(parsed.error.issues.map((i) => `${i.path.join('.') || 'frame'}: ${i.message}`).join('; '))
      // a device's log lines are passed on, never stored: they may hold anything JSON can
      const nul = parsed.data.type === 'logs' ? undefined : nulField(parsed.data, 'frame')
      if (nul) throw new Error(`${nul}: ${NUL_MESSAGE}`)
      frame = parsed.data
    } catch (error) {
      this.malformed(connection, `invalid frame: ${(error as Error).message}`)
      return this.failMalformedResult(connection, json, (error as Error).message)
    }
    try {
      if (frame.type === 'register') return await this.register(connection, frame)
      if (!connection.deviceId) return this.malformed(connection, `register before sending ${frame.type}`)
      switch (frame.type) {
        case 'heartbeat':
          return this.heartbeat(connection, frame)
        case 'task_result':
          return await this.options.scheduler.result(connection.deviceId, frame)
        case 'logs': {
          const pending = this.pendingLogs.get(frame.request_id)
          if (pending?.deviceId === connection.deviceId) {
            this.pendingLogs.delete(frame.request_id)
            pending.resolve(frame.lines)
          }
          return
        }
        case 'draining':
          if (connection.slot) connection.slot.draining = true
          await this.options.training?.deviceLost(connection.deviceId)
          return
        case 'train_update':
          return await this.training().update(connection.deviceId, frame)
        case 'weights_request':
          return this.training().weightsRequest(connection.deviceId, frame.job_id)
        case 'train_error':
          return await this.training().trainingFailed(connection.deviceId, frame.job_id, frame.error)
      }
    } catch (error) {
      const code = error instanceof DomainError ? error.code : 'INTERNAL_ERROR'
      if (code === 'INTERNAL_ERROR') this.options.log?.(`hub: ${frame.type} from ${connection.deviceId ?? 'unregistered'}: ${(error as Error).message}`)
      this.send(connection, { type: 'error', code, message: code === 'INTERNAL_ERROR' ? 'internal error' : (error as Error).message })
    }
  }

  /**
   * A task result that names the device's current lease but does not parse (an output of NaN or Infinity,
   * sent as null; a value beyond float32) fails that attempt at once, with why: left alone, the task would sit
   * leased until the lease expired, and fail as "lease expired". A stale lease changes nothing.
   */
  private async failMalformedResult(connection: Connection, json: unknown, why: string): Promise<void> {
    const deviceId = connection.deviceId
    if (!deviceId || typeof json !== 'object' || json === null) return
    const { type, task_id: taskId, lease_id: leaseId, metrics } = json as Record<string, unknown>
    if (type !== 'task_result' || typeof taskId !== 'string' || typeof leaseId !== 'string' || taskId.length > 128 || leaseId.length > 128) return
    const reported = Metrics.safeParse(metrics)
    const reason = `the device sent a malformed result: ${outputsProblem(json) ?? why}`.replaceAll('\u0000', '').slice(0, 2000)
    try {
      await this.options.scheduler.result(deviceId, {
        type: 'task_result',
        task_id: taskId,
        lease_id: leaseId,
        status: 'failed',
        error: reason,
        metrics: reported.success ? reported.data : { cpu_ms: 0, gpu_ms: 0, bytes_in: 0, bytes_out: 0 },
      })
    } catch (error) {
      if (error instanceof DomainError && error.code === 'STALE_LEASE') return
      this.options.log?.(`hub: malformed task_result from ${deviceId}: ${(error as Error).message}`)
    }
  }

  private malformed(connection: Connection, message: string): void {
    connection.malformed++
    this.send(connection, { type: 'error', code: 'INVALID_FRAME', message })
    if (connection.malformed >= MAX_MALFORMED) connection.socket.close(CLOSE.MALFORMED, 'too many malformed frames')
  }

  private async register(connection: Connection, frame: Extract<DeviceFrame, { type: 'register' }>): Promise<void> {
    if (connection.deviceId) return this.malformed(connection, 'already registered')
    if (frame.protocol < PROTOCOL_VERSION) {
      connection.socket.close(CLOSE.UNSUPPORTED_PROTOCOL, `protocol ${frame.protocol} is not supported; this hub speaks ${PROTOCOL_VERSION}`)
      return
    }
    const at = this.now().toISOString()
    const describe = (deviceId: string, instanceType: 'aws' | 'user'): DeviceDescription => ({
      device_id: deviceId,
      platform: frame.platform,
      sdk_version: frame.sdk_version,
      sdk_uuid: frame.sdk_uuid,
      instance_type: instanceType,
      hardware: frame.hardware,
      capabilities: frame.capabilities,
    })
    const returning = frame.device_id !== undefined && frame.sdk_token !== undefined && (await this.options.store.readStream(deviceStream(frame.device_id), { maxCount: 1 })).length > 0
    let admitted: Admitted
    try {
      admitted = returning
        ? await reconnectDevice(this.options, frame, describe, at)
        : await enrollDevice(this.options, frame, describe, { deviceId: newId('dev'), sdkToken: newSecret('dcp_s_'), at })
    } catch (error) {
      if (error instanceof DomainError && (error.code === 'AUTH_INVALID' || error.code === 'FORBIDDEN')) {
        connection.socket.close(error.code === 'AUTH_INVALID' ? CLOSE.UNAUTHORIZED : CLOSE.FORBIDDEN, closeReason(error.message))
        return
      }
      throw error
    }
    try {
      if (admitted.sdkToken) await this.options.waitFor?.(admitted.position)
    } catch (error) {
      // recorded connected, but not let in: the disconnect is recorded (else it shows online with no
      // connection) and the socket closed, so the device registers afresh
      connection.socket.close(1011, 'registration failed; connect again')
      await this.record(admitted.deviceId, { type: 'DisconnectDevice', reason: `registration failed: ${(error as Error).message}`, at: this.now().toISOString(), connectedAt: at })
      throw error
    }
    const barred = this.barred.get(admitted.deviceId)
    if (barred || connection.socket.readyState !== connection.socket.OPEN) {
      // banned while it was being let in, or it left meanwhile: the connection just recorded ends here
      if (barred) connection.socket.close(CLOSE.FORBIDDEN, closeReason(barred))
      await this.record(admitted.deviceId, { type: 'DisconnectDevice', reason: barred ?? 'socket closed', at: this.now().toISOString(), connectedAt: at })
      return
    }
    this.connected(connection, frame, admitted, at)
  }

  /** The device is in: its slot (with the asserted instance type), the scheduler and the training coordinator. */
  private connected(connection: Connection, frame: Extract<DeviceFrame, { type: 'register' }>, admitted: Admitted, at: string): void {
    const { deviceId, instanceType } = admitted
    const previous = this.byDevice.get(deviceId)
    connection.deviceId = deviceId
    connection.connectedAt = at
    this.byDevice.set(deviceId, connection)
    if (previous) previous.socket.close(CLOSE.REPLACED, 'the device connected again')
    connection.lastHeartbeat = connection.lastPong = Date.now()
    connection.slot = {
      deviceId,
      formats: frame.capabilities.formats,
      gpu: frame.capabilities.gpu,
      maxConcurrent: frame.capabilities.max_concurrent_tasks,
      maxBatchInputs: frame.capabilities.max_batch_inputs,
      sdkUuid: frame.sdk_uuid,
      instanceType,
      contributor: admitted.contributor,
      cpuCores: frame.hardware.cpu_cores,
      gpuCount: frame.hardware.gpus.length,
      leases: new Set(),
      draining: false,
      quarantined: admitted.quarantined,
      load: 0,
      send: (task) => this.send(connection, task),
    }
    this.send(connection, { type: 'registered', protocol: PROTOCOL_VERSION, device_id: deviceId, heartbeat_interval_ms: this.heartbeatIntervalMs, ...(admitted.sdkToken ? { sdk_token: admitted.sdkToken } : {}) })
    this.options.scheduler.deviceConnected(connection.slot)
    if (frame.capabilities.can_train && this.options.training) {
      connection.trainingDevice = {
        deviceId,
        platform: frame.platform,
        sdkVersion: frame.sdk_version,
        gpu: frame.capabilities.gpu,
        instanceType,
        sdkUuid: frame.sdk_uuid,
        trainFormats: trainFormatsOf(frame.capabilities),
        send: (f) => (this.byDevice.get(deviceId) === connection ? this.send(connection, f) : false),
      }
      // a quarantined device is not offered to training until it is released
      if (!admitted.quarantined) this.options.training.deviceConnected(connection.trainingDevice)
    }
  }

  private training(): TrainingCoordinator {
    if (!this.options.training) throw new DomainError('NOT_SUPPORTED', 'this hub runs no training')
    return this.options.training
  }

  private heartbeat(connection: Connection, frame: Extract<DeviceFrame, { type: 'heartbeat' }>): void {
    const deviceId = connection.deviceId!
    const now = Date.now()
    const verdict = connection.limiter.heartbeat(now)
    if (verdict !== 'accept') {
      this.droppedHeartbeats++
      if (verdict === 'close') this.shut(connection, CLOSE.RATE_LIMITED, `too many heartbeats (${connection.limiter.dropped} over ${this.limits.heartbeatsPerInterval} per interval dropped)`)
      return
    }
    connection.lastHeartbeat = now
    this.options.scheduler.heartbeat(deviceId, frame.leases, frame.load)
    // liveness and leases above on every accepted heartbeat; the log gets at most about one per interval
    if (!connection.limiter.store(now)) return
    const at = this.now().toISOString()
    const data = { device_id: deviceId, load: frame.load, memory_used_mb: frame.memory_used_mb, power_watts: frame.power_watts, at }
    // a fact with nothing to decide: appended without reading the stream, group-committed with the rest
    this.options.store
      .append(heartbeatStream(deviceId), [{ type: 'HeartbeatReceived', data, metadata: { occurredAt: at, schemaVersion: 1 } }])
      .catch((error: Error) => this.options.log?.(`hub: heartbeat of ${deviceId} not stored: ${error.message}`))
  }

  /** `returnAll`: the platform removed it (a ban, a revoked token): every lease returns without using an attempt. */
  private async disconnected(connection: Connection, reason: string, options: { returnAll?: boolean } = {}): Promise<void> {
    const deviceId = connection.deviceId
    if (this.closing || !deviceId || this.byDevice.get(deviceId) !== connection) return // shutting down, never registered, or replaced
    this.byDevice.delete(deviceId)
    const at = this.now().toISOString()
    // All three start now, before the device can connect again: a part that started after the others'
    // appends would take a new connection for the old one (the training coordinator dropped the device
    // that had come back). The disconnect names the connection it ends, so a reconnect recorded first
    // stays the device's state.
    const parts = await Promise.allSettled([
      this.options.scheduler.deviceLost(deviceId, `device disconnected (${reason})`, options),
      this.options.training?.deviceLost(deviceId),
      handleCommand(this.options.store, deviceStream(deviceId), deviceDecider, { type: 'DisconnectDevice', reason, at, ...(connection.connectedAt ? { connectedAt: connection.connectedAt } : {}) }, { metadata: { occurredAt: at } }),
    ])
    for (const part of parts) if (part.status === 'rejected') this.options.log?.(`hub: recording the disconnect of ${deviceId}: ${(part.reason as Error).message}`)
  }

  /**
   * Each slice of an interval, a slice of the sockets: ping each; end those that sent no heartbeat, or
   * answered none of the pings, for three intervals. Time the hub itself was held up (a late tick:
   * a blocked event loop, a starved process) does not count against the devices: what they sent meanwhile
   * may be waiting unread in the sockets.
   */
  private watch(): void {
    const now = Date.now()
    const stalled = now - this.lastWatch - this.watchEveryMs
    this.lastWatch = now
    if (stalled > this.watchEveryMs) {
      for (const connection of this.byDevice.values()) {
        connection.lastHeartbeat += stalled
        connection.lastPong += stalled
      }
    }
    if (this.watchRound.length === 0) this.watchRound = [...this.byDevice.values()]
    const slice = this.watchRound.splice(0, Math.ceil(this.byDevice.size / WATCH_SLICES))
    const deadline = now - 3 * this.heartbeatIntervalMs
    for (const connection of slice) {
      if (this.byDevice.get(connection.deviceId!) !== connection) continue // gone since the round began
      if (connection.lastHeartbeat < deadline) {
        connection.socket.close(CLOSE.TIMEOUT, 'missed heartbeats')
        void this.disconnected(connection, 'missed heartbeats')
        continue
      }
      if (connection.lastPong < deadline) {
        connection.socket.terminate()
        void this.disconnected(connection, 'no answer to ping')
        continue
      }
      connection.socket.ping()
    }
  }

  private send(connection: Connection, frame: HubFrame): boolean {
    if (connection.socket.readyState !== connection.socket.OPEN) return false
    sendText(connection.socket, JSON.stringify(frame))
    return true
  }
}

/** Which output of a result frame holds a value a float32 tensor cannot (null for NaN or Infinity, beyond float32), and where. */
function outputsProblem(frame: object): string | undefined {
  const { output, outputs } = frame as { output?: unknown; outputs?: unknown }
  const list: unknown[] = Array.isArray(outputs) ? outputs : output !== undefined ? [output] : []
  for (let i = 0; i < list.length; i++) {
    const data = (list[i] as { data?: unknown } | null)?.data
    const problem = numberArrayProblem(data, { float32: true })
    if (problem) return `output ${i}: ${problem}`
  }
  return undefined
}
