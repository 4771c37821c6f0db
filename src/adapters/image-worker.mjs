// The image pool's worker entry (plain JavaScript: a worker thread does not inherit the TypeScript loader
// that `dcp` registers in its main thread). tsx, registered in a namespace of its own, loads the TypeScript task.
import { setPriority } from 'node:os'
import { register } from 'tsx/esm/api'

// Decoding is bulk work on one customer's behalf: below the event loop that answers everyone's requests and
// the device hub. On Linux a thread has a nice value of its own, so this lowers only this thread; where the
// system refuses, decoding goes on at normal priority.
try {
  setPriority(10)
} catch {}

const loader = register({ namespace: 'dcp-image-worker' })
const { decode } = await loader.import('./image-worker.ts', import.meta.url)

export default decode
