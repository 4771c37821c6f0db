import { TrainerError } from './errors.js'
import type { Parameter } from './graph.js'

export type OptimizerKind = 'sgd' | 'adam'

/** What an optimizer updates: the model's parameters, and how often its weights were replaced from outside. */
export interface Optimizable {
  readonly parameters: readonly Parameter[]
  readonly weightsVersion: number
}

export interface Optimizer {
  readonly kind: OptimizerKind
  readonly learningRate: number
  /** Moves every parameter against its gradient (as the last backward left it). */
  step(model: Optimizable): void
  /**
   * Forgets the state (Adam's moments and step count). It happens by itself when the optimizer is stepped on
   * another model, or on one whose weights were replaced since (setWeights: a new federated round).
   */
  reset(): void
}

export function createOptimizer(kind: OptimizerKind, learningRate: number): Optimizer {
  if (!(learningRate > 0) || !Number.isFinite(learningRate)) throw new TrainerError(`the learning rate must be a positive number, got ${learningRate}`)
  switch (kind) {
    case 'sgd':
      return sgd(learningRate)
    case 'adam':
      return adam(learningRate)
    default: {
      const unknown: never = kind
      throw new TrainerError(`unknown optimizer ${unknown}`)
    }
  }
}

/** Plain SGD: w -= lr * g. */
function sgd(learningRate: number): Optimizer {
  return {
    kind: 'sgd',
    learningRate,
    step(model) {
      for (const { values, gradient } of model.parameters) {
        for (let i = 0; i < values.length; i++) values[i]! -= learningRate * gradient[i]!
      }
    },
    reset() {},
  }
}

export const ADAM = { beta1: 0.9, beta2: 0.999, epsilon: 1e-8 } as const

/** Adam (Kingma & Ba) with bias correction, so that the first step moves each weight by about lr * sign(g). */
function adam(learningRate: number): Optimizer {
  const { beta1, beta2, epsilon } = ADAM
  let moments = new Map<string, { m: Float32Array; v: Float32Array }>()
  let t = 0
  let owner: { model: Optimizable; version: number } | null = null
  const reset = () => {
    moments = new Map()
    t = 0
    owner = null
  }
  return {
    kind: 'adam',
    learningRate,
    reset,
    step(model) {
      if (owner && (owner.model !== model || owner.version !== model.weightsVersion)) reset()
      owner = { model, version: model.weightsVersion }
      t++
      // The bias corrections fold into the step size: lr * sqrt(1 - b2^t) / (1 - b1^t), eps scaled to match.
      const c1 = 1 - beta1 ** t
      const c2 = Math.sqrt(1 - beta2 ** t)
      const rate = (learningRate * c2) / c1
      const eps = epsilon * c2
      for (const { name, values, gradient } of model.parameters) {
        let state = moments.get(name)
        if (!state) moments.set(name, (state = { m: new Float32Array(values.length), v: new Float32Array(values.length) }))
        const { m, v } = state
        for (let i = 0; i < values.length; i++) {
          const g = gradient[i]!
          m[i] = beta1 * m[i]! + (1 - beta1) * g
          v[i] = beta2 * v[i]! + (1 - beta2) * g * g
          values[i]! -= (rate * m[i]!) / (Math.sqrt(v[i]!) + eps)
        }
      }
    },
  }
}
