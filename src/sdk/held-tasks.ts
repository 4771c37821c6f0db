import type { TaskAssignment } from '../protocol/frames.js'
import type { TaskResultFrame } from './task.js'

interface Held {
  task: TaskAssignment
  running: boolean
  cancelled: boolean
}

/**
 * The tasks a device holds: at most `max` running, the others queued in arrival order (the hub may send more
 * than the device runs at once). A cancelled task leaves the lease list at once; if it was running, it keeps
 * its slot until onnxruntime returns (a run cannot be interrupted) and its result is marked cancelled.
 */
export class HeldTasks {
  private readonly held = new Map<string, Held>()
  private readonly queue: string[] = []
  private running = 0
  private halted = false
  private emptyWaiters: (() => void)[] = []
  private quietWaiters: (() => void)[] = []

  constructor(
    private readonly max: number,
    private readonly run: (task: TaskAssignment) => Promise<TaskResultFrame>,
    private readonly done: (task: TaskAssignment, result: TaskResultFrame, cancelled: boolean) => void,
  ) {}

  get size(): number {
    return this.held.size
  }

  has(taskId: string): boolean {
    return this.held.has(taskId)
  }

  add(task: TaskAssignment) {
    this.held.set(task.task_id, { task, running: false, cancelled: false })
    this.queue.push(task.task_id)
    this.pump()
  }

  /**
   * The hub leased a task the device holds again, under a new lease (the device reconnected, and the hub had
   * ended its leases when the socket dropped): it is held under the new lease from now on, so heartbeats
   * list it and its result carries it (under the old one the hub would refuse it). False when the task is
   * not held, or held under that lease already.
   */
  adopt(task: TaskAssignment): boolean {
    const held = this.held.get(task.task_id)
    if (!held || held.cancelled || held.task.lease_id === task.lease_id) return false
    held.task = task
    return true
  }

  /** false when the task is not held under that lease. */
  cancel(taskId: string, leaseId: string): boolean {
    const held = this.held.get(taskId)
    if (!held || held.task.lease_id !== leaseId || held.cancelled) return false
    if (held.running) {
      held.cancelled = true
    } else {
      this.held.delete(taskId)
      this.queue.splice(this.queue.indexOf(taskId), 1)
      this.settle()
    }
    return true
  }

  /** Leases of the tasks held and not cancelled, queued ones included: the device will work on them. */
  leases(): string[] {
    return [...this.held.values()].filter((held) => !held.cancelled).map((held) => held.task.lease_id)
  }

  /** Starts nothing more (queued tasks stay unstarted). */
  halt() {
    this.halted = true
    this.settle()
  }

  /** Resolves once every held task has ended (or, after halt(), once the running ones have). */
  whenEmpty(): Promise<void> {
    return new Promise((resolve) => {
      this.emptyWaiters.push(resolve)
      this.settle()
    })
  }

  /** Resolves once nothing runs. */
  whenQuiet(): Promise<void> {
    return new Promise((resolve) => {
      this.quietWaiters.push(resolve)
      this.settle()
    })
  }

  private pump() {
    while (!this.halted && this.running < this.max && this.queue.length > 0) {
      const held = this.held.get(this.queue.shift()!)
      if (held) this.start(held)
    }
  }

  private start(held: Held) {
    held.running = true
    this.running++
    void this.run(held.task).then((result) => {
      this.running--
      this.held.delete(held.task.task_id)
      // under the lease it is held under now (adopt may have changed it while it ran)
      this.done(held.task, result.lease_id === held.task.lease_id ? result : { ...result, lease_id: held.task.lease_id }, held.cancelled)
      this.pump()
      this.settle()
    })
  }

  private settle() {
    if (this.running === 0) for (const resolve of this.quietWaiters.splice(0)) resolve()
    if (this.held.size === 0 || (this.halted && this.running === 0)) for (const resolve of this.emptyWaiters.splice(0)) resolve()
  }
}
