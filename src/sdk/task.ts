import { performance } from 'node:perf_hooks'
import * as ort from 'onnxruntime-node'
import type { z } from 'zod'
import type { Metrics, TaskAssignment, TaskResult } from '../protocol/frames.js'
import type { ModelStore } from './models.js'

export type TaskResultFrame = z.infer<typeof TaskResult>

const FLOAT_BYTES = 4

/** Called around the inference itself, so the worker knows when the GPU is busy. */
export interface RunHooks {
  onRunStart?(gpu: boolean): void
  onRunEnd?(gpu: boolean): void
}

/**
 * Runs one task: loads (downloading if needed) the model, feeds `input` as float32 to `input_name` or the
 * first input, and returns the first output. Never throws: any failure becomes a 'failed' result carrying
 * the metrics measured until then.
 */
export async function runTask(task: TaskAssignment, models: ModelStore, hooks: RunHooks = {}): Promise<TaskResultFrame> {
  const metrics: Metrics = { cpu_ms: 0, gpu_ms: 0, bytes_in: FLOAT_BYTES * task.input.data.length, bytes_out: 0 }
  const base = { type: 'task_result' as const, task_id: task.task_id, lease_id: task.lease_id }
  try {
    const { session, gpu } = await models.load(task.model, (bytes) => (metrics.bytes_in += bytes))
    const feed = { [inputName(task, session)]: inputTensor(task.input) }
    const outputName = session.outputNames[0]
    if (outputName === undefined) throw new Error('the model has no outputs')
    hooks.onRunStart?.(gpu)
    const cpuBefore = process.cpuUsage()
    const wallBefore = performance.now()
    try {
      const outputs = await session.run(feed, [outputName])
      const wall = performance.now() - wallBefore
      const cpu = process.cpuUsage(cpuBefore)
      metrics.cpu_ms = (cpu.user + cpu.system) / 1000
      metrics.gpu_ms = gpu ? wall : 0
      const output = outputTensor(outputs[outputName])
      metrics.bytes_out = FLOAT_BYTES * output.data.length
      return { ...base, status: 'completed', output, metrics }
    } finally {
      hooks.onRunEnd?.(gpu)
    }
  } catch (error) {
    return { ...base, status: 'failed', error: (error as Error).message.slice(0, 4096) || 'task failed', metrics }
  }
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

function inputTensor(input: TaskAssignment['input']): ort.Tensor {
  const expected = input.shape.reduce((a, b) => a * b, 1)
  if (expected !== input.data.length) {
    throw new Error(`bad input: shape [${input.shape.join(', ')}] needs ${expected} values, got ${input.data.length}`)
  }
  return new ort.Tensor('float32', Float32Array.from(input.data), input.shape)
}

function outputTensor(tensor: ort.Tensor | undefined): { data: number[]; shape: number[] } {
  if (!tensor) throw new Error('the model produced no output')
  if (tensor.type === 'string') throw new Error('the model output is a string tensor; only numeric outputs can be returned')
  const data = Array.from(tensor.data as ArrayLike<number | bigint | boolean>, Number)
  return { data, shape: tensor.dims.map(Number) }
}
