import { type ChildProcess, spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import path from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'

/**
 * The server's hands for TorchScript models: Node has no torch, so the training coordinator asks a Python
 * process (`python -m dcp_device.model_tool`, sdk/python/dcp_device/model_tool.py) run from the project's
 * managed environment. One long-lived process answers JSON lines; it starts on the first call, and again
 * after it died or a call timed out (a model it held is sent again then).
 */

export const PROJECT_ROOT = fileURLToPath(new URL('../../', import.meta.url))
/** The managed environment `npm run setup:python` creates (scripts/python-env.ts). */
export const MANAGED_PYTHON = path.join(PROJECT_ROOT, '.dcp', 'python', 'bin', 'python')
export const SETUP_HINT = 'run `npm run setup:python` (it creates .dcp/python with torch), or set DCP_PYTHON to a python that has torch and numpy'

export const TORCH_TOOL_DEFAULTS = {
  /** Longest wait for torch to import (a cold disk takes a while). */
  startTimeoutMs: 60_000,
  /** Longest one operation may take before the process is killed and the call fails. */
  callTimeoutMs: 120_000,
}

/**
 * The tool cannot run (`unavailable`: no Python, or no torch in it), its process died under a call
 * (`crashed`: tried once more), or an operation failed (the model's fault).
 */
export class TorchToolError extends Error {
  constructor(message: string, readonly unavailable: boolean, readonly crashed = false) {
    super(message)
    this.name = 'TorchToolError'
  }
}

/**
 * The Python to run the tool with: `DCP_PYTHON` when set (a path, which must exist), else the managed
 * environment's when it exists; undefined when there is none.
 */
export function pythonRuntime(env: NodeJS.ProcessEnv = process.env): string | undefined {
  const chosen = env.DCP_PYTHON
  if (chosen !== undefined && chosen !== '') return existsSync(chosen) ? chosen : undefined
  return existsSync(MANAGED_PYTHON) ? MANAGED_PYTHON : undefined
}

/** A model the tool works on: its sha256 names it, its bytes go once to each process. */
export interface ToolModel {
  key: string
  bytes: Uint8Array
}

interface Running {
  child: ChildProcess
  ready: Promise<void>
  pending: Map<number, { resolve: (value: unknown) => void; reject: (error: Error) => void; timer: NodeJS.Timeout }>
  loaded: Set<string>
  stderr: string
}

export interface TorchToolOptions {
  /** Default: `pythonRuntime()`; none: every call fails with an `unavailable` TorchToolError. */
  python?: string | undefined
  startTimeoutMs?: number
  callTimeoutMs?: number
  log?: (message: string) => void
}

export class TorchTool {
  private running: Running | undefined
  private nextId = 1
  private closed = false
  readonly python: string | undefined

  constructor(private readonly options: TorchToolOptions = {}) {
    this.python = 'python' in options ? options.python : pythonRuntime()
  }

  /** Whether there is a Python to run it with (whether torch imports in it shows at the first call). */
  get configured(): boolean {
    return this.python !== undefined
  }

  /**
   * Runs `op` on `model`; the answer's `result`. Once more, on a fresh process, when the process died under
   * it; once more with the model's bytes when the process had dropped the model (it keeps the 16 last used).
   */
  async call<T>(op: string, model: ToolModel, fields: Record<string, unknown> = {}): Promise<T> {
    try {
      return await this.callOnce<T>(op, model, fields)
    } catch (error) {
      if (!(error instanceof TorchToolError) || !(error.crashed || / is not loaded$/.test(error.message))) throw error
      this.running?.loaded.delete(model.key)
      return this.callOnce<T>(op, model, fields)
    }
  }

  private async callOnce<T>(op: string, model: ToolModel, fields: Record<string, unknown>): Promise<T> {
    const running = this.start()
    await running.ready
    const send = { key: model.key, ...(running.loaded.has(model.key) ? {} : { bytes: Buffer.from(model.bytes).toString('base64') }) }
    const result = await this.request(running, { op, model: send, ...fields })
    running.loaded.add(model.key)
    return result as T
  }

  /** Ends the process (calls in flight fail); a later call starts another. */
  close(): void {
    this.closed = true
    this.stop(this.running, new TorchToolError('the TorchScript tool was closed', true))
  }

  private start(): Running {
    if (this.closed) throw new TorchToolError('the TorchScript tool was closed', true)
    if (this.running) return this.running
    const python = this.python
    if (!python) throw new TorchToolError(`this server has no Python runtime for TorchScript models: ${SETUP_HINT}`, true)
    const child = spawn(python, ['-m', 'dcp_device.model_tool'], {
      cwd: PROJECT_ROOT,
      env: { ...process.env, PYTHONPATH: [path.join(PROJECT_ROOT, 'sdk', 'python'), process.env.PYTHONPATH].filter(Boolean).join(path.delimiter), PYTHONUNBUFFERED: '1' },
      stdio: ['pipe', 'pipe', 'pipe'],
    })
    const running: Running = { child, ready: undefined as unknown as Promise<void>, pending: new Map(), loaded: new Set(), stderr: '' }
    this.running = running
    child.stdin!.on('error', () => undefined) // a write to a process that died: its exit fails the calls
    child.stderr!.on('data', (chunk: Buffer) => (running.stderr = (running.stderr + chunk.toString()).slice(-4000)))
    const lines = createInterface({ input: child.stdout! })
    running.ready = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new TorchToolError(`the TorchScript tool (${python}) did not start within ${this.startTimeout} ms; ${SETUP_HINT}`, true))
        this.stop(running, undefined)
      }, this.startTimeout)
      const fail = (why: string) => {
        clearTimeout(timer)
        reject(new TorchToolError(`the TorchScript tool could not start with ${python}: ${why}; ${SETUP_HINT}`, true))
      }
      child.once('error', (error) => fail(error.message))
      child.once('exit', (code, signal) => fail(`it exited (${signal ?? code}) ${lastLine(running.stderr)}`))
      lines.once('line', (line) => {
        clearTimeout(timer)
        if (/"ready":\s*true/.test(line)) resolve()
        else fail(`it said ${line.slice(0, 300)}`)
        lines.on('line', (answer) => this.answer(running, answer))
      })
    })
    running.ready.catch(() => undefined)
    child.once('exit', (code, signal) => {
      this.options.log?.(`torch tool exited (${signal ?? code}) ${lastLine(running.stderr)}`)
      this.stop(running, new TorchToolError(`the TorchScript tool exited (${signal ?? code}) ${lastLine(running.stderr)}`, false, true))
    })
    return running
  }

  private request(running: Running, body: Record<string, unknown>): Promise<unknown> {
    const id = this.nextId++
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        // a stuck operation holds the process: it goes, and the next call starts another
        this.stop(running, new TorchToolError(`the TorchScript tool took more than ${this.callTimeout} ms`, false))
      }, this.callTimeout)
      running.pending.set(id, { resolve, reject, timer })
      running.child.stdin!.write(`${JSON.stringify({ id, ...body })}\n`)
    })
  }

  private answer(running: Running, line: string): void {
    let parsed: { id?: number; ok?: boolean; result?: unknown; error?: string }
    try {
      parsed = JSON.parse(line)
    } catch {
      this.options.log?.(`torch tool: ${line.slice(0, 300)}`)
      return
    }
    const call = parsed.id === undefined ? undefined : running.pending.get(parsed.id)
    if (!call) return
    running.pending.delete(parsed.id!)
    clearTimeout(call.timer)
    if (parsed.ok) call.resolve(parsed.result)
    else call.reject(new TorchToolError(parsed.error ?? 'the TorchScript tool failed', false))
  }

  /** Kills the process and fails what waits on it with `error`. */
  private stop(running: Running | undefined, error: TorchToolError | undefined): void {
    if (!running) return
    if (this.running === running) this.running = undefined
    for (const call of running.pending.values()) {
      clearTimeout(call.timer)
      call.reject(error ?? new TorchToolError('the TorchScript tool stopped', false))
    }
    running.pending.clear()
    if (running.child.exitCode === null && running.child.signalCode === null) running.child.kill('SIGKILL')
  }

  private get startTimeout() {
    return this.options.startTimeoutMs ?? TORCH_TOOL_DEFAULTS.startTimeoutMs
  }

  private get callTimeout() {
    return this.options.callTimeoutMs ?? TORCH_TOOL_DEFAULTS.callTimeoutMs
  }
}

function lastLine(text: string): string {
  return text.trim().split('\n').at(-1)?.slice(0, 500) ?? ''
}
