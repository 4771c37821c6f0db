import t from 'tap'
import { trainingStream } from '../../src/domain/training-job.js'
import { maliciousDevice, trainingBody, trainingSetup } from '../helpers/training.js'

/**
 * One of four devices is malicious: every round it sends −10 × the weights it was given, claiming 10⁹
 * samples. Three honest devices train the MLP for real. Within the same epoch budget plain FedAvg misses the
 * target (the liar's update outweighs the others even with its samples capped: the mean flips and grows),
 * while trimmed_mean and median reach 0.9 validation accuracy.
 */
const EPOCHS = 2 // 1,250 batches: about 15 rounds of 4 × 20 steps

for (const aggregation of ['fedavg', 'trimmed_mean', 'median'] as const) {
  t.test(`${aggregation}: three honest devices and one that sends −10 × its weights claiming 10⁹ samples`, async (t) => {
    const { api, model, bytes, url, waitFor, store, startDevice } = await trainingSetup(t)
    const liar = await maliciousDevice(t, url, bytes)
    for (let i = 0; i < 3; i++) await startDevice()
    const body = trainingBody(model.id, {
      data: { seed: 4242 },
      training: { sync_mode: 'full_sync', epochs: EPOCHS, aggregation },
      resources: { min_devices: 4, max_devices: 4 },
    })
    const started = await api('POST', '/training', body)
    t.equal(started.status, 202, JSON.stringify(started.body))
    const jobId = started.body.job_id
    const done = await waitFor(jobId, (job) => job.status !== 'queued' && job.status !== 'running', 120_000)
    t.equal(done.config.aggregation, aggregation, 'the rule is echoed back')
    const rounds = (await store.readStream(trainingStream(jobId))).filter((e) => e.type === 'TrainingRoundCompleted').map((e) => e.data as any)
    t.ok(rounds.length > 0, `${rounds.length} rounds`)
    t.ok(rounds.some((r) => r.contributions.some((c: any) => c.device_id === liar.device.deviceId)), 'the liar took part')
    t.ok(rounds.every((r) => r.aggregation === aggregation), 'every round records its rule')
    // its claim is recorded, and capped at what it was given: 20 steps of 32
    const lies = rounds.flatMap((r) => r.contributions.filter((c: any) => c.device_id === liar.device.deviceId))
    t.ok(lies.every((c: any) => c.samples === 640 && c.claimed_samples === 1e9 && c.steps === 20), 'the liar is credited 640 samples, not 10⁹')
    if (aggregation === 'fedavg') {
      t.not(done.end_reason, 'target_accuracy', `fedavg is poisoned: ${done.status}, ${done.end_reason ?? done.error}, accuracy ${done.validation_accuracy}`)
      t.ok(done.status === 'failed' || (done.status === 'completed' && done.validation_accuracy < 0.9))
    } else {
      t.equal(done.status, 'completed', JSON.stringify({ status: done.status, error: done.error }))
      t.equal(done.end_reason, 'target_accuracy', `reached ${done.validation_accuracy} in ${rounds.length} rounds`)
      t.ok(done.validation_accuracy >= 0.9)
      t.ok(lies.every((c: any) => c.clipped === true), "the liar's change is clipped every round")
    }
  })
}
