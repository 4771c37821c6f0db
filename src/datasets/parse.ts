/**
 * Training datasets customers upload: numeric features and one numeric label per row, as CSV or JSON lines.
 * Parsed once on upload (to refuse a bad file with the line at fault) and again by every device that trains
 * on it, which then takes its shard of the same seeded split; so the split must be reproducible anywhere
 * (the shuffle is spelled out below for SDKs in other languages).
 *
 * CSV: a header row, then one row per sample. The column named `label` (any case) is the label, or the last
 * column when none is; every other column is a feature. Cells are decimal numbers; a cell may be quoted.
 * JSON lines: one `{"features":[1.5,2,...],"label":1}` per line.
 * Blank lines are skipped in both. Line numbers in errors count from 1, blank lines included.
 */
export interface Dataset {
  /** rows × columns, row-major. */
  features: Float32Array
  labels: Float32Array
  rows: number
  /** Features per row (the label not counted). */
  columns: number
  /** `class` when every label is a non-negative integer (a class index), else `value` (regression). */
  labelKind: 'class' | 'value'
}

export type DatasetFormat = 'csv' | 'jsonl'

/** Most rows a dataset may have. */
export const MAX_DATASET_ROWS = 1_000_000

/** The file is not a dataset; the message says why and, for a bad row, on which line. */
export class DatasetError extends Error {
  constructor(message: string, readonly line?: number) {
    super(line === undefined ? message : `line ${line}: ${message}`)
    this.name = 'DatasetError'
  }
}

interface Line {
  number: number
  text: string
}

export function parseDataset(bytes: Uint8Array, format: DatasetFormat): Dataset {
  const lines = nonBlankLines(decode(bytes))
  if (lines.length === 0) throw new DatasetError('the file is empty')
  if (format !== 'csv' && format !== 'jsonl') throw new DatasetError(`unknown format ${JSON.stringify(format)}: csv or jsonl`)
  const header = format === 'csv' ? lines[0] : undefined
  const data = format === 'csv' ? lines.slice(1) : lines
  if (data.length === 0) throw new DatasetError('the file has a header but no rows')
  // checked before any parsing, so that an oversized file is refused fast
  const excess = data[MAX_DATASET_ROWS]
  if (excess) throw new DatasetError(`more than ${MAX_DATASET_ROWS.toLocaleString('en-US')} rows`, excess.number)
  const raw = header ? parseCsv(header, data) : parseJsonLines(data)
  return {
    ...raw,
    rows: data.length,
    labelKind: raw.labels.every((l) => Number.isInteger(l) && l >= 0) ? 'class' : 'value',
    labels: Float32Array.from(raw.labels),
  }
}

function decode(bytes: Uint8Array): string {
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes)
  } catch {
    throw new DatasetError('the file is not UTF-8 text')
  }
}

function nonBlankLines(text: string): Line[] {
  const lines: Line[] = []
  text.split(/\r?\n/).forEach((line, i) => {
    if (line.trim() !== '') lines.push({ number: i + 1, text: line })
  })
  return lines
}

type Parsed = { features: Float32Array; labels: number[]; columns: number }

function parseCsv(header: Line, data: Line[]): Parsed {
  const names = splitCsv(header).map((name) => name.trim())
  const labelAt = names.map((n) => n.toLowerCase()).indexOf('label')
  if (labelAt !== -1 && names.map((n) => n.toLowerCase()).lastIndexOf('label') !== labelAt) throw new DatasetError('two columns are named label', header.number)
  const label = labelAt === -1 ? names.length - 1 : labelAt
  const columns = names.length - 1
  if (columns < 1) throw new DatasetError('the header needs at least one feature column and a label column', header.number)
  const features = new Float32Array(data.length * columns)
  const labels: number[] = []
  data.forEach((line, row) => {
    const cells = splitCsv(line)
    if (cells.length !== names.length) throw new DatasetError(`expected ${names.length} columns, got ${cells.length}`, line.number)
    let at = row * columns
    cells.forEach((cell, i) => {
      if (i === label) labels.push(csvLabel(cell, line))
      else features[at++] = csvNumber(cell, line, names[i]!)
    })
  })
  return { features, labels, columns }
}

function csvLabel(cell: string, line: Line): number {
  const text = cell.trim()
  if (text === '') throw new DatasetError('missing label', line.number)
  const value = parseNumber(text)
  if (value === undefined) throw new DatasetError(`label ${JSON.stringify(text)} is not a number`, line.number)
  return value
}

function csvNumber(cell: string, line: Line, column: string): number {
  const text = cell.trim()
  if (text === '') throw new DatasetError(`column ${JSON.stringify(column)}: missing value`, line.number)
  const value = parseNumber(text)
  if (value === undefined) throw new DatasetError(`column ${JSON.stringify(column)}: ${JSON.stringify(text)} is not a number`, line.number)
  return value
}

const DECIMAL = /^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$/

/** A finite decimal number, or undefined: not Number()'s hex, empty string or "Infinity". */
function parseNumber(text: string): number | undefined {
  if (!DECIMAL.test(text)) return undefined
  const value = Number(text)
  return Number.isFinite(value) ? value : undefined
}

/** The cells of one CSV line: commas separate, double quotes enclose a cell, "" is a quote within one. */
function splitCsv(line: Line): string[] {
  const cells: string[] = []
  let cell = ''
  let quoted = false
  const text = line.text
  for (let i = 0; i < text.length; i++) {
    const ch = text[i]!
    if (quoted) {
      if (ch !== '"') cell += ch
      else if (text[i + 1] === '"') cell += text[++i]
      else quoted = false
    } else if (ch === '"' && cell.trim() === '') {
      quoted = true
      cell = ''
    } else if (ch === ',') {
      cells.push(cell)
      cell = ''
    } else cell += ch
  }
  if (quoted) throw new DatasetError('a quoted cell is not closed', line.number)
  cells.push(cell)
  return cells
}

function parseJsonLines(data: Line[]): Parsed {
  let columns = -1
  let features = new Float32Array(0)
  const labels: number[] = []
  data.forEach((line, row) => {
    const sample = jsonSample(line)
    if (columns === -1) {
      columns = sample.features.length
      features = new Float32Array(data.length * columns)
    } else if (sample.features.length !== columns) {
      throw new DatasetError(`expected ${columns} features, got ${sample.features.length}`, line.number)
    }
    features.set(sample.features, row * columns)
    labels.push(sample.label)
  })
  return { features, labels, columns }
}

function jsonSample(line: Line): { features: number[]; label: number } {
  let value: unknown
  try {
    value = JSON.parse(line.text)
  } catch {
    throw new DatasetError('not valid JSON', line.number)
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new DatasetError('expected an object {"features":[...],"label":n}', line.number)
  const { features, label } = value as { features?: unknown; label?: unknown }
  if (!Array.isArray(features)) throw new DatasetError('"features" must be an array of numbers', line.number)
  if (features.length === 0) throw new DatasetError('"features" is empty', line.number)
  const bad = features.findIndex((f) => typeof f !== 'number' || !Number.isFinite(f))
  if (bad !== -1) throw new DatasetError(`features[${bad}] is not a number: ${JSON.stringify(features[bad]) ?? 'undefined'}`, line.number)
  if (label === undefined || label === null) throw new DatasetError('missing label', line.number)
  if (typeof label !== 'number' || !Number.isFinite(label)) throw new DatasetError(`label ${JSON.stringify(label)} is not a number`, line.number)
  return { features: features as number[], label }
}

export interface SplitOptions {
  /** Share of the rows held out for validation, in [0, 1); default 0.2. */
  validationFraction?: number
  /** Any number; taken as an unsigned 32-bit integer (`seed >>> 0`). */
  seed: number
}

/**
 * A seeded shuffle of the rows, then the first round(rows × validationFraction) for validation and the rest
 * for training, each in shuffled order. With a fraction above 0 and at least 2 rows, each side gets at least
 * one row. The shuffle is Fisher–Yates from the last row down, j = floor(r × (i + 1)), r drawn from mulberry32
 * seeded with `seed >>> 0`: the same on every device and in every SDK.
 */
export function splitDataset(ds: Dataset, options: SplitOptions): { train: Dataset; validation: Dataset } {
  const fraction = options.validationFraction ?? 0.2
  if (!(fraction >= 0 && fraction < 1)) throw new RangeError(`validationFraction must be in [0, 1), got ${fraction}`)
  const order = shuffledRows(ds.rows, options.seed)
  const wanted = Math.round(ds.rows * fraction)
  const held = ds.rows < 2 || fraction === 0 ? 0 : Math.min(ds.rows - 1, Math.max(1, wanted))
  return { validation: pick(ds, order.subarray(0, held)), train: pick(ds, order.subarray(held)) }
}

function shuffledRows(rows: number, seed: number): Uint32Array {
  const order = Uint32Array.from({ length: rows }, (_, i) => i)
  const random = mulberry32(seed >>> 0)
  for (let i = rows - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1))
    const swap = order[i]!
    order[i] = order[j]!
    order[j] = swap
  }
  return order
}

/** mulberry32: a small, well-mixed 32-bit PRNG, easy to write again in any language. */
function mulberry32(seed: number): () => number {
  let state = seed
  return () => {
    state = (state + 0x6d2b79f5) >>> 0
    let t = state
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

function pick(ds: Dataset, rows: Uint32Array): Dataset {
  const features = new Float32Array(rows.length * ds.columns)
  const labels = new Float32Array(rows.length)
  rows.forEach((row, i) => {
    features.set(ds.features.subarray(row * ds.columns, (row + 1) * ds.columns), i * ds.columns)
    labels[i] = ds.labels[row]!
  })
  // the kind is the dataset's, not the subset's: a regression subset may happen to hold only integers
  return { features, labels, rows: rows.length, columns: ds.columns, labelKind: ds.labelKind }
}

/**
 * Rows [start, end) of shard `index` of `shards`: contiguous, in order, covering every row exactly once, the
 * first rows % shards shards one row longer than the rest.
 */
export function shardRows(rows: number, shards: number, index: number): [start: number, end: number] {
  if (!Number.isInteger(rows) || rows < 0) throw new RangeError(`rows must be an integer >= 0, got ${rows}`)
  if (!Number.isInteger(shards) || shards < 1) throw new RangeError(`shards must be an integer >= 1, got ${shards}`)
  if (!Number.isInteger(index) || index < 0 || index >= shards) throw new RangeError(`index must be an integer in [0, ${shards}), got ${index}`)
  const base = Math.floor(rows / shards)
  const longer = rows % shards
  const start = index * base + Math.min(index, longer)
  return [start, start + base + (index < longer ? 1 : 0)]
}
