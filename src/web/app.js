// The dcp web dashboard: plain DOM, no framework, no build step. Every piece of data reaches the page
// through textContent (never innerHTML), and every failure is shown in the page, not thrown to the console.

const API = '/api/v1'
const KEY_STORAGE = 'dcp.apiKey'
const REFRESH_MS = 5000
const BENCHMARK_POLL_MS = 1000
const STREAM_INTERVAL_MS = 2000
const JOBS_SHOWN = 20
const EFFICIENCY_TYPES = ['tta', 'scaling', 'power', 'throughput']
const COLORS = ['#2563eb', '#f97316', '#16a34a', '#dc2626', '#9333ea', '#0891b2', '#ca8a04', '#db2777']
const INSTANCE_COLORS = { aws: '#f97316', user: '#2563eb' }

const $ = (selector) => document.querySelector(selector)

// ---------------------------------------------------------------------------------------------------------
// The API key and calls

class ApiError extends Error {
  constructor(status, code, message) {
    super(message)
    this.status = status
    this.code = code
  }
}

const apiKey = () => sessionStorage.getItem(KEY_STORAGE)

/** Calls the API with the key; resolves with the JSON body, rejects with an ApiError (a 401 also asks for a new key). */
async function api(path, { method = 'GET', body } = {}) {
  const headers = { 'X-API-Key': apiKey() ?? '', Accept: 'application/json' }
  if (body !== undefined) headers['Content-Type'] = 'application/json'
  let response
  try {
    response = await fetch(API + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) })
  } catch (error) {
    throw new ApiError(0, 'NETWORK_ERROR', `dcp could not be reached (${error.message})`)
  }
  const text = await response.text()
  let json = null
  try {
    json = text ? JSON.parse(text) : null
  } catch {
    json = null
  }
  if (!response.ok) {
    const code = json?.error?.code ?? `HTTP_${response.status}`
    const message = json?.error?.message ?? (text.slice(0, 200) || response.statusText)
    if (response.status === 401) keyRefused(message)
    throw new ApiError(response.status, code, message)
  }
  if (json === null) throw new ApiError(response.status, 'BAD_RESPONSE', 'the answer was not JSON')
  return json
}

const describe = (error) => (error instanceof ApiError ? `${error.status ? error.status + ' ' : ''}${error.code}: ${error.message}` : String(error?.message ?? error))

function showKeyForm(message) {
  $('#api-key-form').hidden = false
  $('#key-status').hidden = true
  const auth = $('#auth-message')
  auth.textContent = message ?? ''
  auth.hidden = !message
  $('#api-key-input').focus()
}

function keyRefused(message) {
  if (!running) return
  stop()
  showKeyForm(`The API key was refused (401: ${message}). Enter another key.`)
}

function useKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key)
  $('#api-key-form').hidden = true
  $('#key-status').hidden = false
  $('#key-prefix').textContent = key.length > 12 ? `${key.slice(0, 12)}…` : key
  $('#auth-message').hidden = true
  $('#intro').hidden = true
  $('#dashboard').hidden = false
  start()
}

// ---------------------------------------------------------------------------------------------------------
// Small DOM helpers

/** An element with text (or child elements) and optional class and attributes; text only via textContent. */
function el(tag, content, attributes = {}) {
  const node = document.createElement(tag)
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== undefined && value !== null) node.setAttribute(name, value)
  }
  if (Array.isArray(content)) node.append(...content)
  else if (content instanceof Node) node.append(content)
  else node.textContent = content ?? ''
  return node
}

function fmt(value, digits = 2) {
  if (value === null || value === undefined || value === '') return '–'
  if (typeof value === 'number') return Number.isInteger(value) ? value.toLocaleString() : value.toLocaleString(undefined, { maximumFractionDigits: digits })
  if (typeof value === 'object') return JSON.stringify(value)
  return String(value)
}

function fmtTime(iso) {
  if (!iso) return '–'
  const date = new Date(iso)
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString()
}

/** A status as a badge; the class comes from a fixed pattern so data never becomes markup. */
function badge(status) {
  const safe = /^[a-z_-]+$/.test(String(status)) ? status : 'unknown'
  return el('span', fmt(status), { class: `badge status-${safe}` })
}

/** A device's status, with a ban or a quarantine beside it (its reason on hover). */
function deviceStatus(d) {
  const held = [d.banned && ['banned', d.banned], d.quarantined && ['quarantined', d.quarantined]].filter(Boolean)
  if (held.length === 0) return badge(d.status)
  return el('span', [badge(d.status), ...held.map(([what, why]) => el('span', fmt(what), { class: `badge status-${what}`, title: `${what} ${fmtTime(why.at)}: ${why.reason}` }))])
}

function fillTable(selector, rows, emptyText, columns) {
  const body = $(`${selector} tbody`)
  if (rows.length === 0) {
    body.replaceChildren(el('tr', [el('td', emptyText, { colspan: String(columns), class: 'empty' })]))
    return
  }
  body.replaceChildren(...rows.map((cells) => el('tr', cells.map((cell) => (cell instanceof Node && cell.nodeName === 'TD' ? cell : el('td', cell instanceof Node ? cell : fmt(cell)))))))
}

function progressCell(progress) {
  if (!progress) return el('td', '–')
  const percent = typeof progress.percent === 'number' ? progress.percent : progress.total ? (100 * progress.completed) / progress.total : 0
  const bar = el('progress', '', { max: '100', value: String(Math.max(0, Math.min(100, percent))) })
  return el('td', [bar, el('span', ` ${fmt(progress.completed)}/${fmt(progress.total)} (${fmt(percent, 1)}%)`)])
}

// ---------------------------------------------------------------------------------------------------------
// Charts (Chart.js UMD build, window.Chart)

const charts = new Map()

/** Creates the chart on the canvas, or updates the one there with the new data (no flicker, no leak). */
function drawChart(canvasId, type, data, options = {}) {
  if (!window.Chart) throw new Error('Chart.js did not load')
  const existing = charts.get(canvasId)
  if (existing && existing.config.type === type) {
    existing.data = data
    existing.options = chartOptions(options)
    existing.update('none')
    return
  }
  existing?.destroy()
  charts.set(canvasId, new window.Chart(document.getElementById(canvasId), { type, data, options: chartOptions(options) }))
}

/**
 * `timeLabels`: category labels that are ISO times; `epochMs`: a linear x that is a Unix time in ms. Both
 * are shown as times without a date adapter.
 */
function chartOptions({ xTitle, yTitle, xType = 'category', timeLabels = false, epochMs = false } = {}) {
  const x = { type: xType, title: { display: Boolean(xTitle), text: xTitle ?? '' } }
  if (timeLabels) x.ticks = { callback(value) { return shortTime(this.getLabelForValue(value)) }, maxRotation: 0, autoSkip: true }
  if (epochMs) x.ticks = { callback: (value) => new Date(value).toLocaleTimeString(), maxRotation: 0, autoSkip: true }
  let tooltip = {}
  if (timeLabels) tooltip = { callbacks: { title: (items) => items.map((i) => fmtTime(i.label)) } }
  if (epochMs) tooltip = { callbacks: { title: (items) => items.map((i) => new Date(i.parsed.x).toLocaleString()) } }
  return {
    animation: false,
    responsive: true,
    maintainAspectRatio: false,
    interaction: { mode: 'nearest', intersect: false },
    scales: { x, y: { beginAtZero: true, title: { display: Boolean(yTitle), text: yTitle ?? '' } } },
    plugins: { legend: { position: 'bottom' }, tooltip },
  }
}

function shortTime(value) {
  const date = new Date(value)
  return typeof value === 'string' && !Number.isNaN(date.getTime()) ? date.toLocaleTimeString() : String(value)
}

const color = (i) => COLORS[i % COLORS.length]
const lineDataset = (label, data, i) => ({ label, data, borderColor: color(i), backgroundColor: color(i), pointRadius: 2, tension: 0, spanGaps: true })

/**
 * `{ x_label, y_label, x_kind?, series: [{ name, unit?, points: [{ x, y }] }] }` as a line chart: numeric x on
 * a linear scale (shown as times when `x_kind` is 'time': Unix ms); any other x (ISO times) on a category
 * scale of every x seen, in order, each series aligned to it.
 */
function drawSeriesChart(canvasId, body) {
  const series = Array.isArray(body.series) ? body.series : []
  const points = series.flatMap((s) => s.points ?? [])
  const numeric = points.every((p) => typeof p.x === 'number')
  const axes = { xTitle: body.x_label, yTitle: body.y_label }
  const name = (s) => (s.unit ? `${s.name} (${s.unit})` : s.name)
  if (numeric) {
    const datasets = series.map((s, i) => lineDataset(name(s), (s.points ?? []).map((p) => ({ x: p.x, y: p.y })), i))
    drawChart(canvasId, 'line', { datasets }, { ...axes, xType: 'linear', epochMs: body.x_kind === 'time' })
    return
  }
  const labels = [...new Set(points.map((p) => String(p.x)))].sort()
  const datasets = series.map((s, i) => {
    const byX = new Map((s.points ?? []).map((p) => [String(p.x), p.y]))
    return lineDataset(name(s), labels.map((x) => byX.get(x) ?? null), i)
  })
  drawChart(canvasId, 'line', { labels, datasets }, { ...axes, timeLabels: true })
}

// ---------------------------------------------------------------------------------------------------------
// Sections: each loads on its own; a failure shows in its section and leaves the others alone

function sectionDone(id, error) {
  const section = document.getElementById(id)
  const box = section.querySelector('.section-error')
  section.dataset.state = error ? 'error' : 'ok'
  box.textContent = error ? `Could not load: ${describe(error)}` : ''
  box.hidden = !error
}

const counts = (c) => [fmt(c?.total ?? 0), fmt(c?.idle ?? 0), fmt(c?.busy ?? 0), fmt(c?.offline ?? 0)]

async function loadFleet() {
  const body = await api('/dashboard/devices')
  $('#fleet-total').textContent = fmt(body.total)
  fillTable('#fleet-by-platform', Object.entries(body.by_platform ?? {}).map(([name, c]) => [name, ...counts(c)]), 'no platforms', 5)
  fillTable('#fleet-by-instance-type', Object.entries(body.by_instance_type ?? {}).map(([name, c]) => [name, ...counts(c)]), 'no devices', 5)
  const devices = body.devices ?? []
  fillTable(
    '#device-table',
    devices.map((d) => [el('code', d.id), d.platform, d.instance_type, deviceStatus(d), d.load, d.power_watts, d.running_tasks, d.training_job, fmtTime(d.last_seen_at)]),
    'no devices connected yet',
    9,
  )
}

async function loadUtilization() {
  const u = await api('/cluster/utilization')
  const slots = u.slots ?? {}
  const used = el('progress', '', { max: String(slots.total || 1), value: String(slots.used ?? 0) })
  const rows = [
    ['Devices', `${fmt(u.devices?.connected)} connected of ${fmt(u.devices?.total)}`],
    ['Idle / busy / training', `${fmt(u.devices?.idle)} / ${fmt(u.devices?.busy)} / ${fmt(u.devices?.training)}`],
    ['Task slots', [used, el('span', ` ${fmt(slots.used)} of ${fmt(slots.total)} used`)]],
    ['Mean load', fmt(u.load?.mean)],
    ['Power', `${fmt(u.power_watts, 1)} W`],
    ['Queue', `${fmt(u.queue?.tasks)} tasks, ${fmt(u.queue?.inputs)} inputs`],
    ['Training jobs', `${fmt(u.training_jobs?.running)} running, ${fmt(u.training_jobs?.queued)} queued`],
  ]
  $('#utilization-stats').replaceChildren(...rows.flatMap(([term, value]) => [el('dt', term), el('dd', value)]))
}

async function loadJobs() {
  const body = await api('/dashboard/jobs')
  const jobs = (body.jobs ?? []).slice(0, JOBS_SHOWN)
  fillTable(
    '#job-table',
    jobs.map((j) => [el('code', j.job_id), j.type, badge(j.status), j.model_id, j.project_id, progressCell(j.progress), fmtTime(j.created_at), fmtTime(j.updated_at)]),
    'no jobs in the last days',
    8,
  )
  $('#job-total').textContent = typeof body.total === 'number' ? `${fmt(jobs.length)} shown of ${fmt(body.total)}` : ''
}

async function loadTasks() {
  const body = await api('/dashboard/tasks?limit=20')
  fillTable(
    '#task-table',
    (body.tasks ?? []).map((k) => [el('code', k.task_id), k.job_id, k.project_id, badge(k.status), k.device_id, k.instance_type, k.inputs, fmtTime(k.queued_at), fmtTime(k.finished_at), k.latency_ms]),
    'no tasks yet',
    10,
  )
}

async function loadThroughput() {
  const body = await api('/dashboard/tasks/throughput?bucket_size=10')
  const buckets = body.buckets ?? []
  const labels = buckets.map((b) => b.t)
  drawChart(
    'throughput-chart',
    'line',
    { labels, datasets: [lineDataset('tasks completed', buckets.map((b) => b.completed), 0), lineDataset('inputs', buckets.map((b) => b.inputs), 1)] },
    { xTitle: `time (buckets of ${fmt(body.bucket_size ?? 10)} s)`, yTitle: 'count', timeLabels: true },
  )
}

/** The four efficiency charts, each fetched on its own; the section fails only when all four do. */
async function loadEfficiency() {
  const outcomes = await Promise.all(
    EFFICIENCY_TYPES.map(async (type) => {
      const box = document.getElementById(`efficiency-error-${type}`)
      try {
        drawSeriesChart(`efficiency-chart-${type}`, await api(`/efficiency/chart/${type}`))
        box.hidden = true
        return null
      } catch (error) {
        box.textContent = `Could not load: ${describe(error)}`
        box.hidden = false
        return error
      }
    }),
  )
  const failures = outcomes.filter(Boolean)
  if (failures.length === EFFICIENCY_TYPES.length) throw failures[0]
}

async function loadComparison() {
  const body = await api('/dashboard/comparison')
  const labels = Array.isArray(body.labels) ? body.labels : ['aws', 'user']
  for (const group of ['training', 'inference']) {
    const metrics = Object.entries(body[group] ?? {})
    const datasets = labels.map((label, i) => ({
      label,
      data: metrics.map(([, values]) => (Array.isArray(values) && typeof values[i] === 'number' ? values[i] : null)),
      backgroundColor: INSTANCE_COLORS[label] ?? color(i),
    }))
    drawChart(`comparison-${group}`, 'bar', { labels: metrics.map(([name]) => name), datasets })
  }
}

// ---------------------------------------------------------------------------------------------------------
// Live projects: the list refreshes with the rest; each active project streams its stats (SSE)

const projects = { list: [], live: new Map(), streams: new Map(), ended: new Set() }

async function loadProjects() {
  const body = await api('/dashboard/projects')
  projects.list = body.projects ?? []
  const active = new Set(projects.list.filter((p) => p.status === 'active').map((p) => p.project_id))
  for (const [id, source] of projects.streams) {
    if (!active.has(id)) closeStream(id, source)
  }
  for (const id of active) {
    if (!projects.streams.has(id) && !projects.ended.has(id)) openStream(id)
  }
  renderProjects()
}

/**
 * EventSource sends no headers, and a key in a URL would end up in logs and history: each stream opens with a
 * single-use ticket (`POST /dashboard/stream-tickets`, valid 60 s). A ticket cannot be used twice, so when a
 * connection drops the page closes the source and the next list refresh opens a new one with a new ticket.
 */
function openStream(id) {
  projects.streams.set(id, null) // opening: not opened twice by a refresh meanwhile
  setLive(id, { state: 'connecting' })
  api('/dashboard/stream-tickets', { method: 'POST', body: { project_id: id } }).then(
    ({ ticket }) => {
      if (!projects.streams.has(id)) return // closed while the ticket was on its way
      connectStream(id, ticket)
    },
    (error) => {
      projects.streams.delete(id)
      setLive(id, { state: `error: ${describe(error)}` })
    },
  )
}

function connectStream(id, ticket) {
  const query = new URLSearchParams({ format: 'json', interval: String(STREAM_INTERVAL_MS), ticket })
  const source = new EventSource(`${API}/dashboard/projects/${encodeURIComponent(id)}/stream?${query}`)
  projects.streams.set(id, source)
  source.addEventListener('open', () => setLive(id, { state: 'live' }))
  source.addEventListener('stats', (event) => {
    try {
      setLive(id, { state: 'live', stats: JSON.parse(event.data) })
    } catch {
      setLive(id, { state: 'bad data' })
    }
  })
  source.addEventListener('end', () => {
    projects.ended.add(id)
    closeStream(id, source)
    setLive(id, { state: 'ended' })
  })
  // The server's own failure, or the key revoked: it ends the stream.
  source.addEventListener('stream_error', (event) => {
    let message = event.data
    try {
      message = JSON.parse(event.data).message ?? message
    } catch {
      // not JSON: show the text as it is
    }
    closeStream(id, source)
    setLive(id, { state: `error: ${message}` })
  })
  // The connection failed or dropped: its ticket is spent, so the source is not left to reconnect with it;
  // the next list refresh opens the stream again with a new ticket.
  source.addEventListener('error', () => {
    if (projects.streams.get(id) !== source) return
    closeStream(id, source)
    setLive(id, { state: 'reconnecting' })
  })
}

function closeStream(id, source) {
  source?.close()
  if (projects.streams.get(id) === source) projects.streams.delete(id)
}

function closeAllStreams() {
  for (const [id, source] of projects.streams) closeStream(id, source)
  projects.live.clear()
  projects.ended.clear()
}

function setLive(id, update) {
  projects.live.set(id, { ...projects.live.get(id), ...update })
  renderProjects()
}

function renderProjects() {
  fillTable(
    '#project-table',
    projects.list.map((p) => {
      const live = projects.live.get(p.project_id)
      const s = live?.stats ?? {}
      const latency = s.latency_ms ?? {}
      return [
        el('code', p.project_id),
        p.name,
        p.type,
        badge(s.status ?? p.status),
        // a project without a live stream (a completed batch) shows the list's counts (named *_tasks there)
        s.submitted ?? p.submitted_tasks,
        s.completed ?? p.completed_tasks,
        s.failed ?? p.failed_tasks,
        s.inputs_per_s,
        latency.p50,
        latency.p95,
        latency.p99,
        live?.state ?? (p.status === 'active' ? '–' : 'not active'),
      ]
    }),
    'no projects yet',
    12,
  )
}

// ---------------------------------------------------------------------------------------------------------
// Refreshing

const SECTIONS = [
  ['fleet', loadFleet],
  ['utilization', loadUtilization],
  ['projects', loadProjects],
  ['jobs', loadJobs],
  ['tasks', loadTasks],
  ['throughput', loadThroughput],
  ['efficiency', loadEfficiency],
  ['comparison', loadComparison],
]

let running = false
let timer = null
const inFlight = new Set()

async function refresh() {
  await Promise.all(
    SECTIONS.map(async ([id, load]) => {
      if (inFlight.has(id)) return // the last load is still running: skip this round rather than pile up
      inFlight.add(id)
      try {
        await load()
        if (running) sectionDone(id)
      } catch (error) {
        if (running) sectionDone(id, error)
      } finally {
        inFlight.delete(id)
      }
    }),
  )
  if (running) $('#last-refresh').textContent = new Date().toLocaleTimeString()
}

function start() {
  stop()
  running = true
  void refresh()
  timer = setInterval(() => void refresh(), REFRESH_MS)
}

function stop() {
  running = false
  if (timer) clearInterval(timer)
  timer = null
  closeAllStreams()
}

// ---------------------------------------------------------------------------------------------------------
// Benchmark

function renderBenchmark(status, body, error) {
  const box = $('#benchmark-result')
  box.dataset.status = status
  const rows = []
  if (body?.benchmark_id) rows.push(['benchmark', body.benchmark_id])
  if (body?.mode) rows.push(['mode', body.mode])
  rows.push(['status', status])
  if (body?.error) rows.push(['error', body.error])
  if (error) rows.push(['error', describe(error)])
  for (const [key, value] of Object.entries(body?.result ?? {})) rows.push([key, fmt(value, 3)])
  box.replaceChildren(el('dl', rows.flatMap(([key, value]) => [el('dt', key), el('dd', fmt(value))]), { class: 'stats' }))
}

let benchmarkPoll = null

function numberField(selector) {
  const input = $(selector)
  if (input.disabled || input.value === '') return undefined
  const value = Number(input.value)
  return Number.isFinite(value) ? value : undefined
}

async function startBenchmark(event) {
  event.preventDefault()
  clearTimeout(benchmarkPoll)
  const mode = $('#benchmark-mode').value
  const request = { mode, epochs: numberField('#benchmark-epochs'), batch_size: numberField('#benchmark-batch-size') }
  const button = $('#benchmark-start')
  button.disabled = true
  renderBenchmark('starting', { mode })
  try {
    const started = await api('/dashboard/benchmark', { method: 'POST', body: request })
    renderBenchmark(started.status ?? 'running', started)
    await pollBenchmark(started.benchmark_id)
  } catch (error) {
    renderBenchmark('error', { mode }, error)
  } finally {
    button.disabled = false
  }
}

async function pollBenchmark(id) {
  for (;;) {
    const body = await api(`/dashboard/benchmark/${encodeURIComponent(id)}`)
    renderBenchmark(body.status, body)
    if (body.status === 'completed' || body.status === 'failed') return
    await new Promise((resolve) => (benchmarkPoll = setTimeout(resolve, BENCHMARK_POLL_MS)))
  }
}

/** Epochs and batch size only mean something for training benchmarks. */
function syncBenchmarkFields() {
  const training = $('#benchmark-mode').value !== 'inference'
  $('#benchmark-epochs').disabled = !training
  $('#benchmark-batch-size').disabled = !training
}

// ---------------------------------------------------------------------------------------------------------
// Start

$('#api-key-form').addEventListener('submit', (event) => {
  event.preventDefault()
  const key = $('#api-key-input').value.trim()
  if (!key) return
  $('#api-key-input').value = ''
  useKey(key)
})
$('#change-key').addEventListener('click', () => showKeyForm())
$('#benchmark-form').addEventListener('submit', (event) => void startBenchmark(event))
$('#benchmark-mode').addEventListener('change', syncBenchmarkFields)
syncBenchmarkFields()

const saved = apiKey()
if (saved) useKey(saved)
else showKeyForm()
