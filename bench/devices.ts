/**
 * Device fleet: one `dcp start --workers 0` child process against the bench's database, and N simulated
 * devices (BENCH_DEVICES, default 10,000) connected from this process over real WebSockets. Each registers,
 * then heartbeats every 5 s, the fleet spread evenly over the interval, for BENCH_SECONDS (default 60)
 * after everyone is connected and one interval of warm-up.
 *
 * Measured: heartbeats appended per second (HeartbeatReceived rows in `events` recorded in the window),
 * the lag from sending a heartbeat to the devices read model counting it (rm_devices.devices polled every
 * BENCH_POLL_MS, default 200, so a lag carries up to one poll of extra delay), the server's peak RSS, the
 * devices that got disconnected. Baseline: the rate the fleet sends, devices / 5 s; ratio 1.00 keeps up.
 *
 * Progress lines also give the CPU of the server, of Postgres and of this process, and the server's
 * event-loop delay (a probe module the server is started with). Other knobs: BENCH_CONNECT_BATCH (devices
 * connecting at once, default 250), BENCH_POLL_MS, BENCH_DRAIN_MS (time the read model gets after the window,
 * default 15 s), BENCH_PROFILE=1 or =connect (a V8 CPU profile of the server and samples of Postgres' active
 * statements, over the measured window or the connect phase). Needs `ulimit -n` above the device count.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import { readdirSync, readFileSync } from 'node:fs'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath, pathToFileURL } from 'node:url'
import type pg from 'pg'
import WebSocket from 'ws'
import { PROTOCOL_VERSION } from '../src/protocol/frames.js'
import { DCP_BIN, untilListening } from './dcp-process.js'
import type { BenchContext } from './run.js'
import { cpuSeconds } from './proc.js'

const DEVICES = Number(process.env.BENCH_DEVICES ?? 10_000)
const SECONDS = Number(process.env.BENCH_SECONDS ?? 60)
const INTERVAL_MS = 5000
const CONNECT_BATCH = Number(process.env.BENCH_CONNECT_BATCH ?? 250)
const POLL_MS = Number(process.env.BENCH_POLL_MS ?? 200)
/** How long after the window the read model gets to show the last heartbeats. */
const DRAIN_MS = Number(process.env.BENCH_DRAIN_MS ?? 15_000)
/**
 * BENCH_PROFILE=1: a V8 CPU profile of the server and samples of Postgres' active queries over the measured
 * window; BENCH_PROFILE=connect: the same over the connect phase.
 */
const PROFILE = process.env.BENCH_PROFILE === '1' || process.env.BENCH_PROFILE === 'connect' ? process.env.BENCH_PROFILE : undefined

interface Device {
  index: number
  socket: WebSocket
  deviceId: string
  registered: boolean
  /** performance.now() of each heartbeat sent, in order: the k-th applied one is sends[k - 1]. */
  sends: number[]
  /** Heartbeats the read model counted at the last poll. */
  applied: number
}

function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return NaN
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

/** The open-files limit this process runs under (the child inherits it). */
function openFilesLimit(): number | undefined {
  try {
    const out = execFileSync('sh', ['-c', 'ulimit -n'], { encoding: 'utf8' }).trim()
    return out === 'unlimited' ? Infinity : Number(out)
  } catch {
    return undefined
  }
}

/** CPU seconds every Postgres process used since the last call (backends come and go: each is counted from its first sighting). */
const postgresSeen = new Map<number, number>()
function postgresCpuDelta(): number {
  let delta = 0
  const alive = new Set<number>()
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      if (!readFileSync(`/proc/${entry}/comm`, 'utf8').startsWith('postgres')) continue
    } catch {
      continue // gone meanwhile
    }
    const pid = Number(entry)
    const cpu = cpuSeconds(pid)
    alive.add(pid)
    delta += cpu - (postgresSeen.get(pid) ?? cpu)
    postgresSeen.set(pid, cpu)
  }
  for (const pid of postgresSeen.keys()) if (!alive.has(pid)) postgresSeen.delete(pid)
  return delta
}

function rssMb(pid: number): number {
  try {
    const match = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
    return match ? Number(match[1]) / 1024 : 0
  } catch {
    return 0
  }
}

/** Starts `dcp start` and resolves with its port once it prints that it listens. */
async function startServer(databaseUrl: string, dataDir: string, profileDir: string | undefined, log: (line: string) => void): Promise<{ child: ChildProcess; port: number }> {
  const env: NodeJS.ProcessEnv = { ...process.env, DATABASE_URL: databaseUrl, DATA_DIR: dataDir, HEARTBEAT_INTERVAL_MS: String(INTERVAL_MS), LOG_LEVEL: 'warn', WORKERS: '0' }
  delete env.EVENTSTORE_URL
  delete env.NODE_ENV
  const profiling = profileDir ? ['--cpu-prof', `--cpu-prof-dir=${profileDir}`] : []
  // the server's event-loop delay, measured from inside it by a module loaded first (src/ is not touched)
  const probe = path.join(dataDir, 'event-loop-probe.mjs')
  await writeFile(probe, EVENT_LOOP_PROBE)
  env.DCP_BENCH_EVENT_LOOP_FILE = eventLoopFile(dataDir)
  profiling.push('--import', pathToFileURL(probe).href)
  const child = spawn(process.execPath, [...profiling, DCP_BIN, 'start', '--workers', '0', '--port', '0', '--host', '127.0.0.1'], { env, stdio: ['ignore', 'pipe', 'pipe'] })
  let stderrLines = 0
  createInterface({ input: child.stderr! }).on('line', (line) => {
    if (shutdown) {
      // the hub records each device's disconnect while the store closes: expected noise, counted
      shutdown.lines++
      shutdown.first ??= line
    } else if (++stderrLines <= 20) log(`  [server] ${line}`)
    else if (stderrLines === 21) log('  [server] (more stderr lines not shown)')
  })
  const port = await untilListening(child, (line) => {
    if (!line.startsWith('dcp: development mode')) log(`  [server] ${line}`)
  }).catch((error: Error) => {
    child.kill('SIGKILL')
    throw error
  })
  return { child, port }
}

/** Every second, the server's event-loop delay since the last line (ms), appended to a file as JSON. */
const EVENT_LOOP_PROBE = `
import { appendFileSync } from 'node:fs'
import { monitorEventLoopDelay } from 'node:perf_hooks'
const histogram = monitorEventLoopDelay({ resolution: 10 })
histogram.enable()
setInterval(() => {
  const ms = (ns) => Math.round(ns / 1e5) / 10
  appendFileSync(process.env.DCP_BENCH_EVENT_LOOP_FILE, JSON.stringify({ at: Date.now(), p50: ms(histogram.percentile(50)), p99: ms(histogram.percentile(99)), max: ms(histogram.max) }) + '\\n')
  histogram.reset()
}, 1000).unref()
`
const eventLoopFile = (dataDir: string) => path.join(dataDir, 'event-loop.jsonl')

/** The worst event-loop delay the server reported since `since` (Date.now() ms). */
function eventLoopDelay(dataDir: string, since: number): { p99: number; max: number } | undefined {
  try {
    const lines = readFileSync(eventLoopFile(dataDir), 'utf8').trim().split('\n').slice(-120)
    const recent = lines.map((l) => JSON.parse(l) as { at: number; p99: number; max: number }).filter((l) => l.at > since)
    if (recent.length === 0) return undefined
    return { p99: Math.max(...recent.map((l) => l.p99)), max: Math.max(...recent.map((l) => l.max)) }
  } catch {
    return undefined
  }
}

/** Set once the server is asked to stop: what it printed on stderr from then on. */
let shutdown: { lines: number; first?: string } | undefined

async function stopServer(child: ChildProcess): Promise<number | string | null> {
  if (child.exitCode !== null || child.signalCode !== null) return child.exitCode ?? child.signalCode
  shutdown = { lines: 0 }
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 30_000)
    child.once('exit', (code, signal) => {
      clearTimeout(timer)
      resolve(code ?? signal)
    })
    child.kill('SIGTERM')
  })
}

/** The measured window on the monotonic clock V8's profiler stamps samples with, in µs. */
const profileWindow = { from: 0n, to: 0n }

/** Samples Postgres' active statements (other than its own) every 25 ms until stopped. */
function sampleQueries(pool: pg.Pool) {
  const counts = new Map<string, number>()
  let samples = 0
  let running = true
  const loop = (async () => {
    while (running) {
      const { rows } = await pool.query<{ query: string; wait: string | null }>(
        `select query, wait_event_type || ':' || wait_event as wait from pg_stat_activity
          where datname = current_database() and state = 'active' and pid <> pg_backend_pid()`,
      )
      samples++
      for (const row of rows) {
        const key = `${row.query.replace(/\s+/g, ' ').trim().slice(0, 110)}${row.wait ? ` [${row.wait}]` : ''}`
        counts.set(key, (counts.get(key) ?? 0) + 1)
      }
      await sleep(25)
    }
  })()
  return {
    async stop(): Promise<string> {
      running = false
      await loop
      const top = [...counts].sort((a, b) => b[1] - a[1]).slice(0, 12)
      const busy = [...counts.values()].reduce((a, b) => a + b, 0) / samples
      return [`profile: Postgres, ${samples} samples of pg_stat_activity: ${busy.toFixed(2)} statements active on average`]
        .concat(top.map(([q, n]) => `  ${((n / samples) * 100).toFixed(0).padStart(4)}%  ${q}`))
        .join('\n')
    },
  }
}

interface ProfileNode {
  id: number
  callFrame: { functionName: string; url: string; lineNumber: number }
  children?: number[]
}

/** Self time of the server's functions and files over the measured window, from its .cpuprofile. */
async function summariseProfile(dir: string): Promise<string> {
  const file = readdirSync(dir).find((f) => f.endsWith('.cpuprofile'))
  if (!file) throw new Error('no .cpuprofile written')
  const profile = JSON.parse(readFileSync(path.join(dir, file), 'utf8')) as { nodes: ProfileNode[]; samples: number[]; timeDeltas: number[]; startTime: number }
  const nodes = new Map(profile.nodes.map((n) => [n.id, n]))
  const self = new Map<number, number>()
  const stamps: bigint[] = []
  let t = BigInt(profile.startTime)
  for (const delta of profile.timeDeltas) stamps.push((t += BigInt(delta)))
  const inWindow = (at: bigint) => at >= profileWindow.from && at <= profileWindow.to
  // the profile's clock is the monotonic one of process.hrtime: samples outside the window are skipped
  const aligned = stamps.some(inWindow)
  let total = 0
  for (let i = 0; i < profile.samples.length; i++) {
    if (aligned && !inWindow(stamps[i]!)) continue
    const delta = profile.timeDeltas[i] ?? 0
    self.set(profile.samples[i]!, (self.get(profile.samples[i]!) ?? 0) + delta)
    total += delta
  }
  const parentOf = new Map<number, number>()
  for (const node of profile.nodes) for (const child of node.children ?? []) parentOf.set(child, node.id)
  const byFunction = new Map<string, number>()
  const byFile = new Map<string, number>()
  const root = fileURLToPath(new URL('..', import.meta.url))
  // inclusive time of dcp's own functions (src/): what each costs with everything it calls synchronously
  const inclusive = new Map<string, number>()
  for (const [id, us] of self) {
    const seen = new Set<string>()
    for (let n: number | undefined = id; n !== undefined; n = parentOf.get(n)) {
      const { functionName, url, lineNumber } = nodes.get(n)!.callFrame
      if (!url.includes('/src/')) continue
      const name = `${functionName || '(anonymous)'} ${url.replace(/^file:\/\//, '').replace(root, '')}:${lineNumber + 1}`
      if (seen.has(name)) continue
      seen.add(name)
      inclusive.set(name, (inclusive.get(name) ?? 0) + us)
    }
  }
  for (const [id, us] of self) {
    const { functionName, url, lineNumber } = nodes.get(id)!.callFrame
    const where = url.replace(/^file:\/\//, '').replace(root, '')
    const module = /node_modules\/((@[^/]+\/)?[^/]+)/.exec(where)?.[1] ?? (where || functionName || '(anonymous)')
    const name = `${functionName || '(anonymous)'}${where ? ` ${where}:${lineNumber + 1}` : ''}`
    byFunction.set(name, (byFunction.get(name) ?? 0) + us)
    byFile.set(module, (byFile.get(module) ?? 0) + us)
  }
  const pct = (us: number) => `${((us / total) * 100).toFixed(1).padStart(5)}%`
  const top = (m: Map<string, number>, n: number) => [...m].sort((a, b) => b[1] - a[1]).slice(0, n).map(([k, us]) => `  ${pct(us)}  ${k}`)
  // who calls the native functions (no script of their own, e.g. writev) that take the most time
  const label = (id: number) => {
    const { functionName, url, lineNumber } = nodes.get(id)!.callFrame
    const where = url.replace(/^file:\/\//, '').replace(root, '').replace(/^.*node_modules\//, '')
    return `${functionName || '(anonymous)'}${where ? ` ${where}:${lineNumber + 1}` : ''}`
  }
  const natives = new Map<string, Map<string, number>>()
  for (const [id, us] of self) {
    const node = nodes.get(id)!
    if (node.callFrame.url || node.callFrame.functionName.startsWith('(')) continue
    const chain: string[] = []
    // node's own frames (streams, net) say little: the first three of the callers' own
    for (let p = parentOf.get(id); p !== undefined && chain.length < 3; p = parentOf.get(p)) if (!nodes.get(p)!.callFrame.url.startsWith('node:')) chain.push(label(p))
    const callers = natives.get(node.callFrame.functionName) ?? new Map<string, number>()
    callers.set(chain.join(' < '), (callers.get(chain.join(' < ')) ?? 0) + us)
    natives.set(node.callFrame.functionName, callers)
  }
  const nativeLines = [...natives]
    .map(([name, callers]) => [name, callers, [...callers.values()].reduce((a, b) => a + b, 0)] as const)
    .sort((a, b) => b[2] - a[2])
    .slice(0, 3)
    .flatMap(([name, callers, us]) => [`profile: ${name} (${pct(us).trim()}) called from:`, ...top(callers, 5)])
  return [
    `profile: server CPU over ${aligned ? (PROFILE === 'connect' ? 'the connect phase' : 'the measured window') : 'the whole run (clocks not aligned)'}, ${(total / 1e6).toFixed(1)} s sampled; self time by module or file:`,
    ...top(byFile, 15),
    'profile: by function:',
    ...top(byFunction, 25),
    'profile: dcp functions by total time (self and callees, synchronous part):',
    ...top(inclusive, 15),
    ...nativeLines,
  ].join('\n')
}

export async function devicesBench({ database, log }: BenchContext): Promise<string> {
  const { pool } = database
  const limit = openFilesLimit()
  const needed = DEVICES + 1024
  if (limit !== undefined && limit < needed) {
    throw new Error(
      `devices: the open-files limit (ulimit -n) is ${limit}, but ${DEVICES} devices need about ${needed} in this process and as many in ` +
        `the server: raise it (e.g. \`ulimit -n ${Math.max(needed, 65536)}\` in the shell that runs the bench) or lower BENCH_DEVICES`,
    )
  }
  const [low, high] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number)
  if (high! - low! + 1 < DEVICES + 100) log(`devices: warning: only ${high! - low! + 1} local ports (ip_local_port_range) for ${DEVICES} connections`)
  log(`devices: ${DEVICES} devices, heartbeat every ${INTERVAL_MS} ms, ${SECONDS} s measured, read model polled every ${POLL_MS} ms (ulimit -n ${limit})`)

  const dataDir = await mkdtemp(path.join(tmpdir(), 'dcp-bench-devices-'))
  const started = performance.now()
  const profileDir = PROFILE ? path.join(dataDir, 'profile') : undefined
  const { child, port } = await startServer(database.url, dataDir, profileDir, log)
  const pid = child.pid!
  log(`devices: server pid ${pid} listening on port ${port} (${Math.round(performance.now() - started)} ms to start)`)
  const url = `ws://127.0.0.1:${port}/api/v1/devices/connect`

  const devices: Device[] = []
  const byId = new Map<string, Device>()
  const disconnects: { index: number; code: number; reason: string; at: number }[] = []
  const errorFrames = new Map<string, number>()
  let stopping = false
  let peakRss = 0
  const rssTimer = setInterval(() => (peakRss = Math.max(peakRss, rssMb(pid))), 500)

  // ---- heartbeats: one timer walks a global slot counter; slot c is device c % N at T0 + c * 5000 / N ----
  const t0 = performance.now()
  let slot = 0
  let sent = 0
  let sendTimer: NodeJS.Timeout | undefined
  const heartbeat = JSON.stringify({ type: 'heartbeat', load: 0.25, memory_used_mb: 512, power_watts: 12.5, leases: [] })
  const tick = () => {
    const now = performance.now()
    while (t0 + (slot * INTERVAL_MS) / DEVICES <= now) {
      const device = devices[slot % DEVICES]
      slot++
      if (!device?.registered || device.socket.readyState !== WebSocket.OPEN) continue
      device.sends.push(performance.now())
      device.socket.send(heartbeat)
      sent++
    }
    sendTimer = setTimeout(tick, 5)
  }
  tick()

  /** Per device while connecting: ms to open the socket, ms from open to `registered`. */
  let opens: number[] = []
  let registers: number[] = []
  const connectOne = (index: number) =>
    new Promise<void>((resolve, reject) => {
      const created = performance.now()
      let opened = 0
      const socket = new WebSocket(url, { perMessageDeflate: false })
      const device: Device = { index, socket, deviceId: '', registered: false, sends: [], applied: 0 }
      devices[index] = device
      const timer = setTimeout(() => reject(new Error(`device ${index} not registered within 60 s`)), 60_000)
      socket.once('error', (error) => {
        if (!device.registered) {
          clearTimeout(timer)
          reject(error)
        }
      })
      socket.on('close', (code, reason) => {
        if (!stopping) disconnects.push({ index, code, reason: reason.toString(), at: performance.now() })
      })
      socket.on('open', () => {
        opened = performance.now()
        opens.push(opened - created)
        socket.send(
          JSON.stringify({
            type: 'register',
            protocol: PROTOCOL_VERSION,
            platform: 'nodejs',
            sdk_version: '0.0.0-bench',
            sdk_uuid: `sdk-bench-${index}`,
            instance_type: 'user',
            hardware: { cpu_model: 'bench cpu', cpu_cores: 2, memory_mb: 1024, gpus: [] },
            capabilities: { formats: ['onnx'], gpu: false, can_train: false, max_concurrent_tasks: 1 },
          }),
        )
      })
      socket.on('message', (raw) => {
        const frame = JSON.parse(raw.toString()) as { type: string; device_id?: string; code?: string }
        if (frame.type === 'registered') {
          device.deviceId = frame.device_id!
          device.registered = true
          registers.push(performance.now() - opened)
          byId.set(device.deviceId, device)
          clearTimeout(timer)
          resolve()
        } else if (frame.type === 'error') {
          errorFrames.set(frame.code!, (errorFrames.get(frame.code!) ?? 0) + 1)
        }
      })
    })

  let serverCpu0 = cpuSeconds(pid)
  postgresCpuDelta()
  let selfCpu0 = process.cpuUsage()
  let mark = performance.now()
  const usage = () => {
    const now = performance.now()
    const seconds = (now - mark) / 1000
    const server = cpuSeconds(pid)
    const pg = postgresCpuDelta()
    const self = process.cpuUsage()
    const pct = (x: number) => `${Math.round((x / seconds) * 100)}%`
    const delay = eventLoopDelay(dataDir, Date.now() - (now - mark))
    const line =
      `cpu: server ${pct(server - serverCpu0)}, postgres ${pct(pg)}, bench ${pct((self.user + self.system - selfCpu0.user - selfCpu0.system) / 1e6)}; ` +
      `server event-loop delay ${delay ? `p99 ${delay.p99} ms, max ${delay.max} ms` : '-'}`
    serverCpu0 = server
    selfCpu0 = self
    mark = now
    return line
  }

  try {
    // ---- connect and register, a batch at a time ----
    const connectStart = performance.now()
    const connectSampler = PROFILE === 'connect' ? sampleQueries(pool) : undefined
    if (PROFILE === 'connect') profileWindow.from = process.hrtime.bigint() / 1000n
    for (let first = 0; first < DEVICES; first += CONNECT_BATCH) {
      const batch = Array.from({ length: Math.min(CONNECT_BATCH, DEVICES - first) }, (_, i) => connectOne(first + i))
      await Promise.all(batch)
      const done = first + batch.length
      if (done % (CONNECT_BATCH * 8) === 0 || done === DEVICES) {
        const o = Float64Array.from(opens).sort()
        const r = Float64Array.from(registers).sort()
        log(
          `  connect: ${done}/${DEVICES} registered in ${((performance.now() - connectStart) / 1000).toFixed(1)} s; open p50 ${percentile(o, 50).toFixed(0)} ms ` +
            `p99 ${percentile(o, 99).toFixed(0)} ms, register p50 ${percentile(r, 50).toFixed(0)} ms p99 ${percentile(r, 99).toFixed(0)} ms; ` +
            `server RSS ${Math.round(rssMb(pid))} MB; ${usage()}`,
        )
        opens = []
        registers = []
      }
    }
    const connectSeconds = (performance.now() - connectStart) / 1000
    if (PROFILE === 'connect') profileWindow.to = process.hrtime.bigint() / 1000n
    if (connectSampler) log(await connectSampler.stop())
    log(`devices: ${DEVICES} registered in ${connectSeconds.toFixed(1)} s (${Math.round(DEVICES / connectSeconds)}/s); warming up for one interval`)
    await sleep(INTERVAL_MS)

    // ---- the measured window; the read model is polled throughout ----
    const lags: number[] = []
    let windowStart = Infinity
    let windowEnd = Infinity
    let applied = 0
    let polls = 0
    let pollMs = 0
    let polling = true
    const poller = (async () => {
      while (polling) {
        const at = performance.now()
        const { rows } = await pool.query<{ device_id: string; heartbeats: string }>('select device_id, heartbeats from rm_devices.devices')
        const took = performance.now() - at
        polls++
        pollMs += took
        let total = 0
        for (const row of rows) {
          const device = byId.get(row.device_id)
          if (!device) continue
          const count = Number(row.heartbeats)
          total += count
          for (let k = device.applied + 1; k <= count && k <= device.sends.length; k++) {
            const sentAt = device.sends[k - 1]!
            // the snapshot is taken when the query starts: that is when the read model showed it
            if (sentAt >= windowStart && sentAt <= windowEnd) lags.push(at - sentAt)
          }
          device.applied = count
        }
        applied = total
        await sleep(Math.max(0, POLL_MS - took))
      }
    })()

    while (polls === 0) await sleep(10)
    const sampler = PROFILE === '1' ? sampleQueries(pool) : undefined
    if (PROFILE === '1') profileWindow.from = process.hrtime.bigint() / 1000n
    windowStart = performance.now()
    const wallStart = new Date()
    const sentAtStart = sent
    log(`devices: measuring for ${SECONDS} s`)
    usage()
    let lastSent = sent
    let lastApplied = applied
    let lastReport = performance.now()
    while (performance.now() - windowStart < SECONDS * 1000) {
      await sleep(Math.min(5000, SECONDS * 1000 - (performance.now() - windowStart)))
      const now = performance.now()
      const s = (now - lastReport) / 1000
      const stored = Number((await pool.query(`select count(*) as n from events where type = 'HeartbeatReceived'`)).rows[0].n)
      log(
        `  ${((now - windowStart) / 1000).toFixed(0)} s: sent ${Math.round((sent - lastSent) / s)}/s, applied ${Math.round((applied - lastApplied) / s)}/s; ` +
          `backlog: ${sent - stored} sent not stored, ${stored - applied} stored not in the read model; ` +
          `server RSS ${Math.round(rssMb(pid))} MB (peak ${Math.round(peakRss)}); ${usage()}; disconnects ${disconnects.length}; ` +
          `poll ${polls ? (pollMs / polls).toFixed(0) : '-'} ms`,
      )
      lastSent = sent
      lastApplied = applied
      lastReport = now
    }
    windowEnd = performance.now()
    const sentInWindow = sent - sentAtStart
    if (PROFILE === '1') profileWindow.to = process.hrtime.bigint() / 1000n
    const wallEnd = new Date()
    if (sampler) log(await sampler.stop())

    // ---- stop heartbeating; give the read model time to show the window's last heartbeats ----
    clearTimeout(sendTimer)
    const drainStart = performance.now()
    const pending = () => {
      let n = 0
      for (const device of devices) for (let k = device.applied; k < device.sends.length; k++) if (device.sends[k]! <= windowEnd) n++
      return n
    }
    while (pending() > 0 && performance.now() - drainStart < DRAIN_MS) await sleep(POLL_MS)
    polling = false
    await poller
    const missing = pending()

    const stored = Number(
      (await pool.query(`select count(*) as n from events where type = 'HeartbeatReceived' and recorded_at >= $1 and recorded_at < $2`, [wallStart, wallEnd])).rows[0].n,
    )
    const windowSeconds = (wallEnd.getTime() - wallStart.getTime()) / 1000
    const hbPerS = stored / windowSeconds
    const expected = DEVICES / (INTERVAL_MS / 1000)
    const sorted = Float64Array.from(lags).sort()
    const p50 = percentile(sorted, 50)
    const p99 = percentile(sorted, 99)
    const max = sorted.length ? sorted[sorted.length - 1]! : NaN
    log(
      `devices: ${sentInWindow} heartbeats sent and ${stored} stored in ${windowSeconds.toFixed(1)} s = ${hbPerS.toFixed(0)}/s (expected ${expected.toFixed(0)}/s); ` +
        `lag to the read model over ${sorted.length}: p50 ${p50.toFixed(0)} ms, p99 ${p99.toFixed(0)} ms, max ${max.toFixed(0)} ms` +
        (missing ? `; ${missing} not in the read model ${DRAIN_MS} ms after the window` : ''),
    )
    log(`devices: server peak RSS ${Math.round(peakRss)} MB; read-model poll ${(pollMs / polls).toFixed(0)} ms on average over ${polls} polls`)
    if (errorFrames.size > 0) log(`devices: error frames: ${[...errorFrames].map(([code, n]) => `${code} x${n}`).join(', ')}`)
    if (disconnects.length > 0) {
      const byCode = new Map<string, number>()
      for (const d of disconnects) byCode.set(`${d.code} ${d.reason}`, (byCode.get(`${d.code} ${d.reason}`) ?? 0) + 1)
      log(`devices: ${disconnects.length} devices disconnected: ${[...byCode].map(([why, n]) => `${n} x (${why})`).join(', ')}`)
    } else {
      log('devices: no device was disconnected')
    }
    return (
      `RESULT name=devices devices=${DEVICES} hb_per_s=${hbPerS.toFixed(0)} lag_p50_ms=${p50.toFixed(0)} lag_p99_ms=${p99.toFixed(0)} ` +
      `rss_mb=${Math.round(peakRss)} ratio=${(hbPerS / expected).toFixed(2)}`
    )
  } finally {
    clearTimeout(sendTimer)
    stopping = true
    const exit = await stopServer(child)
    clearInterval(rssTimer)
    const noise = shutdown?.lines ? `; ${shutdown.lines} stderr lines while shutting down, the first: ${shutdown.first}` : ''
    log(`devices: server stopped (exit ${exit})${noise}`)
    shutdown = undefined
    if (profileDir) log(await summariseProfile(profileDir).catch((error: Error) => `profile: none (${error.message})`))
    for (const device of devices) device?.socket.terminate()
    if (process.env.BENCH_KEEP_DATA === '1') log(`devices: kept the server's data dir ${dataDir} (event-loop.jsonl: its event-loop delay each second)`)
    else await rm(dataDir, { recursive: true, force: true }).catch(() => {})
  }
}
