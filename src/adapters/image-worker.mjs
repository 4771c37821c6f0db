// The image pool's worker entry (plain JavaScript: a worker thread does not inherit the TypeScript loader
// that `dcp` registers in its main thread). tsx, registered in a namespace of its own, loads the TypeScript task.
import { register } from 'tsx/esm/api'

const loader = register({ namespace: 'dcp-image-worker' })
const { decode } = await loader.import('./image-worker.ts', import.meta.url)

export default decode
