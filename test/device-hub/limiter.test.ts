import t from 'tap'
import { closeReason } from '../../src/device-hub/hub.js'
import { DEFAULT_LIMITS, FrameLimiter } from '../../src/device-hub/limits.js'

const limiter = () => new FrameLimiter(DEFAULT_LIMITS, 1000)

t.test('heartbeats: five per interval accepted, the rest dropped, the 50th dropped in an interval closes', async (t) => {
  const l = limiter()
  const verdicts = Array.from({ length: 55 }, () => l.heartbeat(10_000))
  t.same(verdicts.slice(0, 5), Array(5).fill('accept'))
  t.same(verdicts.slice(5, 54), Array(49).fill('drop'))
  t.equal(verdicts[54], 'close')
  t.equal(l.dropped, 50)
  t.equal(l.heartbeat(11_000), 'accept', 'a new interval starts afresh')
})

t.test('stored heartbeats: at most one per 0.8 interval', async (t) => {
  const l = limiter()
  t.same([0, 100, 799, 800, 1500, 1600].map((at) => l.store(at)), [true, false, false, true, false, true])
})

t.test('frames: small before registration, at most maxFramesPerSecond a second', async (t) => {
  const l = new FrameLimiter({ ...DEFAULT_LIMITS, maxFramesPerSecond: 1000 }, 1000)
  t.same(l.frame(64 * 1024 + 1, false, 0), { ok: false, close: 'too_large' })
  t.same(l.frame(64 * 1024 + 1, true, 0), { ok: true }, 'registered devices may send large frames')
  t.ok(Array.from({ length: 999 }, () => l.frame(10, true, 500)).every((v) => v.ok), '1000 in the second pass')
  t.same(l.frame(10, true, 999), { ok: false, close: 'rate' }, 'the 1001st in the second')
  t.same(l.frame(10, true, 1000), { ok: true }, 'the next second')
})

t.test('close reasons fit WebSocket\'s 123 bytes, also in other scripts', async (t) => {
  t.equal(closeReason('short'), 'short')
  const long = closeReason(`device banned: ${'é'.repeat(200)}`)
  t.ok(Buffer.byteLength(long) <= 123, `${Buffer.byteLength(long)} bytes`)
  t.match(long, /^device banned: é+$/)
})
