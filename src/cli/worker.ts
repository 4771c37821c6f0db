import path from 'node:path'
import { INSTANCE_TYPES } from '../protocol/frames.js'
import { DeviceWorker } from '../sdk/index.js'
import { parse, UsageError, wholeNumber } from './args.js'

/** Tasks a worker runs at once unless told: one waits on the network while another runs. */
const DEFAULT_MAX_TASKS = 4

/**
 * `dcp worker --server <url>`: turns this machine into a device. Ctrl-C / SIGTERM drains (finishes the tasks it
 * holds); a second signal stops at once. Exit 0 when stopped by a signal, 1 when the hub refused it.
 */
export async function workerCommand(args: string[]): Promise<number> {
  const { values, positionals } = parse(args, {
    server: { type: 'string' },
    'instance-type': { type: 'string' },
    'state-dir': { type: 'string' },
    'max-tasks': { type: 'string' },
    threads: { type: 'string' },
    cuda: { type: 'boolean' },
    'no-train': { type: 'boolean' },
    'enrollment-secret': { type: 'string' },
    'enrollment-token': { type: 'string' },
    verbose: { type: 'boolean' },
  })
  if (positionals.length > 0) throw new UsageError(`dcp worker takes no arguments, got ${positionals.join(' ')}`)
  const server = values.server ?? process.env.DCP_SERVER
  if (!server) throw new UsageError('dcp worker needs --server <url> (or DCP_SERVER)')
  if (!isHttpUrl(server)) throw new UsageError(`--server must be an http(s) URL, got ${JSON.stringify(server)}`)
  const instanceType = values['instance-type'] ?? 'user'
  if (!(INSTANCE_TYPES as readonly string[]).includes(instanceType)) throw new UsageError(`--instance-type must be aws or user, got ${instanceType}`)
  const maxTasks = wholeNumber('max-tasks', values['max-tasks'], 1, 256) ?? DEFAULT_MAX_TASKS
  const threads = wholeNumber('threads', values.threads, 1, 256)

  const verbose = values.verbose ?? false
  const worker = new DeviceWorker({
    server,
    instanceType: instanceType as 'aws' | 'user',
    ...(values['state-dir'] ? { stateDir: path.resolve(values['state-dir']) } : {}),
    maxConcurrentTasks: maxTasks,
    ...(threads !== undefined ? { threadsPerTask: threads } : {}),
    cuda: values.cuda ?? false,
    canTrain: !(values['no-train'] ?? false),
    enrollmentSecret: values['enrollment-secret'] ?? process.env.DCP_ENROLLMENT_SECRET,
    enrollmentToken: values['enrollment-token'] ?? process.env.DCP_ENROLLMENT_TOKEN,
    // Warnings and errors always; the rest with --verbose (the hub can fetch all of it with logs_request).
    log: (line) => (verbose || line.level === 'warn' || line.level === 'error') && console.error(`${line.ts} ${line.level} ${line.message}`),
  })

  let signals = 0
  const onSignal = (signal: NodeJS.Signals) => {
    signals++
    console.error(signals === 1 ? `dcp worker: ${signal}, draining (again to stop at once)` : `dcp worker: ${signal}, stopping now`)
    void worker.stop({ drain: signals === 1 })
  }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  // Started by `dcp start` with an IPC channel: when that server process dies, even by SIGKILL, the channel
  // closes and this worker stops instead of reconnecting to nothing forever.
  const onParentGone = () => {
    console.error('dcp worker: the server that started it is gone, stopping')
    void worker.stop({ drain: false })
  }
  if (process.send) {
    if (process.connected) process.once('disconnect', onParentGone)
    else setImmediate(onParentGone) // it died while this process was still loading
  }
  try {
    await worker.start()
    console.log(`dcp worker: registered as ${worker.deviceId} with ${server}`)
    await worker.finished
    return 0
  } catch (error) {
    if (signals > 0) return 0 // stopped before it registered
    console.error(`dcp worker: ${(error as Error).message}`)
    return 1
  } finally {
    process.off('SIGINT', onSignal)
    process.off('SIGTERM', onSignal)
    process.off('disconnect', onParentGone)
    if (process.connected) process.disconnect()
  }
}

function isHttpUrl(value: string): boolean {
  try {
    const url = new URL(value)
    return url.protocol === 'http:' || url.protocol === 'https:'
  } catch {
    return false
  }
}
