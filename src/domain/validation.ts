import { z } from 'zod'

/**
 * Result validation by replication, as BOINC does it: a result from a contributed (`user`) device is not
 * trusted on its own. `none` delivers it as it came; `spot` runs a sampled share of a contributed device's
 * tasks again on another device (a cloud one first); `quorum` runs every task that ran on a contributed
 * device again on a device of another contributor or on a cloud device. The outputs must agree within a
 * relative tolerance; when they do not, another run decides (the majority of agreeing runs wins). A result
 * from a cloud (`aws`) device, which the platform runs, is taken as it is. docs/trust.md has the whole model.
 */
export const VALIDATION_MODES = ['none', 'spot', 'quorum'] as const
export type ValidationMode = (typeof VALIDATION_MODES)[number]

/** Defaults: no replication unless asked (it costs a second run and the latency of waiting for it). */
export const VALIDATION_DEFAULTS = {
  mode: 'none' as ValidationMode,
  /** Share of a contributed device's tasks `spot` runs again. */
  spotRate: 0.05,
  /** Outputs agree when every value is within this share of the larger of the two (plus `ABSOLUTE_FLOOR`). */
  tolerance: 1e-4,
  /** Runs of one task (the first included) before it fails for want of agreement. */
  maxRuns: 5,
}
/** Values closer than this agree whatever their size (outputs near zero differ in rounding alone). */
export const ABSOLUTE_FLOOR = 1e-6

export const ValidationPolicy = z.object({
  mode: z.enum(VALIDATION_MODES),
  spot_rate: z.number().min(0).max(1).default(VALIDATION_DEFAULTS.spotRate),
  tolerance: z.number().min(0).max(1).default(VALIDATION_DEFAULTS.tolerance),
})
export type ValidationPolicy = z.infer<typeof ValidationPolicy>

export const NO_VALIDATION: ValidationPolicy = { mode: 'none', spot_rate: VALIDATION_DEFAULTS.spotRate, tolerance: VALIDATION_DEFAULTS.tolerance }

/**
 * The policy a task runs under: the request's mode, else the project's, else the model's, else the
 * default; the tolerance is the model's (it knows its numerics) or the default.
 */
export function resolvePolicy(
  request: ValidationMode | undefined,
  project: ValidationMode | null | undefined,
  model: { mode?: ValidationMode | undefined; tolerance?: number | undefined } | null | undefined,
  spotRate = VALIDATION_DEFAULTS.spotRate,
): ValidationPolicy {
  const mode = request ?? project ?? model?.mode ?? VALIDATION_DEFAULTS.mode
  return { mode, spot_rate: spotRate, tolerance: model?.tolerance ?? VALIDATION_DEFAULTS.tolerance }
}

/** FNV-1a of the task id as a fraction in [0, 1): the same task is sampled (or not) on every replay. */
export function sampleOf(taskId: string): number {
  let hash = 0x811c9dc5
  for (let i = 0; i < taskId.length; i++) {
    hash ^= taskId.charCodeAt(i)
    hash = Math.imul(hash, 0x01000193) >>> 0
  }
  return hash / 2 ** 32
}

/** Does a result from a device of this kind need a second run before it is delivered? Why, or undefined. */
export function checkRequired(policy: ValidationPolicy, taskId: string, instanceType: 'aws' | 'user' | null): 'quorum' | 'spot' | undefined {
  if (instanceType === 'aws') return undefined
  if (policy.mode === 'quorum') return 'quorum'
  if (policy.mode === 'spot' && sampleOf(taskId) < policy.spot_rate) return 'spot'
  return undefined
}

interface Values {
  data: readonly number[]
  shape: readonly number[]
}

/** Do two runs' outputs agree: the same shapes, every value within the tolerance? */
export function outputsAgree(a: readonly Values[], b: readonly Values[], tolerance: number): boolean {
  if (a.length !== b.length) return false
  for (let i = 0; i < a.length; i++) {
    const x = a[i]!
    const y = b[i]!
    if (x.shape.length !== y.shape.length || x.shape.some((d, j) => d !== y.shape[j]) || x.data.length !== y.data.length) return false
    for (let j = 0; j < x.data.length; j++) {
      const p = x.data[j]!
      const q = y.data[j]!
      if (!(Math.abs(p - q) <= tolerance * Math.max(Math.abs(p), Math.abs(q)) + ABSOLUTE_FLOOR)) return false
    }
  }
  return true
}

/**
 * Reputation, folded from validated results: a device is quarantined once it was outvoted at least
 * `QUARANTINE.disputes` times and in more than `QUARANTINE.share` of its validated work; or once it failed at
 * least `QUARANTINE.failures` tasks that then succeeded on other devices, more than it completed.
 */
export const QUARANTINE = { disputes: 3, share: 0.2, failures: 5 }

export interface Reputation {
  validated: number
  disputed: number
  /** Attempts it failed of tasks that then completed on another device. */
  failedElsewhereOk: number
  completed: number
}

export const emptyReputation = (): Reputation => ({ validated: 0, disputed: 0, failedElsewhereOk: 0, completed: 0 })

/** Why the device should be quarantined, or undefined. */
export function quarantineReason(r: Reputation): string | undefined {
  if (r.disputed >= QUARANTINE.disputes && r.disputed > QUARANTINE.share * (r.validated + r.disputed)) {
    return `outvoted in ${r.disputed} of ${r.validated + r.disputed} validated results`
  }
  if (r.failedElsewhereOk >= QUARANTINE.failures && r.failedElsewhereOk > r.completed) {
    return `failed ${r.failedElsewhereOk} tasks that then succeeded on other devices`
  }
  return undefined
}
