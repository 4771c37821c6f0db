import { spawn } from 'node:child_process'
import { pythonRuntime } from '../../src/commands/torch-tool.js'

/**
 * Real torch for the TorchScript tests: the project's managed environment (`npm test` creates it) or
 * DCP_PYTHON. Scripts read their input as JSON on stdin and print JSON.
 */
export function testPython(): string {
  const python = pythonRuntime()
  if (!python) throw new Error('no Python with torch: run `npm run setup:python` (or set DCP_PYTHON)')
  return python
}

/** Runs a Python script with `input` as JSON on stdin; its stdout parsed as JSON. */
export async function runPython<T = any>(script: string, input: unknown = null): Promise<T> {
  const child = spawn(testPython(), ['-W', 'ignore', '-c', script], { stdio: ['pipe', 'pipe', 'pipe'] })
  let out = ''
  let err = ''
  child.stdout.on('data', (d) => (out += d))
  child.stderr.on('data', (d) => (err += d))
  child.stdin.end(JSON.stringify(input))
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve))
  if (code !== 0) throw new Error(`python failed (${code}): ${err.slice(-2000)}`)
  return JSON.parse(out) as T
}

/** Python that loads a TorchScript file from base64 (`load(b64)`) and lists a module's float state_dict (`weights(m)`). */
export const TORCH_PRELUDE = `
import base64, io, json, sys
import torch
torch.set_num_threads(1)
def load(b64):
    return torch.jit.load(io.BytesIO(base64.b64decode(b64)))
def save(m):
    out = io.BytesIO(); torch.jit.save(m, out); return base64.b64encode(out.getvalue()).decode()
def weights(m):
    return {k: v.reshape(-1).tolist() for k, v in m.state_dict().items() if v.is_floating_point()}
args = json.load(sys.stdin)
`

export interface MlpOptions {
  inputs: number
  hidden: number
  outputs: number
  seed: number
  /** Ends in a Softmax (else it gives logits). */
  softmax?: boolean
}

/** TorchScript MLPs (Linear, ReLU, Linear), seeded, as `torch.jit.save` writes them: one Python run for them all. */
export async function torchScriptMlps(list: MlpOptions[]): Promise<Buffer[]> {
  const files = await runPython<string[]>(`${TORCH_PRELUDE}
def mlp(o):
    torch.manual_seed(o['seed'])
    layers = [torch.nn.Linear(o['inputs'], o['hidden']), torch.nn.ReLU(), torch.nn.Linear(o['hidden'], o['outputs'])]
    if o.get('softmax'): layers.append(torch.nn.Softmax(dim=1))
    return save(torch.jit.script(torch.nn.Sequential(*layers)))
print(json.dumps([mlp(o) for o in args]))
`, list)
  return files.map((b64) => Buffer.from(b64, 'base64'))
}

export const torchScriptMlp = async (options: MlpOptions): Promise<Buffer> => (await torchScriptMlps([options]))[0]!

/** The float tensors of a TorchScript file's state_dict, flattened. */
export function stateDictOf(bytes: Uint8Array): Promise<Record<string, number[]>> {
  return runPython(`${TORCH_PRELUDE}\nprint(json.dumps(weights(load(args))))`, Buffer.from(bytes).toString('base64'))
}

/** Float32 closeness, element by element. */
export function close(a: ArrayLike<number>, b: ArrayLike<number>, tolerance = 1e-6): boolean {
  if (a.length !== b.length) return false
  for (let i = 0; i < a.length; i++) if (!(Math.abs(a[i]! - b[i]!) <= tolerance * Math.max(1, Math.abs(b[i]!)))) return false
  return true
}
