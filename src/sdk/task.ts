import * as ort from 'onnxruntime-node'
import type { z } from 'zod'
import { errorText, type Metrics, type TaskAssignment, type TaskResult, type Tensor } from '../protocol/frames.js'
import { type SharedMeter, taskMeters } from './meter.js'
import type { ModelStore } from './models.js'

export type TaskResultFrame = z.infer<typeof TaskResult>

const FLOAT_BYTES = 4

/** Called around the inference itself, so the worker knows when the GPU is busy. */
export interface RunHooks {
  onRunStart?(gpu: boolean): void
  onRunEnd?(gpu: boolean): void
  /**
   * The meters of the process's CPU time and of GPU wall time, shared by the tasks it runs at once so that
   * each is billed its share (see SharedMeter). Default: meters of this task alone.
   */
  meters?: { cpu: SharedMeter; gpu: SharedMeter }
}

/**
 * Runs one task: loads (downloading if needed) the model, feeds each input as float32 to `input_name` or the
 * first input, and returns the first output for each. Several inputs whose shapes differ only in the first
 * (batch) dimension run as one call, stacked along that dimension, when the model's first dimension is
 * dynamic; otherwise one call each. Never throws: any failure becomes a 'failed' result carrying the metrics
 * measured until then.
 */
export async function runTask(task: TaskAssignment, models: ModelStore, hooks: RunHooks = {}): Promise<TaskResultFrame> {
  const inputs = task.inputs ?? (task.input ? [task.input] : [])
  const metrics: Metrics = { cpu_ms: 0, gpu_ms: 0, bytes_in: FLOAT_BYTES * inputs.reduce((n, input) => n + input.data.length, 0), bytes_out: 0 }
  const base = { type: 'task_result' as const, task_id: task.task_id, lease_id: task.lease_id }
  try {
    if (inputs.length === 0) throw new Error('the task has no input')
    const { session, gpu } = await models.load(task.model, (bytes) => (metrics.bytes_in += bytes))
    const name = inputName(task, session)
    const outputName = session.outputNames[0]
    if (outputName === undefined) throw new Error('the model has no outputs')
    hooks.onRunStart?.(gpu)
    const meters = hooks.meters ?? taskMeters()
    const cpuRun = meters.cpu.start()
    const gpuRun = gpu ? meters.gpu.start() : undefined
    let stopped = false
    const stop = () => {
      if (stopped) return
      stopped = true
      metrics.cpu_ms = meters.cpu.stop(cpuRun)
      metrics.gpu_ms = gpuRun === undefined ? 0 : meters.gpu.stop(gpuRun)
    }
    try {
      const run = async (input: Tensor) => outputTensor((await session.run({ [name]: inputTensor(input) }, [outputName]))[outputName])
      const outputs = (stackable(session, name, inputs) && (await runStacked(inputs, run))) || (await runEach(inputs, run))
      stop()
      metrics.bytes_out = FLOAT_BYTES * outputs.reduce((n, output) => n + output.data.length, 0)
      return { ...base, status: 'completed', ...(task.inputs ? { outputs } : { output: outputs[0]! }), metrics }
    } catch (error) {
      stop()
      throw error
    } finally {
      hooks.onRunEnd?.(gpu)
    }
  } catch (error) {
    return { ...base, status: 'failed', error: errorText(error, 4096) || 'task failed', metrics }
  }
}

type Run = (input: Tensor) => Promise<Tensor>

async function runEach(inputs: Tensor[], run: Run): Promise<Tensor[]> {
  const outputs: Tensor[] = []
  for (const input of inputs) outputs.push(await run(input))
  return outputs
}

/** Can the inputs run as one call? Same trailing dimensions, and a model input whose first dimension is not fixed. */
function stackable(session: ort.InferenceSession, name: string, inputs: Tensor[]): boolean {
  if (inputs.length < 2) return false
  const trailing = JSON.stringify(inputs[0]!.shape.slice(1))
  if (!inputs.every((input) => JSON.stringify(input.shape.slice(1)) === trailing)) return false
  const metadata = session.inputMetadata?.find((m) => m.name === name)
  if (!metadata?.isTensor) return false
  const first = metadata.shape[0]
  return typeof first === 'string' || (typeof first === 'number' && first < 1)
}

/** Runs the inputs stacked along the first dimension and splits the output back; undefined when the output does not split by rows. */
async function runStacked(inputs: Tensor[], run: Run): Promise<Tensor[] | undefined> {
  const rows = inputs.map((input) => input.shape[0]!)
  const total = rows.reduce((a, b) => a + b, 0)
  const data: number[] = []
  for (const input of inputs) for (const value of input.data) data.push(value)
  const stacked = await run({ data, shape: [total, ...inputs[0]!.shape.slice(1)] })
  if (stacked.shape[0] !== total || stacked.data.length % total !== 0) return undefined
  const perRow = stacked.data.length / total
  const outputs: Tensor[] = []
  let offset = 0
  for (const n of rows) {
    outputs.push({ data: stacked.data.slice(offset * perRow, (offset + n) * perRow), shape: [n, ...stacked.shape.slice(1)] })
    offset += n
  }
  return outputs
}

function inputName(task: TaskAssignment, session: ort.InferenceSession): string {
  if (task.input_name === undefined) {
    const first = session.inputNames[0]
    if (first === undefined) throw new Error('the model has no inputs')
    return first
  }
  if (!session.inputNames.includes(task.input_name)) {
    throw new Error(`the model has no input ${JSON.stringify(task.input_name)} (inputs: ${session.inputNames.join(', ')})`)
  }
  return task.input_name
}

function inputTensor(input: Tensor): ort.Tensor {
  const expected = input.shape.reduce((a, b) => a * b, 1)
  if (expected !== input.data.length) {
    throw new Error(`bad input: shape [${input.shape.join(', ')}] needs ${expected} values, got ${input.data.length}`)
  }
  return new ort.Tensor('float32', Float32Array.from(input.data), input.shape)
}

function outputTensor(tensor: ort.Tensor | undefined): Tensor {
  if (!tensor) throw new Error('the model produced no output')
  if (tensor.type === 'string') throw new Error('the model output is a string tensor; only numeric outputs can be returned')
  const data = Array.from(tensor.data as ArrayLike<number | bigint | boolean>, Number)
  return { data, shape: tensor.dims.map(Number) }
}
