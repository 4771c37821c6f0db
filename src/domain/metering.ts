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
