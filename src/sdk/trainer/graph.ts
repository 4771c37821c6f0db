import { TrainerError, UnsupportedOperatorError } from './errors.js'
import { type Dims, type Kernel, showDims, sizeOf } from './kernel.js'
import { crossEntropy, type Labels, type LossKind, meanSquaredError } from './loss.js'
import { decodeModel, type GraphNode, parseGraph, type ParsedGraph } from './onnx-graph.js'

/** Initializer name -> values. */
export type Weights = Record<string, Float32Array>

/** A trainable weight (a float initializer). `values` and `gradient` are the model's own buffers, updated in place. */
export interface Parameter {
  readonly name: string
  readonly dims: readonly number[]
  readonly values: Float32Array
  readonly gradient: Float32Array
}

export interface TrainableModel {
  /** The ONNX bytes it was loaded from (exportOnnx writes trained weights into a copy of them). */
  readonly source: Uint8Array
  /** Floats per sample in the input, and values per sample in the output ([batch, outputSize]). */
  readonly inputSize: number
  readonly outputSize: number
  /** The graph ends in a Softmax over its outputs: cross-entropy then takes the Softmax's input as logits. */
  readonly endsInSoftmax: boolean
  readonly parameters: readonly Parameter[]
  /** Counts setWeights calls: optimizers drop their state when it moves (the weights came from elsewhere). */
  readonly weightsVersion: number
  /** The outputs for a batch (`x` holds batch × inputSize floats): a view of a buffer reused by the next call. */
  forward(x: Float32Array): Float32Array
  /**
   * Runs the batch and takes its mean loss; with `backward`, every parameter's `gradient` is then dLoss/dWeight.
   * `outputs` is a view, as forward's.
   */
  run(x: Float32Array, labels: Labels, loss: LossKind, backward: boolean): { loss: number; outputs: Float32Array }
  /** A copy of every weight. */
  getWeights(): Weights
  /** Replaces every weight (the same names and sizes as getWeights, finite values). */
  setWeights(weights: Weights): void
}

export type TrainableCheck = { ok: true } | { ok: false; operator?: string; message: string }

/** Parses an ONNX model and prepares it for training. Throws UnsupportedOperatorError or TrainerError. */
export function loadTrainable(modelBytes: Uint8Array): TrainableModel {
  return new DenseModel(modelBytes, parseGraph(decodeModel(modelBytes)))
}

/** Whether the trainer can train the model, and if not why; for a server to check a job at submission. Never throws. */
export function checkTrainable(modelBytes: Uint8Array): TrainableCheck {
  try {
    loadTrainable(modelBytes)
    return { ok: true }
  } catch (error) {
    if (error instanceof UnsupportedOperatorError) return { ok: false, operator: error.operator, message: error.message }
    if (error instanceof TrainerError) return { ok: false, message: error.message }
    return { ok: false, message: `the trainer cannot read the model: ${(error as Error).message}` }
  }
}

interface Value {
  data: Float32Array
  dims: number[]
  /** dLoss/dValue, or null where no weight feeds the value (no gradient needed). */
  grad: Float32Array | null
}

interface Step {
  kernel: Kernel
  x: Float32Array[]
  dims: Dims[]
  y: Float32Array
  dy: Float32Array | null
  gx: (Float32Array | null)[]
}

/** The buffers for one batch size, allocated once and reused by every step of that size. */
interface Plan {
  batch: number
  input: Float32Array
  output: Value
  steps: Step[]
  /** The final Softmax's step and input (the logits) when cross-entropy is fused with it. */
  softmax: { step: Step; logits: Value } | null
  activationGrads: Float32Array[]
}

/** Batch sizes whose buffers are kept: training, its last short batch, evaluation. */
const PLANS_KEPT = 4

class DenseModel implements TrainableModel {
  readonly inputSize: number
  readonly outputSize: number
  readonly endsInSoftmax: boolean
  readonly parameters: Parameter[]
  weightsVersion = 0
  private readonly needsGrad = new Set<string>()
  private readonly plans = new Map<number, Plan>()

  constructor(
    readonly source: Uint8Array,
    private readonly graph: ParsedGraph,
  ) {
    this.inputSize = sizeOf(graph.input.dims.slice(1))
    this.parameters = graph.initializers.map((i) => ({ name: i.name, dims: i.dims, values: i.data, gradient: new Float32Array(i.data.length) }))
    for (const p of this.parameters) this.needsGrad.add(p.name)
    for (const node of graph.nodes) if (node.inputs.some((i) => this.needsGrad.has(i))) this.needsGrad.add(node.output)
    this.outputSize = this.checkOutputShape()
    this.endsInSoftmax = this.finalSoftmax() !== undefined
  }

  forward(x: Float32Array): Float32Array {
    const plan = this.plan(this.batchOf(x))
    plan.input.set(x)
    for (const s of plan.steps) s.kernel.forward(s.x, s.dims, s.y)
    return plan.output.data
  }

  run(x: Float32Array, labels: Labels, loss: LossKind, backward: boolean): { loss: number; outputs: Float32Array } {
    const outputs = this.forward(x)
    const plan = this.plan(outputs.length / this.outputSize)
    if (backward) {
      for (const g of plan.activationGrads) g.fill(0)
      for (const p of this.parameters) p.gradient.fill(0)
    }
    // 1. the loss, and its gradient at the output (or at the logits, when fused with the final Softmax)
    const fused = loss === 'cross_entropy' ? plan.softmax : null
    let value: number
    if (loss === 'mse') value = meanSquaredError(outputs, labels, backward ? plan.output.grad : null)
    else if (fused) value = crossEntropy(fused.logits.data, labels, plan.batch, this.outputSize, backward ? fused.logits.grad : null)
    else value = crossEntropy(outputs, labels, plan.batch, this.outputSize, backward ? plan.output.grad : null)
    if (!backward) return { loss: value, outputs }
    // 2. back through the nodes, last first
    for (let i = plan.steps.length - 1; i >= 0; i--) {
      const s = plan.steps[i]!
      if (s.dy && s !== fused?.step) s.kernel.backward(s.x, s.dims, s.y, s.dy, s.gx)
    }
    return { loss: value, outputs }
  }

  getWeights(): Weights {
    return Object.fromEntries(this.parameters.map((p) => [p.name, Float32Array.from(p.values)]))
  }

  setWeights(weights: Weights): void {
    checkWeights(this.parameters, weights)
    for (const p of this.parameters) p.values.set(weights[p.name]!)
    this.weightsVersion++
  }

  private batchOf(x: Float32Array): number {
    const batch = x.length / this.inputSize
    if (!Number.isInteger(batch) || batch < 1) throw new TrainerError(`the input holds ${x.length} floats, not a whole batch of samples of ${this.inputSize}`)
    return batch
  }

  /** The Softmax node that computes the graph output over its last axis and feeds nothing else, if any. */
  private finalSoftmax(): GraphNode | undefined {
    const { nodes, output } = this.graph
    const last = nodes.find((n) => n.output === output)
    const axis = last?.kernel.axis
    const read = nodes.some((n) => n.inputs.includes(output))
    return last?.kernel.op === 'Softmax' && (axis === 1 || axis === -1) && !read ? last : undefined
  }

  /** The output must be [batch, outputs] whatever the batch; returns outputs. */
  private checkOutputShape(): number {
    const shapes = [2, 3].map((batch) => this.dims(batch).get(this.graph.output)!)
    const [two, three] = shapes as [number[], number[]]
    if (two.length !== 2 || two[0] !== 2 || three[0] !== 3 || two[1] !== three[1]) {
      throw new TrainerError(`the graph output must be [batch, outputs], got ${showDims(two)} for a batch of 2`)
    }
    return two[1]!
  }

  /** Every tensor's dims for a batch size: the shape check of the whole graph (throws TrainerError). */
  private dims(batch: number): Map<string, number[]> {
    const dims = new Map<string, number[]>([[this.graph.input.name, [batch, ...this.graph.input.dims.slice(1)]]])
    for (const p of this.parameters) dims.set(p.name, [...p.dims])
    for (const node of this.graph.nodes) {
      try {
        dims.set(node.output, node.kernel.outputDims(node.inputs.map((i) => dims.get(i)!)))
      } catch (error) {
        if (error instanceof TrainerError) throw new TrainerError(`node ${node.name}: ${error.message}`)
        throw error
      }
    }
    return dims
  }

  private plan(batch: number): Plan {
    let plan = this.plans.get(batch)
    if (plan) return plan
    plan = this.buildPlan(batch)
    this.plans.set(batch, plan)
    if (this.plans.size > PLANS_KEPT) this.plans.delete(this.plans.keys().next().value!)
    return plan
  }

  private buildPlan(batch: number): Plan {
    const dims = this.dims(batch)
    const input = new Float32Array(batch * this.inputSize)
    const values = new Map<string, Value>([[this.graph.input.name, { data: input, dims: dims.get(this.graph.input.name)!, grad: null }]])
    for (const p of this.parameters) values.set(p.name, { data: p.values, dims: [...p.dims], grad: p.gradient })
    const activationGrads: Float32Array[] = []
    const steps = this.graph.nodes.map((node): Step => {
      const inputs = node.inputs.map((i) => values.get(i)!)
      const outDims = dims.get(node.output)!
      const grad = this.needsGrad.has(node.output) ? new Float32Array(sizeOf(outDims)) : null
      if (grad) activationGrads.push(grad)
      const out = { data: new Float32Array(sizeOf(outDims)), dims: outDims, grad }
      values.set(node.output, out)
      return { kernel: node.kernel, x: inputs.map((v) => v.data), dims: inputs.map((v) => v.dims), y: out.data, dy: grad, gx: inputs.map((v) => v.grad) }
    })
    const final = this.finalSoftmax()
    const softmax = final ? { step: steps[this.graph.nodes.indexOf(final)]!, logits: values.get(final.inputs[0]!)! } : null
    return { batch, input, output: values.get(this.graph.output)!, steps, softmax, activationGrads }
  }
}

/** `weights` must name every parameter, with as many finite values, and nothing else. */
export function checkWeights(parameters: readonly { name: string; values: Float32Array }[], weights: Weights): void {
  const names = new Set(parameters.map((p) => p.name))
  for (const name of Object.keys(weights)) if (!names.has(name)) throw new TrainerError(`weight ${name} is not an initializer of the model`)
  for (const p of parameters) {
    const values = weights[p.name]
    if (!values) throw new TrainerError(`weight ${p.name} is missing`)
    if (values.length !== p.values.length) throw new TrainerError(`weight ${p.name} has ${values.length} values, the model takes ${p.values.length}`)
    for (let i = 0; i < values.length; i++) if (!Number.isFinite(values[i]!)) throw new TrainerError(`weight ${p.name} has a non-finite value at ${i}`)
  }
}
