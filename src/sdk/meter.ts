/**
 * Shares a clock's time between the tasks running at once: between two consecutive starts or ends, the time
 * that passed is split equally between the tasks that ran in that interval. A task alone gets all of it; tasks
 * side by side are not each billed for the others' time, and together they are billed exactly what the clock
 * measured while any of them ran. The worker meters CPU with the process's CPU time (onnxruntime's threads
 * included, which no per-task clock can separate) and GPU time with the wall clock of GPU runs.
 */
export class SharedMeter {
  private last: number
  private readonly shares = new Map<number, number>()
  private nextId = 0

  constructor(private readonly read: () => number) {
    this.last = read()
  }

  /** A task starts: returns its handle for `stop`. */
  start(): number {
    this.advance()
    const id = this.nextId++
    this.shares.set(id, 0)
    return id
  }

  /** The task ends: its share of the time since it started. */
  stop(id: number): number {
    this.advance()
    const share = this.shares.get(id) ?? 0
    this.shares.delete(id)
    return share
  }

  private advance(): void {
    const now = this.read()
    const elapsed = now - this.last
    this.last = now
    if (this.shares.size === 0 || elapsed <= 0) return
    const each = elapsed / this.shares.size
    for (const [id, share] of this.shares) this.shares.set(id, share + each)
  }
}

/** The process's CPU time (user and system, every thread), ms. */
export function processCpuMs(): number {
  const usage = process.cpuUsage()
  return (usage.user + usage.system) / 1000
}

/** The meters a worker shares between the tasks it runs: the process's CPU time, and wall time for GPU runs. */
export function taskMeters(): { cpu: SharedMeter; gpu: SharedMeter } {
  return { cpu: new SharedMeter(processCpuMs), gpu: new SharedMeter(() => performance.now()) }
}
