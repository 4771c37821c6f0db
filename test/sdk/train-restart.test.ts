import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import t from 'tap'
import { weightsToBase64 } from '../../src/domain/fedavg.js'
import { DeviceWorker } from '../../src/sdk/index.js'
import { loadTrainable } from '../../src/sdk/trainer/index.js'
import { mlpOnnxModel } from '../helpers/onnx.js'
import { FakeHub } from './fixtures/fake-hub.js'

const MLP = { inputs: 8, hidden: 16, outputs: 4 }

/**
 * The hub sends a job's train_start again (its dataset shard moved) and a round's train_weights right after,
 * while the worker still sets the new session up: the new session trains from those weights, not from the
 * start frame's older round (a full-sync round would wait for it in vain).
 */
t.test("weights that come while a job's session restarts are the new session's", async (t) => {
  const hub = await FakeHub.start()
  const stateDir = await mkdtemp(path.join(tmpdir(), 'dcp-sdk-'))
  const worker = new DeviceWorker({ server: hub.url, stateDir, log: () => {} })
  t.teardown(async () => {
    await worker.stop({ drain: false })
    await hub.close()
    await rm(stateDir, { recursive: true, force: true })
  })
  await worker.start()
  const start = (round: number, model: ReturnType<FakeHub['addModel']>, weights?: string) => ({
    type: 'train_start' as const,
    job_id: 'train_a',
    round,
    model,
    ...(weights ? { weights } : {}),
    config: { optimizer: 'sgd' as const, learning_rate: 0.01, batch_size: 8, local_steps: 2, sync_mode: 'full_sync' as const, sync_interval_ms: 60_000, loss: 'cross_entropy' as const },
    data: { type: 'stream' as const, task_seed: 1, stream_seed: 2, clusters_per_class: 1 },
  })
  const first = mlpOnnxModel({ ...MLP, seed: 1 })
  hub.send(start(0, hub.addModel('mlp_a', first)))
  const update = await hub.next('train_update', (f) => f.job_id === 'train_a', { timeoutMs: 10_000 })
  t.equal(update.base_round, 0)

  // the restarted session's model takes a while to download: the round's weights come meanwhile
  hub.downloadDelayMs = 300
  const weights = weightsToBase64(loadTrainable(first).getWeights())
  hub.send(start(1, hub.addModel('mlp_b', mlpOnnxModel({ ...MLP, seed: 2 })), weights))
  hub.send({ type: 'train_weights', job_id: 'train_a', round: 2, weights })
  const next = await hub.next('train_update', (f) => f.job_id === 'train_a', { from: update.index + 1, timeoutMs: 10_000 })
  t.equal(next.base_round, 2, `the new session trained from the round-2 weights (an update from round ${next.base_round})`)
})
