import { TrainerError } from './errors.js'
import type { TrainableModel } from './graph.js'
import type { Labels } from './loss.js'
import { mixSeeds, Random } from './random.js'
import { defaultLoss } from './train.js'

/**
 * A synthetic, learnable task that fits a model's input and output sizes, for federated training without
 * real data (benchmarks, demos, tests). Everything follows from the seeds: the same task seed and stream
 * seed give the same samples, on any device.
 *
 * - classification (`outputs` classes): Gaussian clusters. Class c has a fixed center in the input space,
 *   drawn from the task seed and redrawn (wider) until every two centers are at least `separation` apart; a
 *   sample is a uniformly drawn class, and its center plus standard normal noise on every input. At the
 *   default separation of 4 noise deviations every other center is at least 2 deviations past the midpoint
 *   (at most 2.3% of a class falls on its side) and most are further: the best possible accuracy is
 *   typically 97% or more, and a 2-layer MLP gets past 90% within a few hundred samples.
 * - regression: inputs standard normal, targets = x · W + b with W [inputs, outputs] drawn N(0, 1/inputs)
 *   and b drawn N(0, 0.25) from the task seed, without noise: targets are about unit-sized and a linear map
 *   fits them exactly.
 */
export interface SyntheticTaskOptions {
  inputs: number
  outputs: number
  seed: number
  /** Default: classification, or regression when `outputs` is 1. */
  kind?: 'classification' | 'regression'
  /** Classification: the least distance between two class centers, in noise standard deviations. Default 4. */
  separation?: number
  /**
   * Classification: clusters per class (default 1). With more than one, each class is a union of clusters
   * scattered among the other classes' clusters: no longer linearly separable, so harder to learn.
   */
  clustersPerClass?: number
}

/** `count` samples: x is [count, inputs]; labels are class indices (Int32Array) or targets [count, outputs] (Float32Array). */
export interface SyntheticSample {
  count: number
  x: Float32Array
  labels: Labels
}

export interface SyntheticTask {
  readonly kind: 'classification' | 'regression'
  readonly inputs: number
  readonly outputs: number
  /** The samples of stream `streamSeed` (one per device, say); a longer draw starts with the shorter one. */
  sample(count: number, streamSeed: number): SyntheticSample
  /** Held-out samples from a fixed seed of their own, the same for every device. */
  validationSet(count: number): SyntheticSample
}

const SALT = { centers: 0x43454e54, streams: 0x5354524d, validation: 0x56414c49 } as const

export function syntheticTask(options: SyntheticTaskOptions): SyntheticTask {
  const { inputs, outputs, seed } = options
  if (!Number.isInteger(inputs) || inputs < 1 || !Number.isInteger(outputs) || outputs < 1) {
    throw new TrainerError(`a synthetic task needs whole, positive input and output sizes, got ${inputs} and ${outputs}`)
  }
  const kind = options.kind ?? (outputs === 1 ? 'regression' : 'classification')
  if (kind === 'classification' && outputs < 2) throw new TrainerError('a classification task needs 2 classes or more')
  const modes = options.clustersPerClass ?? 1
  if (!Number.isInteger(modes) || modes < 1 || modes > 64) throw new TrainerError(`clustersPerClass must be a whole number from 1 to 64, got ${modes}`)
  const draw = kind === 'classification' ? clusters(inputs, outputs, modes, seed, options.separation ?? 4) : linearMap(inputs, outputs, seed)
  return {
    kind,
    inputs,
    outputs,
    sample: (count, streamSeed) => draw(count, new Random(mixSeeds(seed, SALT.streams, streamSeed))),
    validationSet: (count) => draw(count, new Random(mixSeeds(seed, SALT.validation))),
  }
}

/** The synthetic task that fits a model: its sizes, and classification when its default loss is cross-entropy. */
export function syntheticTaskFor(model: Pick<TrainableModel, 'inputSize' | 'outputSize' | 'endsInSoftmax'>, seed: number): SyntheticTask {
  const kind = defaultLoss(model) === 'cross_entropy' ? 'classification' : 'regression'
  return syntheticTask({ inputs: model.inputSize, outputs: model.outputSize, seed, kind })
}

type Draw = (count: number, random: Random) => SyntheticSample

function clusters(inputs: number, classes: number, modes: number, seed: number, separation: number): Draw {
  // cluster k of class c is center c * modes + k; with one mode per class that is the class's own center
  const centers = classCenters(inputs, classes * modes, separation, new Random(mixSeeds(seed, SALT.centers)))
  return (count, random) => {
    const x = new Float32Array(count * inputs)
    const labels = new Int32Array(count)
    for (let i = 0; i < count; i++) {
      const label = random.int(classes)
      labels[i] = label
      const c = (label * modes + (modes > 1 ? random.int(modes) : 0)) * inputs
      for (let j = 0; j < inputs; j++) x[i * inputs + j] = centers[c + j]! + random.normal()
    }
    return { count, x, labels }
  }
}

/** [classes, inputs] centers at least `separation` apart, drawn wider after every few tries that are not. */
function classCenters(inputs: number, classes: number, separation: number, random: Random): Float32Array {
  // Two N(0, s²) points in d dims are about s * sqrt(2d) apart: start where that is 1.5 separations.
  let spread = (1.5 * separation) / Math.sqrt(2 * inputs)
  for (let attempt = 1; ; attempt++) {
    const centers = new Float32Array(classes * inputs)
    for (let i = 0; i < centers.length; i++) centers[i] = spread * random.normal()
    if (minDistance(centers, classes, inputs) >= separation) return centers
    if (attempt % 10 === 0) spread *= 1.25
  }
}

function minDistance(centers: Float32Array, classes: number, inputs: number): number {
  let min = Infinity
  for (let a = 0; a < classes; a++) {
    for (let b = a + 1; b < classes; b++) {
      let sum = 0
      for (let j = 0; j < inputs; j++) sum += (centers[a * inputs + j]! - centers[b * inputs + j]!) ** 2
      min = Math.min(min, Math.sqrt(sum))
    }
  }
  return min
}

function linearMap(inputs: number, outputs: number, seed: number): Draw {
  const random = new Random(mixSeeds(seed, SALT.centers))
  const weights = Float32Array.from({ length: inputs * outputs }, () => random.normal() / Math.sqrt(inputs))
  const bias = Float32Array.from({ length: outputs }, () => 0.5 * random.normal())
  return (count, random) => {
    const x = new Float32Array(count * inputs)
    const targets = new Float32Array(count * outputs)
    for (let i = 0; i < x.length; i++) x[i] = random.normal()
    for (let i = 0; i < count; i++) {
      for (let k = 0; k < outputs; k++) {
        let sum = bias[k]!
        for (let j = 0; j < inputs; j++) sum += x[i * inputs + j]! * weights[j * outputs + k]!
        targets[i * outputs + k] = sum
      }
    }
    return { count, x, labels: targets }
  }
}
