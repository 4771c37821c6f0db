import { TrainerError } from './errors.js'

/** mulberry32: a tiny, fast 32-bit PRNG, plenty for synthetic data; the same seed gives the same sequence. */
export class Random {
  private state: number
  /** Box-Muller makes normals in pairs: the second waits here (NaN: none). */
  private spare = Number.NaN

  constructor(seed: number) {
    this.state = seed >>> 0
  }

  /** Uniform in [0, 1). */
  next(): number {
    let t = (this.state = (this.state + 0x6d2b79f5) | 0)
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }

  /** An integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n)
  }

  /** Standard normal, by Box-Muller. */
  normal(): number {
    if (!Number.isNaN(this.spare)) {
      const spare = this.spare
      this.spare = Number.NaN
      return spare
    }
    const radius = Math.sqrt(-2 * Math.log(1 - this.next())) // 1 - u is in (0, 1]: no log(0)
    const angle = 2 * Math.PI * this.next()
    this.spare = radius * Math.sin(angle)
    return radius * Math.cos(angle)
  }
}

/** One 32-bit seed from several safe integers (all 53 bits of each count), mixed so that near seeds give unrelated streams. */
export function mixSeeds(...seeds: number[]): number {
  let h = 0x811c9dc5
  for (const seed of seeds) {
    if (!Number.isSafeInteger(seed)) throw new TrainerError(`a seed must be a safe integer, got ${seed}`)
    for (const word of [seed >>> 0, Math.floor(seed / 2 ** 32) >>> 0]) {
      h = Math.imul(h ^ word, 0x9e3779b1)
      h ^= h >>> 16
    }
  }
  // murmur3's finalizer
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b)
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35)
  return (h ^ (h >>> 16)) >>> 0
}
