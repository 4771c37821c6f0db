import { mkdtemp, rm, utimes } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { Readable } from 'node:stream'
import t, { type Test } from 'tap'
import { BlobStore } from '../../src/blobs/blob-store.js'

const DAY = 24 * 3600_000

async function store(t: Test) {
  const dir = await mkdtemp(path.join(tmpdir(), 'dcp-blob-store-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  const blobs = new BlobStore(dir)
  await blobs.init()
  return blobs
}

const listed = async (blobs: BlobStore) => {
  const all: string[] = []
  for await (const blob of blobs.list()) all.push(blob.sha256)
  return all
}

const keep = async (blobs: BlobStore, text: string) => {
  const pending = await blobs.write(Readable.from([Buffer.from(text)]))
  await pending.keep()
  return pending.sha256
}

t.test('removeIfOlder deletes a blob only if it was not written since the cutoff, once', async (t) => {
  const blobs = await store(t)
  const sha = await keep(blobs, 'weights')
  const old = new Date(Date.now() - 2 * DAY)
  await utimes(blobs.pathOf(sha), old, old)
  const cutoff = Date.now() - DAY
  t.same(await listed(blobs), [sha])

  // the collector saw an old file; the same content is kept again before it deletes: the file stays
  const again = await blobs.write(Readable.from([Buffer.from('weights')]))
  const [, freed] = await Promise.all([again.keep(), blobs.removeIfOlder(sha, cutoff)])
  t.equal(freed, undefined, 'written since the cutoff: not deleted')
  t.ok(await blobs.has(sha))

  await utimes(blobs.pathOf(sha), old, old)
  t.equal(await blobs.removeIfOlder(sha, cutoff), 'weights'.length, 'old: deleted, its size freed')
  t.notOk(await blobs.has(sha))
  t.equal(await blobs.removeIfOlder(sha, cutoff), undefined, 'deleting again is a no-op')
  t.same(await listed(blobs), [])
})
