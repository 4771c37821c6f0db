import { createHash, randomUUID } from 'node:crypto'
import { createReadStream, createWriteStream } from 'node:fs'
import { mkdir, readdir, readFile, rename, rm, stat, unlink } from 'node:fs/promises'
import path from 'node:path'
import { Transform, type Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'

/** A blob written to a temporary file and hashed, not yet in the store: keep it or discard it. */
export interface PendingBlob {
  sha256: string
  size: number
  /** Reads the written bytes (for checks before keeping them). */
  read(): Promise<Buffer>
  /** Moves it into the store under its hash; storing the same content twice keeps one copy. */
  keep(): Promise<void>
  discard(): Promise<void>
}

/** A stored blob as the collector sees it. */
export interface StoredBlob {
  sha256: string
  size: number
  /** Last written (a blob kept again, by an upload of the same content, is written again). */
  mtimeMs: number
}

const HEX64 = /^[0-9a-f]{64}$/

export class BlobTooLargeError extends Error {
  readonly code = 'PAYLOAD_TOO_LARGE'
  constructor(readonly limit: number) {
    super(`the file is larger than the limit of ${limit} bytes`)
  }
}

/**
 * Content-addressed files under `<data dir>/blobs`: `sha256/<2 hex>/<64 hex>`. Writes stream through a
 * hash into `tmp/` and are renamed into place only when kept, so a failed or refused upload leaves nothing
 * behind and a reader never sees half a file.
 */
export class BlobStore {
  private readonly tmp: string
  /** Serialises `keep` with `removeIfOlder`: a blob kept again is never deleted between the collector's look and its unlink. */
  private exclusive: Promise<unknown> = Promise.resolve()

  constructor(readonly root: string) {
    this.tmp = path.join(root, 'tmp')
  }

  /** Creates the folders and clears temporary files a crashed process left behind. */
  async init(): Promise<void> {
    await mkdir(path.join(this.root, 'sha256'), { recursive: true })
    await rm(this.tmp, { recursive: true, force: true })
    await mkdir(this.tmp, { recursive: true })
  }

  pathOf(sha256: string): string {
    if (!HEX64.test(sha256)) throw new Error(`not a sha256 hex digest: ${sha256}`)
    return path.join(this.root, 'sha256', sha256.slice(0, 2), sha256)
  }

  async has(sha256: string): Promise<boolean> {
    return stat(this.pathOf(sha256)).then(() => true, () => false)
  }

  read(sha256: string): Promise<Buffer> {
    return readFile(this.pathOf(sha256))
  }

  open(sha256: string): Readable {
    return createReadStream(this.pathOf(sha256))
  }

  /** Streams `source` into a temporary file, hashing it; past `maxBytes` it stops with BlobTooLargeError. */
  async write(source: Readable, options: { maxBytes?: number } = {}): Promise<PendingBlob> {
    const file = path.join(this.tmp, randomUUID())
    const hash = createHash('sha256')
    let size = 0
    const limit = options.maxBytes ?? Number.POSITIVE_INFINITY
    const meter = new Transform({
      transform(chunk: Buffer, _encoding, done) {
        size += chunk.length
        if (size > limit) return done(new BlobTooLargeError(limit))
        hash.update(chunk)
        done(null, chunk)
      },
    })
    try {
      await pipeline(source, meter, createWriteStream(file))
    } catch (error) {
      await rm(file, { force: true })
      throw error
    }
    const sha256 = hash.digest('hex')
    const target = this.pathOf(sha256)
    return {
      sha256,
      size,
      read: () => readFile(file),
      // The rename replaces an existing copy by the new file, so a blob kept again is new to the collector.
      keep: () => this.alone(async () => {
        await mkdir(path.dirname(target), { recursive: true })
        await rename(file, target)
      }),
      discard: () => rm(file, { force: true }),
    }
  }

  /** Every blob in the store (names that are not sha256 hex digests are not blobs and are left alone). */
  async *list(): AsyncGenerator<StoredBlob> {
    const base = path.join(this.root, 'sha256')
    for (const prefix of await readdir(base).catch(() => [])) {
      if (!/^[0-9a-f]{2}$/.test(prefix)) continue
      for (const name of await readdir(path.join(base, prefix)).catch(() => [])) {
        if (!HEX64.test(name) || !name.startsWith(prefix)) continue
        const info = await stat(path.join(base, prefix, name)).catch(() => undefined)
        if (info?.isFile()) yield { sha256: name, size: info.size, mtimeMs: info.mtimeMs }
      }
    }
  }

  /**
   * Deletes a blob if it was last written at or before `notAfterMs`; returns the bytes freed (undefined when
   * it is gone already or was written since). Looked at and deleted while no `keep` runs.
   */
  removeIfOlder(sha256: string, notAfterMs: number): Promise<number | undefined> {
    const file = this.pathOf(sha256)
    return this.alone(async () => {
      const info = await stat(file).catch(() => undefined)
      if (!info || info.mtimeMs > notAfterMs) return undefined
      const gone = await unlink(file).then(() => true, (error: NodeJS.ErrnoException) => {
        if (error.code === 'ENOENT') return false
        throw error
      })
      return gone ? info.size : undefined
    })
  }

  /** Deletes temporary files last written at or before `notAfterMs` (a write a crash or a lost request left); returns their count and bytes. */
  async removeStaleTemporary(notAfterMs: number): Promise<{ count: number; bytes: number }> {
    let count = 0
    let bytes = 0
    for (const name of await this.pending()) {
      const file = path.join(this.tmp, name)
      const info = await stat(file).catch(() => undefined)
      if (!info?.isFile() || info.mtimeMs > notAfterMs) continue
      await rm(file, { force: true })
      count += 1
      bytes += info.size
    }
    return { count, bytes }
  }

  private alone<T>(f: () => Promise<T>): Promise<T> {
    const run = this.exclusive.then(f, f)
    this.exclusive = run.catch(() => {})
    return run
  }

  /** Temporary files in flight (for tests: none should outlive a request). */
  async pending(): Promise<string[]> {
    return readdir(this.tmp).catch(() => [])
  }
}
