/**
 * Child process of embedded.test.ts: starts the embedded Postgres in the given directory, prints its socket
 * directory, and holds it until the parent kills it (SIGKILL: no chance to stop the server).
 */
import { startEmbeddedPostgres } from '../../src/postgres/embedded.js'

const server = await startEmbeddedPostgres(process.argv[2]!)
console.log(JSON.stringify({ socketDir: server.socketDir }))
setInterval(() => {}, 60_000)
