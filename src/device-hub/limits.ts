import { HUB_LIMITS } from '../protocol/frames.js'

/** The hub's per-device limits (docs/device-protocol.md §4.4); defaults HUB_LIMITS. */
export interface HubLimits {
  /** Heartbeats accepted per heartbeat interval; more are dropped. Default 5. */
  heartbeatsPerInterval: number
  /** Dropped heartbeats in one interval that close the socket (4429). Default 50. */
  droppedHeartbeatsBeforeClose: number
  /** Frames of any kind per second past which the socket is closed (4429). Default 5000. */
  maxFramesPerSecond: number
  /** Largest frame before registration; larger closes the socket (1009). Default 64 KiB. */
  maxUnregisteredFrameBytes: number
}

export const DEFAULT_LIMITS: HubLimits = { ...HUB_LIMITS }

export type FrameVerdict = { ok: true } | { ok: false; close: 'too_large' | 'rate' }
export type HeartbeatVerdict = 'accept' | 'drop' | 'close'

/**
 * One socket's frame and heartbeat counters: a pure core (times come in), so that a flooding device costs a
 * few comparisons per frame and never reaches the store. Fixed windows: one second for frames, one heartbeat
 * interval for heartbeats.
 */
export class FrameLimiter {
  private secondStart = 0
  private framesThisSecond = 0
  private intervalStart = 0
  private heartbeatsThisInterval = 0
  private droppedThisInterval = 0
  /** Heartbeats dropped on this socket in all. */
  dropped = 0
  private lastStored = -Infinity

  constructor(private readonly limits: HubLimits, private readonly heartbeatIntervalMs: number) {}

  frame(bytes: number, registered: boolean, now: number): FrameVerdict {
    if (!registered && bytes > this.limits.maxUnregisteredFrameBytes) return { ok: false, close: 'too_large' }
    if (now - this.secondStart >= 1000) {
      this.secondStart = now
      this.framesThisSecond = 0
    }
    if (++this.framesThisSecond > this.limits.maxFramesPerSecond) return { ok: false, close: 'rate' }
    return { ok: true }
  }

  heartbeat(now: number): HeartbeatVerdict {
    if (now - this.intervalStart >= this.heartbeatIntervalMs) {
      this.intervalStart = now
      this.heartbeatsThisInterval = 0
      this.droppedThisInterval = 0
    }
    if (++this.heartbeatsThisInterval <= this.limits.heartbeatsPerInterval) return 'accept'
    this.dropped++
    return ++this.droppedThisInterval >= this.limits.droppedHeartbeatsBeforeClose ? 'close' : 'drop'
  }

  /**
   * Whether an accepted heartbeat is also stored as an event: one at most every STORED_HEARTBEAT_SPACING of an
   * interval, so a device on schedule has each one stored and a faster one no more than 1.25 per interval.
   */
  store(now: number): boolean {
    if (now - this.lastStored < STORED_HEARTBEAT_SPACING * this.heartbeatIntervalMs) return false
    this.lastStored = now
    return true
  }
}

/** Fraction of the heartbeat interval between two stored heartbeats of a device (jitter of an on-time device passes). */
export const STORED_HEARTBEAT_SPACING = 0.8
