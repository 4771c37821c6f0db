import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import t from 'tap'
import { WorkerLog } from '../../src/sdk/log.js'
import { taskMeters } from '../../src/sdk/meter.js'
import { ModelStore } from '../../src/sdk/models.js'
import { type RunHooks, runTask } from '../../src/sdk/task.js'
import { denseOnnxModel } from '../helpers/onnx.js'
import { FakeHub, HUB_TOKEN } from './fixtures/fake-hub.js'

t.test('tasks run side by side are billed the CPU the process used once, not once each', async (t) => {
  const hub = await FakeHub.start()
  const cacheDir = await mkdtemp(path.join(tmpdir(), 'dcp-task-'))
  const models = new ModelStore({ server: hub.url, cacheDir, cuda: false, threads: 1, log: new WorkerLog(), token: () => HUB_TOKEN })
  t.teardown(async () => {
    await models.release()
    await hub.close()
    await rm(cacheDir, { recursive: true, force: true })
  })
  // enough work per run (100 x 1000 x 1000 multiply-adds) that the runs overlap
  const model = hub.addModel('big', denseOnnxModel({ inputs: 1000, outputs: 1000, softmax: false }))
  await models.load(model, () => {})
  const input = { data: Array.from({ length: 100 * 1000 }, (_, i) => ((i * 7919) % 1000) / 1000), shape: [100, 1000] }
  let n = 0
  const fourAtOnce = async (hooks: RunHooks) => {
    const before = process.cpuUsage()
    const results = await Promise.all(
      [1, 2, 3, 4].map(() => runTask({ type: 'task', task_id: `t${++n}`, lease_id: `l${n}`, lease_deadline: new Date().toISOString(), model, input }, models, hooks)),
    )
    const used = process.cpuUsage(before)
    t.ok(results.every((r) => r.status === 'completed'))
    return { billed: results.reduce((sum, r) => sum + r.metrics.cpu_ms, 0), used: (used.user + used.system) / 1000 }
  }
  // Each measuring the process on its own: every task is billed the others' CPU too (what this prevents).
  const alone = await fourAtOnce({})
  t.ok(alone.billed > alone.used * 1.5, `measured alone, four runs side by side bill ${alone.billed.toFixed(0)} ms for ${alone.used.toFixed(0)} ms used`)
  const shared = await fourAtOnce({ meters: taskMeters() })
  t.ok(shared.billed <= shared.used + 1, `on shared meters they bill ${shared.billed.toFixed(1)} ms, at most the ${shared.used.toFixed(1)} ms used`)
  t.ok(shared.billed >= shared.used * 0.6, 'and most of it: the runs are what used it')
})
