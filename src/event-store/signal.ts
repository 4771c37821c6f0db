/**
 * A wake-up call shared by waiters. `wait(since)` resolves at once when a `notify` came after the caller
 * took `version`, else on the next `notify` or after the timeout, so a notification that arrives between
 * a read and the wait is never missed.
 */
export class Signal {
  private waiters = new Set<() => void>()
  version = 0

  wait(timeoutMs: number, since = this.version): Promise<void> {
    if (since !== this.version) return Promise.resolve()
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer)
        this.waiters.delete(done)
        resolve()
      }
      const timer = setTimeout(done, timeoutMs)
      this.waiters.add(done)
    })
  }

  notify(): void {
    this.version++
    for (const wake of [...this.waiters]) wake()
  }
}
