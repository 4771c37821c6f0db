import t from 'tap'
import { instanceTypesOf, robustnessOf, trainingDecider, type TrainingEvent, type TrainingSpec } from '../../src/domain/training-job.js'

/** A spec as jobs were recorded before robust aggregation: no aggregation fields, no instance_types. */
const oldSpec: TrainingSpec = {
  job_id: 'train_a',
  customer_id: 'cust_a',
  model_id: 'model_a',
  model_name: 'mlp',
  model_checksum: 'sha256:00',
  data_config: { type: 'stream', total_samples: 640, batch_size: 32, dataset_id: null, dataset_checksum: null, dataset_format: null, validation_fraction: 0.2, clusters_per_class: 1 },
  training_config: { epochs: 1, learning_rate: 0.001, optimizer: 'adam', target_accuracy: null, sync_mode: 'async', local_steps: 20, sync_interval_ms: 300, loss: 'cross_entropy' },
  resource_config: { min_devices: 1, max_devices: null, prefer_gpu: false, sdk_types: null, min_sdk_version: null },
  weight: 640,
  total_batches: 20,
  seed: 1,
  submitted_at: '2026-12-01T00:00:00.000Z',
}
const contribution = { device_id: 'dev_a', sdk_uuid: 'sdk', instance_type: 'user' as const, samples: 640, steps: 20, loss: 1, staleness: 0, cpu_ms: 1, gpu_ms: 0, wall_ms: 1, power_watts: 1 }
const round = (n: number, norms: (number | undefined)[]) => ({
  job_id: 'train_a', customer_id: 'cust_a', round: n, weights_sha256: 'ab', loss: 1, validation_loss: 1, accuracy: 0.5, samples: 640, steps: 20, batches_completed: 20 * n, epoch: 0, wall_ms: 1, at: '2026-12-01T00:00:01.000Z',
  contributions: norms.map((delta_norm) => ({ ...contribution, ...(delta_norm === undefined ? {} : { delta_norm, clipped: false }) })),
})
const fold = (events: TrainingEvent[]) => events.reduce(trainingDecider.evolve, trainingDecider.initialState())
const parse = (type: string, data: unknown) => trainingDecider.parse({ type, data, schemaVersion: 1 })

t.test('a job recorded before robust aggregation reads as fedavg, unclipped, on any device', async (t) => {
  const spec = parse('TrainingSubmitted', oldSpec).data as TrainingSpec
  t.same(robustnessOf(spec), { aggregation: 'fedavg', trim_fraction: 0.2, clip_norm: null, clip_factor: null })
  t.same(instanceTypesOf(spec), ['aws', 'user'])
  const old = parse('TrainingRoundCompleted', round(1, [undefined]))
  t.notOk('aggregation' in old.data, 'an old round gains no fields')
  t.same(fold([parse('TrainingSubmitted', oldSpec), old]).recentNorms, [], 'and gives no norm')
})

t.test('given a job, when an update is refused, then the refusal is recorded at the current round and counted', async (t) => {
  const state = fold([{ type: 'TrainingSubmitted', data: oldSpec }, parse('TrainingRoundCompleted', round(1, [0.5]))])
  const events = trainingDecider.decide({ type: 'RefuseUpdate', deviceId: 'dev_a', baseRound: 1, reason: 'too_frequent', message: 'too soon', at: '2026-12-01T00:00:02.000Z' }, state)
  t.same(events, [{ type: 'TrainingUpdateRefused', data: { job_id: 'train_a', device_id: 'dev_a', base_round: 1, round: 1, reason: 'too_frequent', message: 'too soon', at: '2026-12-01T00:00:02.000Z' } }])
  t.equal(fold([{ type: 'TrainingSubmitted', data: oldSpec }, ...events, ...events]).refusedUpdates, 2)
})

t.test("the async clip history is the last 10 updates' change norms, from the rounds", async (t) => {
  const rounds = Array.from({ length: 12 }, (_, i) => parse('TrainingRoundCompleted', round(i + 1, [i + 1])))
  t.same(fold([{ type: 'TrainingSubmitted', data: oldSpec }, ...rounds]).recentNorms, [3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
})

t.test('given a failed job, when it is paused, resumed or cancelled, then it is refused saying why it failed', async (t) => {
  const failed = fold([{ type: 'TrainingSubmitted', data: oldSpec }, { type: 'TrainingFailed', data: { job_id: 'train_a', error: 'the disk is full', at: '2026-12-01T00:00:01.000Z' } }])
  const at = '2026-12-01T00:00:02.000Z'
  t.throws(() => trainingDecider.decide({ type: 'PauseTraining', customerId: 'cust_a', at }, failed), { code: 'CANNOT_PAUSE', message: 'training job train_a is failed (the disk is full); only a queued or running job can be paused' })
  t.throws(() => trainingDecider.decide({ type: 'ResumeTraining', customerId: 'cust_a', at }, failed), { code: 'CANNOT_RESUME', message: /is failed \(the disk is full\)/ })
  t.throws(() => trainingDecider.decide({ type: 'CancelTraining', customerId: 'cust_a', at }, failed), { code: 'CANNOT_CANCEL', message: 'training job train_a is already failed (the disk is full)' })
})
