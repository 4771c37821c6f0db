import { LOG_LEVELS, type LogLine } from '../protocol/frames.js'

export type LogLevel = LogLine['level']
export type LogSink = (line: LogLine) => void

const MAX_MESSAGE = 8192
const rank = (level: LogLevel) => LOG_LEVELS.indexOf(level)

/**
 * Everything the worker logs, kept in a ring buffer so the hub can ask for it (`logs_request`), and passed on
 * to an optional sink (the CLI prints it).
 */
export class WorkerLog {
  private readonly lines: LogLine[] = []
  private next = 0

  /** `capacity`: lines kept, default 2,000. */
  constructor(
    private readonly sink?: LogSink,
    private readonly capacity = 2000,
  ) {}

  debug(message: string) { this.write('debug', message) }
  info(message: string) { this.write('info', message) }
  warn(message: string) { this.write('warn', message) }
  error(message: string) { this.write('error', message) }

  write(level: LogLevel, message: string) {
    const line: LogLine = { ts: new Date().toISOString(), level, message: message.slice(0, MAX_MESSAGE) }
    if (this.lines.length < this.capacity) this.lines.push(line)
    else this.lines[this.next] = line
    this.next = (this.next + 1) % this.capacity
    try {
      this.sink?.(line)
    } catch {
      // A failing sink must not take the worker down; the line is still in the buffer.
    }
  }

  /** The last `count` lines at `level` or above ('all': every line), oldest first. */
  tail(count: number, level: LogLevel | 'all'): LogLine[] {
    const ordered = this.lines.length < this.capacity ? this.lines : [...this.lines.slice(this.next), ...this.lines.slice(0, this.next)]
    const matching = level === 'all' ? ordered : ordered.filter((line) => rank(line.level) >= rank(level))
    return matching.slice(-count)
  }
}
