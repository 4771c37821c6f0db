/** The Node.js device SDK: run `new DeviceWorker({ server }).start()` to turn this machine into a dcp device. */
export { backoffDelay, DeviceWorker, type DeviceWorkerEvents, type DeviceWorkerOptions, SDK_VERSION } from './worker.js'
export { estimatePowerWatts } from './machine.js'
export type { LogLevel, LogSink } from './log.js'
export type { TaskResultFrame } from './task.js'
