import t, { type Test } from 'tap'
import WebSocket, { WebSocketServer } from 'ws'
import { sendText } from '../../src/protocol/send.js'

async function pair(t: Test) {
  const server = new WebSocketServer({ port: 0, host: '127.0.0.1' })
  await new Promise((resolve) => server.once('listening', resolve))
  const accepted = new Promise<WebSocket>((resolve) => server.once('connection', resolve))
  const client = new WebSocket(`ws://127.0.0.1:${(server.address() as { port: number }).port}`)
  await new Promise((resolve) => client.once('open', resolve))
  const peer = await accepted
  t.teardown(() => {
    client.terminate()
    server.close()
  })
  return { client, peer }
}

t.test('frames sent in one tick arrive whole and in order, in fewer writes than frames', async (t) => {
  const { client, peer } = await pair(t)
  const received: string[] = []
  const all = new Promise<void>((resolve) => client.on('message', (data) => received.push(data.toString()) === 200 && resolve()))
  const raw = (peer as unknown as { _socket: { write: (...a: unknown[]) => boolean; _writev?: unknown } })._socket
  let writes = 0
  const countWrites = (target: Record<string, unknown>, name: string) => {
    const original = target[name] as ((...a: unknown[]) => unknown) | undefined
    if (!original) return
    target[name] = function (this: unknown, ...a: unknown[]) {
      writes++
      return original.apply(this, a)
    }
  }
  countWrites(raw as unknown as Record<string, unknown>, '_write')
  countWrites(raw as unknown as Record<string, unknown>, '_writev')
  for (let i = 0; i < 200; i++) sendText(peer, JSON.stringify({ i, pad: 'x'.repeat(i) }))
  await all
  t.same(received.map((r) => JSON.parse(r).i), Array.from({ length: 200 }, (_, i) => i), 'every frame, in order')
  t.ok(received.every((r, i) => JSON.parse(r).pad.length === i), 'every frame whole')
  t.ok(writes >= 1 && writes < 10, `200 frames left in ${writes} socket write(s)`)

  // the next tick's frames are not held back
  sendText(peer, 'later')
  const later = await new Promise<string>((resolve) => client.once('message', (d) => resolve(d.toString())))
  t.equal(later, 'later')
})

t.test('a socket that closes within the tick does not throw', async (t) => {
  const { client, peer } = await pair(t)
  const closed = new Promise((resolve) => client.once('close', resolve))
  sendText(peer, 'one')
  peer.terminate()
  t.doesNotThrow(() => sendText(peer, 'two')) // ws reports a send on a closed socket through its callback, not a throw
  await closed
  t.equal(peer.readyState, WebSocket.CLOSED)
})
