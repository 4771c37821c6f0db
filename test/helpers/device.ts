import WebSocket from 'ws'
import type { TaskScheduler } from '../../src/commands/scheduler.js'
import { PROTOCOL_VERSION } from '../../src/protocol/frames.js'

export interface RegisterOptions {
  as?: { deviceId: string; sdkToken: string }
  formats?: string[]
  maxTasks?: number
  batchInputs?: number
  sdkUuid?: string
  instanceType?: 'aws' | 'user'
  enrollmentSecret?: string
  enrollmentToken?: string
  canTrain?: boolean
  /** Capabilities' `train_formats` (absent: not sent, an ONNX trainer). */
  trainFormats?: string[]
  /** Default nodejs. */
  platform?: 'nodejs' | 'python' | 'windows'
}

/** A simulated device: a real WebSocket speaking the protocol by hand, for tests that need control. */
export class SimDevice {
  readonly frames: any[] = []
  closed: { code: number; reason: string } | undefined
  deviceId = ''
  sdkToken = ''
  private waiters: { match: (f: any) => boolean; resolve: (f: any) => void }[] = []

  private constructor(readonly socket: WebSocket) {
    socket.on('message', (raw) => {
      const frame = JSON.parse(raw.toString())
      this.frames.push(frame)
      for (const w of [...this.waiters]) {
        if (w.match(frame)) {
          this.waiters.splice(this.waiters.indexOf(w), 1)
          w.resolve(frame)
        }
      }
    })
    socket.on('close', (code, reason) => (this.closed = { code, reason: reason.toString() }))
    socket.on('error', () => {})
  }

  /** `autoPong: false` makes a device that never answers the hub's pings. */
  static async connect(baseUrl: string, options: { autoPong?: boolean } = {}): Promise<SimDevice> {
    const socket = new WebSocket(`${baseUrl.replace(/^http/, 'ws')}/api/v1/devices/connect`, { autoPong: options.autoPong ?? true })
    await new Promise((resolve, reject) => {
      socket.once('open', resolve)
      socket.once('error', reject)
    })
    return new SimDevice(socket)
  }

  /** Registers (or comes back, with `as`), resolving with the `registered` frame. */
  async register(options: RegisterOptions = {}) {
    this.sendRegister(options)
    const registered = await this.next((f) => f.type === 'registered')
    this.deviceId = registered.device_id
    if (registered.sdk_token) this.sdkToken = registered.sdk_token
    return registered
  }

  /** Sends `register` and resolves with how the hub closed the socket (for registrations it refuses). */
  async refused(options: RegisterOptions = {}): Promise<{ code: number; reason: string }> {
    this.sendRegister(options)
    return this.waitClosed()
  }

  sendRegister(options: RegisterOptions = {}): void {
    this.send({
      type: 'register',
      protocol: PROTOCOL_VERSION,
      platform: options.platform ?? 'nodejs',
      sdk_version: '0.0.0-test',
      sdk_uuid: options.sdkUuid ?? 'sdk-nodejs-test01',
      instance_type: options.instanceType ?? 'user',
      hardware: { cpu_model: 'test cpu', cpu_cores: 2, memory_mb: 1024, gpus: [] },
      capabilities: { formats: options.formats ?? ['onnx'], gpu: false, can_train: options.canTrain ?? false, ...(options.trainFormats ? { train_formats: options.trainFormats } : {}), max_concurrent_tasks: options.maxTasks ?? 1, max_batch_inputs: options.batchInputs ?? 1 },
      ...(options.as ? { device_id: options.as.deviceId, sdk_token: options.as.sdkToken } : {}),
      ...(options.enrollmentSecret ? { enrollment_secret: options.enrollmentSecret } : {}),
      ...(options.enrollmentToken ? { enrollment_token: options.enrollmentToken } : {}),
    })
  }

  heartbeat(leases: string[] = [], load = 0.25): void {
    this.send({ type: 'heartbeat', load, memory_used_mb: 512, power_watts: 12.5, leases })
  }

  send(frame: unknown): void {
    this.socket.send(typeof frame === 'string' ? frame : JSON.stringify(frame))
  }

  /** The next frame (already received or still to come) that matches. */
  next(match: (frame: any) => boolean, timeoutMs = 10_000): Promise<any> {
    const seen = this.frames.find(match)
    if (seen) {
      this.frames.splice(this.frames.indexOf(seen), 1)
      return Promise.resolve(seen)
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no matching frame within ${timeoutMs} ms; got ${JSON.stringify(this.frames.slice(-3))}`)), timeoutMs)
      this.waiters.push({
        match,
        resolve: (f) => {
          clearTimeout(timer)
          this.frames.splice(this.frames.indexOf(f), 1)
          resolve(f)
        },
      })
    })
  }

  async waitClosed(timeoutMs = 10_000): Promise<{ code: number; reason: string }> {
    const deadline = Date.now() + timeoutMs
    while (!this.closed && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20))
    if (!this.closed) throw new Error('socket did not close')
    return this.closed
  }

  kill(): void {
    this.socket.terminate()
  }
}

export async function eventually<T>(check: () => Promise<T | undefined | false>, timeoutMs = 10_000, what = 'condition', intervalMs = 50): Promise<T> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = await check()
    if (value) return value
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, intervalMs))
  }
}

/**
 * History from before the platform asserted instance types: an older hub let a device come back claiming
 * another type, and its work was billed as that. This hub refuses such a device (test/device-hub/identity.test.ts),
 * so the tests of how such history is counted hand the scheduler such a slot directly, in place of the one the
 * hub gave the device (which stays connected, so the API sees a capable device). The slot answers every task
 * at once with a fixed output.
 */
export function legacySlot(scheduler: TaskScheduler, deviceId: string, instanceType: 'aws' | 'user'): void {
  scheduler.deviceConnected({
    deviceId, formats: ['onnx'], gpu: false, maxConcurrent: 1, maxBatchInputs: 1, sdkUuid: 'sdk-nodejs-test01', instanceType, leases: new Set(), draining: false, load: 0,
    send: (frame) => {
      if (frame.type === 'task') {
        const result = { type: 'task_result' as const, task_id: frame.task_id, lease_id: frame.lease_id, status: 'completed' as const, output: { data: [0.25, 0.75], shape: [1, 2] }, metrics: { cpu_ms: 2, gpu_ms: 0, bytes_in: 40, bytes_out: 8 } }
        setImmediate(() => void scheduler.result(deviceId, result))
      }
      return true
    },
  })
}

/**
 * A device that answers every task at once with [0.25, 0.75] per input (so a job completes, and is billed);
 * it sends no heartbeats: give the hub a long interval.
 */
export async function answeringDevice(url: string): Promise<SimDevice> {
  const device = await SimDevice.connect(url)
  await device.register({ maxTasks: 4, batchInputs: 8 })
  device.socket.on('message', (raw) => {
    const frame = JSON.parse(raw.toString())
    if (frame.type !== 'task') return
    const inputs = frame.inputs ?? [frame.input]
    const outputs = inputs.map(() => ({ data: [0.25, 0.75], shape: [1, 2] }))
    const metrics = { cpu_ms: 1.5, gpu_ms: 0, bytes_in: 40 * inputs.length, bytes_out: 8 * inputs.length }
    device.send({ type: 'task_result', task_id: frame.task_id, lease_id: frame.lease_id, status: 'completed', ...(frame.inputs ? { outputs } : { output: outputs[0] }), metrics })
  })
  return device
}
