import { z } from 'zod'
import { DomainError } from '../domain/errors.js'
import { LOG_LEVELS, LogLine } from '../protocol/frames.js'
import { findDevice } from '../projections/devices.js'
import { ownersOf } from '../projections/owners.js'
import type { Services } from './context.js'
import { wholeNumber } from './pagination.js'

/** `GET /devices/:id/logs` and `GET /admin/devices/:id/logs` take the same query. */
export const LogsQuery = z.object({
  lines: wholeNumber(1, 10_000).default(100).describe('lines the device sends (default 100); a customer sees those of them about its own work'),
  level: z.enum(['all', ...LOG_LEVELS]).default('all'),
  timeout: wholeNumber(100, 120_000).default(30_000).describe('ms to wait for the device (default 30000)'),
})

/** What both logs routes answer. */
export const DeviceLogs = z.object({ device_id: z.string(), lines: z.array(LogLine).describe('oldest first, as the device sent them') })

/**
 * A device's recent log lines, asked over its socket: every line for the admin (`customerId` null), only the
 * lines about its own work for a customer (see linesFor).
 */
export async function deviceLogs(services: Services, deviceId: string, query: z.infer<typeof LogsQuery>, customerId: string | null) {
  const device = await findDevice(services.db, deviceId)
  if (!device) throw new DomainError('NOT_FOUND', `device ${deviceId} not found`)
  const lines = await services.hub.requestLogs(device.id, { lines: query.lines, level: query.level, timeoutMs: query.timeout })
  if (customerId === null) return { device_id: device.id, lines }
  return { device_id: device.id, lines: linesFor(customerId, lines, await ownersOf(services.db, idsInLines(lines))) }
}

/**
 * The dcp ids a log line names: jobs (`infer_`, `batch_`, `train_`; a task id is its job's id and `-<n>`, so it
 * counts as its job), models (`model_`), projects (`proj_`, and batch jobs' `batch_<ms>` projects) and
 * datasets (`ds_`). Ids are six or more lowercase letters and digits after the prefix, so words such as
 * `model_id` are not taken for one.
 */
const DCP_ID = /\b(?:infer|batch|train|model|proj|ds)_[a-z0-9]{6,}(?:_[a-z0-9]+)?(?=$|[^a-z0-9_])/g

export function dcpIdsIn(message: string): string[] {
  return [...new Set(message.match(DCP_ID) ?? [])]
}

/**
 * A device's log lines as one customer may see them: only lines about its own work, that is lines naming at
 * least one dcp id and only ids it owns (`owners`: id -> customer). A line naming no id at all is hidden too:
 * device-level lines (connection errors, hub errors, runtime warnings) may carry another customer's details
 * in their text, and the device is shared. The admin route shows every line.
 */
export function linesFor(customerId: string, lines: readonly LogLine[], owners: ReadonlyMap<string, string>): LogLine[] {
  return lines.filter((line) => {
    const ids = dcpIdsIn(line.message)
    return ids.length > 0 && ids.every((id) => owners.get(id) === customerId)
  })
}

/** Every dcp id the lines name, to look up their owners once. */
export function idsInLines(lines: readonly LogLine[]): string[] {
  return [...new Set(lines.flatMap((line) => dcpIdsIn(line.message)))]
}
