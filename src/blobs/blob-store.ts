import { createHash, randomUUID } from 'node:crypto'
import { createReadStream, createWriteStream } from 'node:fs'
import { mkdir, readdir, readFile, rename, rm, stat } from 'node:fs/promises'
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
    if (!/^[0-9a-f]{64}$/.test(sha256)) throw new Error(`not a sha256 hex digest: ${sha256}`)
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
      keep: async () => {
        await mkdir(path.dirname(target), { recursive: true })
        await rename(file, target)
      },
      discard: () => rm(file, { force: true }),
    }
  }

  /** Temporary files in flight (for tests: none should outlive a request). */
  async pending(): Promise<string[]> {
    return readdir(this.tmp).catch(() => [])
  }
}
