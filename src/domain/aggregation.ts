import { mixAsync, type MixOptions, type Weights, weightedAverage, WeightsError } from './fedavg.js'

/**
 * Robust aggregation of a round's updates, pure. Contributed devices may lie, so besides FedAvg's
 * sample-weighted mean (fedavg.ts) a round can be aggregated coordinate by coordinate with a trimmed mean or
 * a median, where each device has one vote whatever samples it claims, and each update's change from the
 * round's base weights can be clipped to a norm bound first. See docs/training.md#robust-aggregation.
 */
export const AGGREGATIONS = ['fedavg', 'trimmed_mean', 'median'] as const
export type Aggregation = (typeof AGGREGATIONS)[number]

/** How a job's rounds are aggregated, as its spec resolves them (see `robustnessOf` in training-job.ts). */
export interface Robustness {
  aggregation: Aggregation
  /** trimmed_mean: share of the updates dropped from each side of every coordinate. */
  trim_fraction: number
  /** A fixed bound on the L2 norm of an update's change from the base weights; null: none. */
  clip_norm: number | null
  /** An adaptive bound: this multiple of the median change norm (of the round; async: of recent updates); null: none. */
  clip_factor: number | null
}

/** L2 norm of `update − base` over every tensor (in float64). */
export function deltaNorm(base: Weights, update: Weights): number {
  let sum = 0
  for (const name of Object.keys(base)) {
    const b = base[name]!
    const u = update[name]!
    for (let k = 0; k < b.length; k++) {
      const d = u[k]! - b[k]!
      sum += d * d
    }
  }
  return Math.sqrt(sum)
}

/** The update with its change from `base` scaled down to norm `bound` when it is longer (else the update itself). */
export function clipToNorm(base: Weights, update: Weights, norm: number, bound: number): Weights {
  if (!(norm > bound)) return update
  const scale = bound / norm
  return mapNames(base, (name) => {
    const b = base[name]!
    const u = update[name]!
    return Float32Array.from(b, (v, k) => v + (u[k]! - v) * scale)
  })
}

/** The clip bound of a set of change norms: the smaller of the fixed bound and the factor times their median; null when neither applies. */
export function clipBound(norms: number[], rule: Pick<Robustness, 'clip_norm' | 'clip_factor'>): number | null {
  const adaptive = rule.clip_factor !== null && norms.length > 0 ? rule.clip_factor * medianOf([...norms]) : null
  if (adaptive === null) return rule.clip_norm
  return rule.clip_norm === null ? adaptive : Math.min(rule.clip_norm, adaptive)
}

/**
 * How many values trimmed_mean drops from each side of n: ceil(trim_fraction · n), but never so many that
 * none is left (at most (n − 1) / 2). With the default 0.2: none of 1 or 2, one of 3 to 5, two of 6 to 10.
 */
export function trimCount(n: number, trimFraction: number): number {
  if (!(trimFraction >= 0 && trimFraction < 0.5)) throw new WeightsError(`trim_fraction must be in [0, 0.5), got ${trimFraction}`)
  return Math.min(Math.floor((n - 1) / 2), Math.ceil(trimFraction * n - 1e-9))
}

/** Coordinate-wise mean of the values left after dropping the `trim` lowest and `trim` highest of each coordinate. */
export function trimmedMean(updates: Weights[], trimFraction: number): Weights {
  const trim = trimCount(updates.length, trimFraction)
  return coordinateWise(updates, (values) => {
    let sum = 0
    for (let i = trim; i < values.length - trim; i++) sum += values[i]!
    return sum / (values.length - 2 * trim)
  })
}

/** Coordinate-wise median (the mean of the middle two of an even count). */
export function median(updates: Weights[]): Weights {
  return coordinateWise(updates, medianOfSorted)
}

export interface AggregateResult {
  weights: Weights
  /** The bound every update's change was clipped to (null: no clipping). */
  clipBound: number | null
  /** Per update, in order: the norm of its change from the base weights before clipping, and whether it was clipped. */
  norms: number[]
  clipped: boolean[]
}

/**
 * A sync round: clip each update's change from `base` (the bound from this round's norms), then aggregate by
 * the rule. fedavg weighs by samples (which the caller has capped); the robust rules give every update one vote.
 */
export function aggregate(base: Weights, updates: Array<{ weights: Weights; samples: number }>, rule: Robustness): AggregateResult {
  if (updates.length === 0) throw new WeightsError('no updates to aggregate')
  const norms = updates.map((u) => deltaNorm(base, u.weights))
  const bound = clipBound(norms, rule)
  const clipped = norms.map((n) => bound !== null && n > bound)
  const kept = updates.map((u, i) => (clipped[i] ? clipToNorm(base, u.weights, norms[i]!, bound!) : u.weights))
  return { weights: combine(rule, kept, updates.map((u) => u.samples)), clipBound: bound, norms, clipped }
}

/** Async mode, robust rules: the most of the way a single update may move the job's weights. */
export const ROBUST_ASYNC_MAX_MIX = 0.5
/** Async mode: the adaptive clip bound is taken over this many recent update norms (the current one included). */
export const ASYNC_NORM_WINDOW = 10

/**
 * Async mode: clip the update's change from the job's weights (the bound from the recent updates' norms and
 * its own), then mix it in as FedAsync does, its mixing weight capped at ROBUST_ASYNC_MAX_MIX for the robust
 * rules. So one update moves the weights by at most maxMix × bound.
 */
export function mixRobust(global: Weights, update: Weights, options: MixOptions & { rule: Robustness; recentNorms: number[] }) {
  const { rule, recentNorms, ...mix } = options
  const norm = deltaNorm(global, update)
  const bound = clipBound([...recentNorms.slice(-(ASYNC_NORM_WINDOW - 1)), norm], rule)
  const clipped = bound !== null && norm > bound
  const alpha = Math.min(mix.alpha ?? 0.5, rule.aggregation === 'fedavg' ? 1 : ROBUST_ASYNC_MAX_MIX)
  const mixed = mixAsync(global, clipped ? clipToNorm(global, update, norm, bound!) : update, { ...mix, alpha })
  return { ...mixed, norm, clipBound: bound, clipped }
}

function combine(rule: Robustness, updates: Weights[], samples: number[]): Weights {
  switch (rule.aggregation) {
    case 'fedavg':
      return weightedAverage(updates.map((weights, i) => ({ weights, samples: samples[i]! })))
    case 'trimmed_mean':
      return trimmedMean(updates, rule.trim_fraction)
    case 'median':
      return median(updates)
    default: {
      const unknown: never = rule.aggregation
      throw new Error(`unknown aggregation ${String(unknown)}`)
    }
  }
}

/** Applies `f` to the sorted values of each coordinate across the updates. */
function coordinateWise(updates: Weights[], f: (sorted: Float64Array) => number): Weights {
  const [first] = updates
  if (!first) throw new WeightsError('no updates to aggregate')
  const column = new Float64Array(updates.length)
  return mapNames(first, (name) => {
    const out = new Float32Array(first[name]!.length)
    for (let k = 0; k < out.length; k++) {
      updates.forEach((u, i) => (column[i] = u[name]![k]!))
      column.sort()
      out[k] = f(column)
    }
    return out
  })
}

function medianOfSorted(sorted: ArrayLike<number>): number {
  const mid = sorted.length >> 1
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2
}

export function medianOf(values: number[]): number {
  if (values.length === 0) throw new WeightsError('no values')
  return medianOfSorted(values.slice().sort((a, b) => a - b))
}

function mapNames(like: Weights, f: (name: string) => Float32Array): Weights {
  return Object.fromEntries(Object.keys(like).sort().map((name) => [name, f(name)]))
}
