import * as ort from 'onnxruntime-node'
import { SimDevice } from './device.js'

/**
 * A contributed device that runs tasks with a real onnxruntime session of the model, and lies the way it is
 * told: `honest` answers truly; `perturb` adds noise to every output; `fail` fails every task at once;
 * `wrong-shape` answers with outputs of another shape; `overbill` answers truly and claims 1e10 ms of CPU;
 * `hold` keeps every task, listing its lease in every heartbeat, and never answers.
 */
export type Behaviour = 'honest' | 'perturb' | 'fail' | 'wrong-shape' | 'overbill' | 'hold'

export interface PlayedDevice {
  device: SimDevice
  deviceId: string
  /** Tasks it answered (or took, for `hold`). */
  tasks: number
  stop(): void
}

export async function playDevice(url: string, model: Buffer, behaviour: Behaviour, options: { batchInputs?: number; maxTasks?: number; register?: Parameters<SimDevice['register']>[0]; heartbeatMs?: number } = {}): Promise<PlayedDevice> {
  const session = await ort.InferenceSession.create(model)
  const device = await SimDevice.connect(url)
  await device.register({ batchInputs: options.batchInputs ?? 1, maxTasks: options.maxTasks ?? 2, ...options.register })
  const held: string[] = []
  const played: PlayedDevice = { device, deviceId: device.deviceId, tasks: 0, stop: () => clearInterval(beat) }
  const beat = setInterval(() => device.heartbeat(behaviour === 'hold' ? held : []), options.heartbeatMs ?? 200)
  device.socket.on('close', () => clearInterval(beat))
  device.socket.on('message', (raw) => {
    const frame = JSON.parse(raw.toString())
    if (frame.type !== 'task') return
    void answer(frame)
  })
  async function answer(task: any): Promise<void> {
    played.tasks++
    const metrics = { cpu_ms: behaviour === 'overbill' ? 1e10 : 1, gpu_ms: 0, bytes_in: 8, bytes_out: 8 }
    const reply = (fields: object) => device.send({ type: 'task_result', task_id: task.task_id, lease_id: task.lease_id, metrics, ...fields })
    if (behaviour === 'hold') {
      held.push(task.lease_id)
      return
    }
    if (behaviour === 'fail') return reply({ status: 'failed', error: 'this device fails everything' })
    const inputs: { data: number[]; shape: number[] }[] = task.inputs ?? [task.input]
    const outputs = []
    for (const input of inputs) {
      const out = await session.run({ [session.inputNames[0]!]: new ort.Tensor('float32', Float32Array.from(input.data), input.shape) })
      const tensor = out[session.outputNames[0]!]!
      let data = Array.from(tensor.data as Float32Array)
      let shape = [...tensor.dims]
      if (behaviour === 'perturb') data = data.map((v, i) => v + 0.01 * (i + 1))
      if (behaviour === 'wrong-shape') {
        data = [...data, 0]
        shape = [1, data.length]
      }
      outputs.push({ data, shape })
    }
    if (device.socket.readyState !== device.socket.OPEN) return
    reply(task.inputs ? { status: 'completed', outputs } : { status: 'completed', output: outputs[0] })
  }
  return played
}
