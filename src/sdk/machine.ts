import { execFile } from 'node:child_process'
import os from 'node:os'
import type { Hardware } from '../protocol/frames.js'

const MIB = 1024 * 1024

/**
 * The SDK's power estimate, in watts (sent as `heartbeat.power_watts`):
 *
 *   idle  = 5 W + 1 W per CPU core
 *   peak  = idle + 8 W per CPU core (+ 150 W per GPU while the device runs tasks on the GPU)
 *   power = idle + (peak - idle) * load        (load: 0..1, the CPU share in use)
 *
 * A rough model with no measurement behind it; it lets the hub compare devices and price energy, nothing more.
 */
export function estimatePowerWatts(input: { cores: number; load: number; gpus?: number; gpuBusy?: boolean }): number {
  const load = Math.min(1, Math.max(0, input.load))
  const idle = 5 + input.cores
  const peak = idle + 8 * input.cores + (input.gpuBusy ? 150 * (input.gpus ?? 0) : 0)
  return idle + (peak - idle) * load
}

/** What the heartbeat reports about the machine right now. */
export function machineReadings(options: { gpus: number; gpuBusy: boolean }) {
  const cores = Math.max(1, os.cpus().length)
  const load = Math.min(1, (os.loadavg()[0] ?? 0) / cores)
  return {
    load,
    memory_used_mb: (os.totalmem() - os.freemem()) / MIB,
    power_watts: estimatePowerWatts({ cores, load, gpus: options.gpus, gpuBusy: options.gpuBusy }),
  }
}

/** The register frame's `hardware`; GPUs are listed (via nvidia-smi, when present) only when CUDA is asked for. */
export async function describeHardware(cuda: boolean): Promise<Hardware> {
  const cpus = os.cpus()
  return {
    cpu_model: (cpus[0]?.model ?? 'unknown').trim().slice(0, 256) || 'unknown',
    cpu_cores: Math.max(1, cpus.length),
    memory_mb: Math.max(1, Math.round(os.totalmem() / MIB)),
    gpus: cuda ? await nvidiaGpus() : [],
  }
}

function nvidiaGpus(): Promise<Hardware['gpus']> {
  return new Promise((resolve) => {
    execFile('nvidia-smi', ['--query-gpu=name,memory.total', '--format=csv,noheader,nounits'], { timeout: 3000 }, (error, stdout) => {
      if (error) return resolve([])
      const gpus = stdout
        .split('\n')
        .map((line) => line.split(',').map((part) => part.trim()))
        .filter((parts) => parts[0])
        .map(([name, memory]) => ({ name: name!.slice(0, 256), memory_mb: Math.max(0, Math.round(Number(memory) || 0)) }))
      resolve(gpus.slice(0, 64))
    })
  })
}
