/**
 * Settings read from the environment (src/config.ts): values in range are taken, others refused with a
 * ConfigError naming the variable (what `dcp start` prints before exiting 1).
 */
import t from 'tap'
import { ConfigError, loadConfig } from '../../src/config.js'

t.test('PAYLOAD_INLINE_MAX_BYTES: 64 KiB by default; 1 KiB to 512 KiB taken; anything else refused naming it', async (t) => {
  t.equal(loadConfig({}).payloadInlineMaxBytes, 65536)
  t.equal(loadConfig({ PAYLOAD_INLINE_MAX_BYTES: '1024' }).payloadInlineMaxBytes, 1024)
  t.equal(loadConfig({ PAYLOAD_INLINE_MAX_BYTES: String(512 * 1024) }).payloadInlineMaxBytes, 524288)
  for (const bad of ['1023', String(512 * 1024 + 1), '2.5', 'lots', '-1']) {
    t.throws(() => loadConfig({ PAYLOAD_INLINE_MAX_BYTES: bad }), { constructor: ConfigError, message: /PAYLOAD_INLINE_MAX_BYTES/ }, bad)
  }
})

t.test('TASK_PREFETCH: 4 by default; 1 to 64', async (t) => {
  t.equal(loadConfig({}).taskPrefetch, 4)
  t.equal(loadConfig({ TASK_PREFETCH: '1' }).taskPrefetch, 1)
  for (const bad of ['0', '65', 'x']) t.throws(() => loadConfig({ TASK_PREFETCH: bad }), { constructor: ConfigError, message: /TASK_PREFETCH/ }, bad)
})
