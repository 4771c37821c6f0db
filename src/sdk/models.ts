import { createHash, randomBytes } from 'node:crypto'
import { createWriteStream } from 'node:fs'
import { mkdir, readFile, rename, stat, unlink } from 'node:fs/promises'
import path from 'node:path'
import { Readable, Transform } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import type { ReadableStream as WebReadableStream } from 'node:stream/web'
import * as ort from 'onnxruntime-node'
import type { TaskAssignment } from '../protocol/frames.js'
import type { WorkerLog } from './log.js'

export type ModelRef = TaskAssignment['model']

/** A model ready to run, and whether it runs on the CUDA execution provider. */
export interface LoadedModel {
  session: ort.InferenceSession
  gpu: boolean
}

export interface ModelStoreOptions {
  /** Base URL the download paths are relative to. */
  server: string
  cacheDir: string
  cuda: boolean
  /** onnxruntime intra-op threads of each session (one run uses at most this many cores). */
  threads: number
  log: WorkerLog
  /** The SDK token for `X-SDK-Token` (known only once registered). */
  token: () => string | undefined
}

/** `sha256:<hex>` -> `<hex>`; anything else is refused (the cache is keyed by it). */
export function sha256Hex(checksum: string): string {
  const match = /^sha256:([0-9a-f]{64})$/i.exec(checksum)
  if (!match) throw new Error(`unsupported model checksum ${JSON.stringify(checksum.slice(0, 100))} (expected sha256:<64 hex>)`)
  return match[1]!.toLowerCase()
}

/**
 * Model files on disk (`<cacheDir>/<sha256 hex>`, downloaded once per checksum) and onnxruntime sessions in
 * memory (one per checksum). Concurrent tasks for the same model share one download and one session.
 */
export class ModelStore {
  private readonly downloads = new Map<string, Promise<string>>()
  private readonly sessions = new Map<string, Promise<LoadedModel>>()
  /** Set once CUDA failed: no point asking (and warning) again for every model. */
  private cudaUnavailable = false

  constructor(private readonly options: ModelStoreOptions) {}

  /** The session for `model`; `onBytes` counts the bytes downloaded on this call's behalf. */
  async load(model: ModelRef, onBytes: (bytes: number) => void): Promise<LoadedModel> {
    if (model.format !== 'onnx') throw new Error(`model format ${model.format} is not supported by this device (onnx only)`)
    const hex = sha256Hex(model.checksum)
    let loaded = this.sessions.get(hex)
    if (!loaded) {
      loaded = this.file(model, hex, onBytes).then((file) => this.open(file, model.id))
      this.sessions.set(hex, loaded)
      // A failed load is not cached: the next task for this model tries again.
      loaded.catch(() => this.sessions.delete(hex))
    }
    return loaded
  }

  /** The bytes of a file the hub serves by checksum (a model, or a training dataset), cached like models. */
  async bytes(ref: { id: string; checksum: string; download_path: string }): Promise<Buffer> {
    const model = { ...ref, format: 'onnx' as const }
    return readFile(await this.file(model, sha256Hex(ref.checksum), () => {}))
  }

  async release(): Promise<void> {
    const sessions = [...this.sessions.values()]
    this.sessions.clear()
    await Promise.allSettled(sessions.map(async (loaded) => (await loaded).session.release()))
  }

  private async file(model: ModelRef, hex: string, onBytes: (bytes: number) => void): Promise<string> {
    const target = path.join(this.options.cacheDir, hex)
    if (await exists(target)) return target
    let download = this.downloads.get(hex)
    if (!download) {
      download = this.download(model, hex, target, onBytes).finally(() => this.downloads.delete(hex))
      this.downloads.set(hex, download)
    }
    return download
  }

  /** Streams to a temp file while hashing, and moves it into place only once the checksum matches. */
  private async download(model: ModelRef, hex: string, target: string, onBytes: (bytes: number) => void): Promise<string> {
    const url = `${this.options.server}${model.download_path}`
    const token = this.options.token()
    this.options.log.info(`downloading model ${model.id} from ${url}`)
    const response = await fetch(url, { headers: token ? { 'X-SDK-Token': token } : {} })
    if (!response.ok || !response.body) {
      await response.body?.cancel()
      throw new Error(`model ${model.id} download failed: GET ${model.download_path} answered HTTP ${response.status}`)
    }
    await mkdir(this.options.cacheDir, { recursive: true })
    const temp = `${target}.${randomBytes(4).toString('hex')}.tmp`
    const hash = createHash('sha256')
    let bytes = 0
    const tap = new Transform({
      transform(chunk: Buffer, _encoding, done) {
        hash.update(chunk)
        bytes += chunk.length
        onBytes(chunk.length)
        done(null, chunk)
      },
    })
    try {
      await pipeline(Readable.fromWeb(response.body as WebReadableStream), tap, createWriteStream(temp))
      const actual = hash.digest('hex')
      if (actual !== hex) throw new Error(`model ${model.id} checksum mismatch: expected sha256:${hex}, downloaded sha256:${actual}`)
      await rename(temp, target)
    } catch (error) {
      await unlink(temp).catch(() => undefined)
      throw error
    }
    this.options.log.info(`model ${model.id} downloaded (${bytes} bytes) to ${target}`)
    return target
  }

  private async open(file: string, modelId: string): Promise<LoadedModel> {
    if (this.options.cuda && !this.cudaUnavailable) {
      try {
        return { session: await ort.InferenceSession.create(file, { ...this.threading(), executionProviders: ['cuda'] }), gpu: true }
      } catch (error) {
        this.cudaUnavailable = true
        this.options.log.warn(`CUDA execution provider unavailable, running model ${modelId} on CPU: ${(error as Error).message}`)
      }
    }
    return { session: await ort.InferenceSession.create(file, { ...this.threading(), executionProviders: ['cpu'] }), gpu: false }
  }

  /**
   * Each session gets a pool of `threads`. onnxruntime's default is a thread per core in every session, so
   * with several tasks running side by side a many-core machine would run tasks × cores threads. (On the
   * 2-core machine the benches run on, 1 and 2 threads a session measured the same within the noise.)
   */
  private threading(): ort.InferenceSession.SessionOptions {
    return { intraOpNumThreads: this.options.threads, interOpNumThreads: 1 }
  }
}

async function exists(file: string): Promise<boolean> {
  try {
    return (await stat(file)).isFile()
  } catch {
    return false
  }
}
