import { randomUUID } from 'node:crypto'
import type { IncomingMessage, Server } from 'node:http'
import type { Duplex } from 'node:stream'
import { type WebSocket, WebSocketServer } from 'ws'
import { handleCommand } from '../commands/handle-command.js'
import type { DeviceSlot, TaskScheduler } from '../commands/scheduler.js'
import type { TrainingCoordinator } from '../commands/training.js'
import { type DeviceDescription, deviceDecider, deviceStream, heartbeatStream } from '../domain/device.js'
import { DomainError } from '../domain/errors.js'
import type { EventStore, Position } from '../event-store/port.js'
import { NUL_MESSAGE, nulField } from '../event-store/storable.js'
import { sameSecret, sha256 } from '../http/auth.js'
import { newId, newSecret } from '../http/ids.js'
import { CLOSE, DeviceFrame, type HubFrame, type LogLine, MAX_FRAME_BYTES, PROTOCOL_VERSION } from '../protocol/frames.js'
import { sendText } from '../protocol/send.js'

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
  /** Required in `register` when set (production); development leaves enrollment open. */
  enrollmentSecret?: string
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
}

export class DeviceOfflineError extends DomainError {
  constructor(deviceId: string) {
    super('DEVICE_OFFLINE', `device ${deviceId} is not connected`)
  }
}

/**
 * The WebSocket server devices connect to (`/api/v1/devices/connect`): registration and SDK tokens,
 * heartbeats (each one an event), task frames to and from the scheduler, log pulls. Every frame is checked
 * against src/protocol/frames.ts; a bad one gets an error frame, too many close the socket, none crashes
 * the hub.
 */
export class DeviceHub {
  private readonly wss: WebSocketServer
  /** The live connection of each registered device. */
  private readonly byDevice = new Map<string, Connection>()
  private readonly pendingLogs = new Map<string, { deviceId: string; resolve: (lines: LogLine[]) => void }>()
  private readonly timer: NodeJS.Timeout
  private watchRound: Connection[] = []
  private readonly watchEveryMs: number
  private lastWatch = Date.now()
  private closing = false
  readonly heartbeatIntervalMs: number
  private readonly now: () => Date

  constructor(private readonly options: HubOptions) {
    this.heartbeatIntervalMs = options.heartbeatIntervalMs ?? 5000
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

  /** Is a device connected (and not draining) that can run this model format? */
  hasCapableDevice(format: string): boolean {
    for (const connection of this.byDevice.values()) {
      if (connection.slot && !connection.slot.draining && connection.slot.formats.includes(format)) return true
    }
    return false
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
      if (!slot || slot.draining || !slot.formats.includes(format)) continue
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

  /** Closes every socket. Their disconnects are not recorded: the next start marks the devices offline. */
  async close(): Promise<void> {
    this.closing = true
    clearInterval(this.timer)
    for (const client of this.wss.clients) client.close(1001, 'server shutting down')
    await new Promise<void>((resolve) => this.wss.close(() => resolve()))
  }

  private accept(socket: WebSocket): void {
    const connection: Connection = { socket, lastHeartbeat: Date.now(), lastPong: Date.now(), malformed: 0 }
    const registerTimer = setTimeout(() => {
      if (!connection.deviceId) socket.close(CLOSE.TIMEOUT, 'register first')
    }, this.options.registerTimeoutMs ?? 10_000)
    socket.on('pong', () => (connection.lastPong = Date.now()))
    socket.on('message', (raw, isBinary) => void this.receive(connection, raw as Buffer, isBinary))
    socket.on('error', () => {}) // a protocol error (e.g. an oversized frame) closes the socket; 'close' follows
    socket.on('close', () => {
      clearTimeout(registerTimer)
      void this.disconnected(connection, 'socket closed')
    })
  }

  private async receive(connection: Connection, raw: Buffer, isBinary: boolean): Promise<void> {
    let frame: DeviceFrame
    try {
      if (isBinary) throw new Error('frames are JSON text')
      const parsed = DeviceFrame.safeParse(JSON.parse(raw.toString('utf8')))
      if (!parsed.success) throw new Error(parsed.error.issues.map((i) => `${i.path.join('.') || 'frame'}: ${i.message}`).join('; '))
      // a device's log lines are passed on, never stored: they may hold anything JSON can
      const nul = parsed.data.type === 'logs' ? undefined : nulField(parsed.data, 'frame')
      if (nul) throw new Error(`${nul}: ${NUL_MESSAGE}`)
      frame = parsed.data
    } catch (error) {
      return this.malformed(connection, `invalid frame: ${(error as Error).message}`)
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
    const describe = (deviceId: string): DeviceDescription => ({
      device_id: deviceId,
      platform: frame.platform,
      sdk_version: frame.sdk_version,
      sdk_uuid: frame.sdk_uuid,
      instance_type: frame.instance_type,
      hardware: frame.hardware,
      capabilities: frame.capabilities,
    })
    let deviceId = frame.device_id
    let token: string | undefined
    const returning = deviceId !== undefined && frame.sdk_token !== undefined && (await this.options.store.readStream(deviceStream(deviceId!), { maxCount: 1 })).length > 0
    if (returning) {
      try {
        await handleCommand(this.options.store, deviceStream(deviceId!), deviceDecider, { type: 'ConnectDevice', device: describe(deviceId!), tokenHash: sha256(frame.sdk_token!), at }, { metadata: { occurredAt: at } })
      } catch (error) {
        if (error instanceof DomainError && error.code === 'AUTH_INVALID') {
          connection.socket.close(CLOSE.UNAUTHORIZED, 'wrong SDK token for this device')
          return
        }
        throw error
      }
    } else {
      const secret = this.options.enrollmentSecret
      if (secret && !(frame.enrollment_secret && sameSecret(frame.enrollment_secret, secret))) {
        connection.socket.close(CLOSE.UNAUTHORIZED, 'enrollment secret missing or wrong')
        return
      }
      deviceId = newId('dev')
      token = newSecret('dcp_s_')
      const registered = await handleCommand(this.options.store, deviceStream(deviceId), deviceDecider, { type: 'RegisterDevice', device: describe(deviceId), tokenHash: sha256(token), at }, { metadata: { occurredAt: at } })
      await this.options.waitFor?.(registered.position)
    }
    const previous = this.byDevice.get(deviceId!)
    connection.deviceId = deviceId!
    connection.connectedAt = at
    this.byDevice.set(deviceId!, connection)
    if (previous) previous.socket.close(CLOSE.REPLACED, 'the device connected again')
    connection.lastHeartbeat = connection.lastPong = Date.now()
    connection.slot = {
      deviceId: deviceId!,
      formats: frame.capabilities.formats,
      gpu: frame.capabilities.gpu,
      maxConcurrent: frame.capabilities.max_concurrent_tasks,
      maxBatchInputs: frame.capabilities.max_batch_inputs,
      sdkUuid: frame.sdk_uuid,
      instanceType: frame.instance_type,
      cpuCores: frame.hardware.cpu_cores,
      gpuCount: frame.hardware.gpus.length,
      leases: new Set(),
      draining: false,
      load: 0,
      send: (task) => this.send(connection, task),
    }
    this.send(connection, { type: 'registered', protocol: PROTOCOL_VERSION, device_id: deviceId!, heartbeat_interval_ms: this.heartbeatIntervalMs, ...(token ? { sdk_token: token } : {}) })
    this.options.scheduler.deviceConnected(connection.slot)
    if (frame.capabilities.can_train && this.options.training) {
      const slot = connection.slot
      this.options.training.deviceConnected({
        deviceId: deviceId!,
        platform: frame.platform,
        sdkVersion: frame.sdk_version,
        gpu: frame.capabilities.gpu,
        instanceType: frame.instance_type,
        sdkUuid: frame.sdk_uuid,
        send: (f) => (this.byDevice.get(slot.deviceId) === connection ? this.send(connection, f) : false),
      })
    }
  }

  private training(): TrainingCoordinator {
    if (!this.options.training) throw new DomainError('NOT_SUPPORTED', 'this hub runs no training')
    return this.options.training
  }

  private heartbeat(connection: Connection, frame: Extract<DeviceFrame, { type: 'heartbeat' }>): void {
    const deviceId = connection.deviceId!
    connection.lastHeartbeat = Date.now()
    this.options.scheduler.heartbeat(deviceId, frame.leases, frame.load)
    const at = this.now().toISOString()
    const data = { device_id: deviceId, load: frame.load, memory_used_mb: frame.memory_used_mb, power_watts: frame.power_watts, at }
    // a fact with nothing to decide: appended without reading the stream, group-committed with the rest
    this.options.store
      .append(heartbeatStream(deviceId), [{ type: 'HeartbeatReceived', data, metadata: { occurredAt: at, schemaVersion: 1 } }])
      .catch((error: Error) => this.options.log?.(`hub: heartbeat of ${deviceId} not stored: ${error.message}`))
  }

  private async disconnected(connection: Connection, reason: string): Promise<void> {
    const deviceId = connection.deviceId
    if (this.closing || !deviceId || this.byDevice.get(deviceId) !== connection) return // shutting down, never registered, or replaced
    this.byDevice.delete(deviceId)
    const at = this.now().toISOString()
    // All three start now, before the device can connect again: a part that started after the others'
    // appends would take a new connection for the old one (the training coordinator dropped the device
    // that had come back). The disconnect names the connection it ends, so a reconnect recorded first
    // stays the device's state.
    const parts = await Promise.allSettled([
      this.options.scheduler.deviceLost(deviceId, `device disconnected (${reason})`),
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
