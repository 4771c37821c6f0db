import { z } from 'zod'
import type { Metrics } from '../protocol/frames.js'

/**
 * What the server saw of an attempt: the wall time from sending the task to receiving its outcome, and the
 * cores and GPUs the device declared. A device is not trusted to report its own compute time: billed CPU
 * time is at most `wall_ms × cpu_cores`, GPU time at most `wall_ms × gpus` (docs/usage-and-audit.md).
 */
export const Observed = z.object({
  wall_ms: z.number().min(0),
  cpu_cores: z.number().int().min(1),
  gpus: z.number().int().min(0),
})
export type Observed = z.infer<typeof Observed>

/** The claim bounded by what was observed, and whether it had to be cut. Figures in whole microseconds, as usage sums them. */
export function boundMetrics(claimed: Metrics, observed: Observed): { metrics: Metrics; clamped: boolean } {
  const cpuBound = Math.floor(observed.wall_ms * observed.cpu_cores * 1000) / 1000
  const gpuBound = Math.floor(observed.wall_ms * observed.gpus * 1000) / 1000
  const cpu = Math.min(claimed.cpu_ms, cpuBound)
  const gpu = Math.min(claimed.gpu_ms, gpuBound)
  return { metrics: { ...claimed, cpu_ms: cpu, gpu_ms: gpu }, clamped: cpu < claimed.cpu_ms || gpu < claimed.gpu_ms }
}

/**
 * A part's share of a merged device task's metrics (dynamic batching): each figure split by inputs in whole
 * microseconds (bytes for bytes_in/bytes_out). Part i gets floor(total × sizes[i] / Σ sizes); what the floors
 * leave (fewer units than there are parts) goes one unit each to the first parts in dispatch order. The
 * shares always add up to the whole, and the usage projection and `dcp audit usage` replay the same split
 * from the event (docs/usage-and-audit.md).
 */
export function splitMetrics(whole: Metrics, sizes: readonly number[], index: number): Metrics {
  const inputs = sizes.reduce((a, b) => a + b, 0)
  const share = (total: number) => {
    const floors = sizes.map((n) => Math.floor((total * n) / inputs))
    const left = total - floors.reduce((a, b) => a + b, 0)
    return floors[index]! + (index < left ? 1 : 0)
  }
  const us = (ms: number) => share(Math.round(ms * 1000)) / 1000
  return { cpu_ms: us(whole.cpu_ms), gpu_ms: us(whole.gpu_ms), bytes_in: share(whole.bytes_in), bytes_out: share(whole.bytes_out) }
}
