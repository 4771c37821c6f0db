import { z } from 'zod'

/**
 * Federated averaging, pure: model weights are float32 tensors by initializer name. The sync modes average
 * a round's updates weighted by the samples each device trained on (FedAvg); the async mode mixes each
 * update into the global weights as it comes (FedAsync), less the staler it is. Also the binary layout that
 * weights travel in (base64 in WebSocket frames, raw in the blob store).
 */
export type Weights = Record<string, Float32Array>

/** Weights that do not fit together (names, lengths) or bytes that are not weights. */
export class WeightsError extends Error {
  constructor(message: string) {
    super(message)
    this.name = 'WeightsError'
  }
}

/** The sample-weighted mean of the updates: Σ samples_i · w_i / Σ samples_i, tensor by tensor (summed in float64). */
export function weightedAverage(updates: Array<{ weights: Weights; samples: number }>): Weights {
  const [first] = updates
  if (!first) throw new WeightsError('no updates to average')
  updates.forEach((u, i) => {
    if (!Number.isFinite(u.samples) || u.samples < 0) throw new WeightsError(`update ${i}: samples must be a finite number >= 0, got ${u.samples}`)
    if (i > 0) checkSameShape(first.weights, u.weights, `update ${i}`, 'update 0')
  })
  const total = updates.reduce((n, u) => n + u.samples, 0)
  if (total === 0) throw new WeightsError('the updates saw 0 samples in total: nothing to average')
  return mapTensors(first.weights, (name, length) => {
    const sum = new Float64Array(length)
    for (const { weights, samples } of updates) {
      const values = weights[name]!
      for (let k = 0; k < length; k++) sum[k]! += samples * values[k]!
    }
    return Float32Array.from(sum, (s) => s / total)
  })
}

export interface MixOptions {
  /** Samples the update trained on; an update of 0 samples is not applied. */
  samples: number
  /** Global versions committed since the weights the update started from (0: fresh). */
  staleness: number
  /** Mixing weight of a fresh update, in (0, 1]; default 0.5. */
  alpha?: number
  /** Updates staler than this are dropped. */
  maxStaleness: number
}

/**
 * FedAsync (Xie et al., 2019) with the polynomial staleness function, a = 0.5:
 *
 *   mix    = alpha · s(staleness),   s(t) = 1 / (1 + t)
 *   global ← (1 − mix) · global + mix · update
 *
 * A fresh update moves the global weights by alpha of the way towards it, one k rounds stale by alpha/(1+k).
 * An update staler than maxStaleness is dropped: `applied` false, `weights` the global weights themselves.
 */
export function mixAsync(global: Weights, update: Weights, options: MixOptions): { weights: Weights; applied: boolean; mix: number } {
  const { samples, staleness, alpha = 0.5, maxStaleness } = options
  if (!(alpha > 0 && alpha <= 1)) throw new WeightsError(`alpha must be in (0, 1], got ${alpha}`)
  if (!Number.isFinite(staleness) || staleness < 0) throw new WeightsError(`staleness must be a finite number >= 0, got ${staleness}`)
  if (!Number.isFinite(samples) || samples < 0) throw new WeightsError(`samples must be a finite number >= 0, got ${samples}`)
  checkSameShape(global, update, 'the update', 'the global weights')
  if (staleness > maxStaleness || samples === 0) return { weights: global, applied: false, mix: 0 }
  const mix = alpha / (1 + staleness)
  const weights = mapTensors(global, (name, length) => {
    const g = global[name]!
    const u = update[name]!
    const out = new Float32Array(length)
    for (let k = 0; k < length; k++) out[k] = (1 - mix) * g[k]! + mix * u[k]!
    return out
  })
  return { weights, applied: true, mix }
}

export type SyncMode = 'full_sync' | 'semi_sync'

/**
 * Whether a sync round can close. full_sync: every expected device sent its update; semi_sync: a quorum did
 * (default ceil(expected / 2), at most expected). In both, a passed deadline closes it with what came. A round
 * never closes with no update: there is nothing to average.
 */
export function roundReady(mode: SyncMode, round: { expected: number; received: number; deadlinePassed: boolean; quorum?: number }): boolean {
  const { expected, received, deadlinePassed } = round
  if (received < 1) return false
  if (deadlinePassed) return true
  switch (mode) {
    case 'full_sync':
      return received >= expected
    case 'semi_sync':
      return received >= Math.max(1, Math.min(expected, round.quorum ?? Math.ceil(expected / 2)))
    default: {
      const unknown: never = mode
      throw new Error(`unknown sync mode ${String(unknown)}`)
    }
  }
}

function checkSameShape(expected: Weights, actual: Weights, what: string, against: string): void {
  const names = Object.keys(expected)
  const missing = names.filter((n) => !Object.hasOwn(actual, n))
  const extra = Object.keys(actual).filter((n) => !Object.hasOwn(expected, n))
  if (missing.length > 0 || extra.length > 0) {
    const parts = [missing.length > 0 ? `missing ${missing.map((n) => JSON.stringify(n)).join(', ')}` : '', extra.length > 0 ? `unexpected ${extra.map((n) => JSON.stringify(n)).join(', ')}` : '']
    throw new WeightsError(`${what} has other tensors than ${against}: ${parts.filter(Boolean).join('; ')}`)
  }
  for (const n of names) {
    if (actual[n]!.length !== expected[n]!.length) throw new WeightsError(`${what}: tensor ${JSON.stringify(n)} has ${actual[n]!.length} values, ${against} ${expected[n]!.length}`)
  }
}

/** A new Weights with the same names, sorted; fromEntries so that a tensor named "__proto__" is just a name. */
function mapTensors(like: Weights, f: (name: string, length: number) => Float32Array): Weights {
  return Object.fromEntries(Object.keys(like).sort().map((name) => [name, f(name, like[name]!.length)]))
}

// ---- binary layout ----------------------------------------------------------------------------------------

/**
 * Weights on the wire and in the blob store (an SDK in another language reads it with a few lines):
 *
 *   bytes 0..3   "DCPW"
 *   bytes 4..7   header length H, uint32 little-endian
 *   8..8+H       header, UTF-8 JSON: {"version":1,"tensors":[{"name":"fc.weight","length":12}, ...]}
 *                then 0 to 3 zero bytes, so that the data starts at a multiple of 4
 *   data         each tensor's values in header order, float32 little-endian, nothing between them
 *
 * Tensors are written sorted by name, so equal weights give equal bytes (the blob store is content-addressed).
 */
const MAGIC = 'DCPW'
const FORMAT_VERSION = 1
const Header = z.object({
  version: z.literal(FORMAT_VERSION),
  tensors: z.array(z.object({ name: z.string(), length: z.number().int().min(0) })),
})
const LITTLE_ENDIAN = new Uint8Array(Uint16Array.of(1).buffer)[0] === 1

export function encodeWeights(weights: Weights): Buffer {
  const names = Object.keys(weights).sort()
  const header = Buffer.from(JSON.stringify({ version: FORMAT_VERSION, tensors: names.map((name) => ({ name, length: weights[name]!.length })) }))
  const dataStart = align4(8 + header.length)
  const out = Buffer.alloc(dataStart + names.reduce((n, name) => n + weights[name]!.length * 4, 0))
  out.write(MAGIC, 0, 'latin1')
  out.writeUInt32LE(header.length, 4)
  header.copy(out, 8)
  let at = dataStart
  for (const name of names) {
    const values = weights[name]!
    if (LITTLE_ENDIAN) out.set(new Uint8Array(values.buffer, values.byteOffset, values.byteLength), at)
    else values.forEach((v, k) => out.writeFloatLE(v, at + 4 * k))
    at += values.byteLength
  }
  return out
}

export function decodeWeights(buf: Uint8Array): Weights {
  const bytes = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength)
  if (bytes.length < 8 || bytes.toString('latin1', 0, 4) !== MAGIC) throw new WeightsError('not dcp weights (no "DCPW" at the start)')
  const headerLength = bytes.readUInt32LE(4)
  if (8 + headerLength > bytes.length) throw new WeightsError(`header of ${headerLength} bytes runs past the end (${bytes.length} bytes)`)
  let header: z.infer<typeof Header>
  try {
    header = Header.parse(JSON.parse(bytes.toString('utf8', 8, 8 + headerLength)))
  } catch (error) {
    throw new WeightsError(`bad header: ${error instanceof z.ZodError ? z.prettifyError(error) : (error as Error).message}`)
  }
  const dataStart = align4(8 + headerLength)
  const expected = dataStart + header.tensors.reduce((n, t) => n + t.length * 4, 0)
  if (bytes.length !== expected) throw new WeightsError(`the header describes ${expected} bytes, there are ${bytes.length}`)
  const seen = new Set<string>()
  let at = dataStart
  const entries = header.tensors.map(({ name, length }): [string, Float32Array] => {
    if (seen.has(name)) throw new WeightsError(`tensor ${JSON.stringify(name)} appears twice`)
    seen.add(name)
    const start = at
    at += length * 4
    // a copy, aligned and detached from the (maybe pooled) input buffer
    if (LITTLE_ENDIAN) return [name, new Float32Array(bytes.buffer.slice(bytes.byteOffset + start, bytes.byteOffset + at))]
    return [name, Float32Array.from({ length }, (_, k) => bytes.readFloatLE(start + 4 * k))]
  })
  return Object.fromEntries(entries)
}

export const weightsToBase64 = (weights: Weights): string => encodeWeights(weights).toString('base64')

export const weightsFromBase64 = (base64: string): Weights => decodeWeights(Buffer.from(base64, 'base64'))

const align4 = (n: number) => Math.ceil(n / 4) * 4
