import t from 'tap'
import { trainingStream } from '../../src/domain/training-job.js'
import { trainingBody, trainingSetup } from '../helpers/training.js'

/**
 * Given a job whose pause, resume or cancel hits an internal error (the store refuses that one append), the
 * coordinator fails the job: the answer is then 409 with why it failed, not 200 for a command never recorded.
 */
t.test('pause, resume and cancel that fail the job internally answer 409 with the reason, not 200', async (t) => {
  const { api, model, store } = await trainingSetup(t, { devices: 1 })
  const append = store.append.bind(store)
  const broken = new Set<string>() // event types whose next append fails
  store.append = async (streamId, events, options) => {
    const type = events.find((e) => broken.has(e.type))?.type
    if (type && streamId.startsWith('training-')) {
      broken.delete(type)
      throw new Error(`the disk is full (${type})`)
    }
    return append(streamId, events, options)
  }
  t.teardown(() => {
    store.append = append
  })
  const endless = trainingBody(model.id, { data: { total_samples: 1_000_000 }, training: { target_accuracy: undefined, epochs: 100 } })
  const start = async () => (await api('POST', '/training', endless)).body.job_id as string
  const phases = async (jobId: string) => (await store.readStream(trainingStream(jobId))).map((e) => e.type).filter((type) => ['TrainingPaused', 'TrainingResumed', 'TrainingCancelled', 'TrainingFailed'].includes(type))

  const paused = await start()
  broken.add('TrainingPaused')
  const pause = await api('POST', `/training/${paused}/pause`)
  t.equal(pause.status, 409, JSON.stringify(pause.body))
  t.equal(pause.body.error?.code, 'CANNOT_PAUSE')
  t.match(pause.body.error?.message, /is failed \(the disk is full \(TrainingPaused\)\)/)
  t.same(await phases(paused), ['TrainingFailed'])
  t.equal((await api('GET', `/training/${paused}`)).body.status, 'failed')

  const resumed = await start()
  t.equal((await api('POST', `/training/${resumed}/pause`)).status, 200)
  broken.add('TrainingResumed')
  const resume = await api('POST', `/training/${resumed}/resume`)
  t.equal(resume.status, 409, JSON.stringify(resume.body))
  t.equal(resume.body.error?.code, 'CANNOT_RESUME')
  t.match(resume.body.error?.message, /is failed \(the disk is full \(TrainingResumed\)\)/)
  t.same(await phases(resumed), ['TrainingPaused', 'TrainingFailed'])

  const cancelled = await start()
  broken.add('TrainingCancelled')
  const cancel = await api('DELETE', `/training/${cancelled}`)
  t.equal(cancel.status, 409, JSON.stringify(cancel.body))
  t.equal(cancel.body.error?.code, 'CANNOT_CANCEL')
  t.match(cancel.body.error?.message, /already failed \(the disk is full \(TrainingCancelled\)\)/)
  t.same(await phases(cancelled), ['TrainingFailed'])
})

/**
 * Given an internal error that fails the job, and a store that refuses the failure's record too (twice), the
 * coordinator keeps trying: the job ends `failed` in the log, not `running` with no device until a restart.
 */
t.test('a failure the store refuses to record at first is recorded on a later try', async (t) => {
  const { api, model, store } = await trainingSetup(t, { devices: 1 })
  const append = store.append.bind(store)
  let pauseFailures = 1
  let failureRefusals = 2
  store.append = async (streamId, events, options) => {
    if (streamId.startsWith('training-')) {
      if (pauseFailures > 0 && events.some((e) => e.type === 'TrainingPaused')) {
        pauseFailures--
        throw new Error('the disk is full (TrainingPaused)')
      }
      if (failureRefusals > 0 && events.some((e) => e.type === 'TrainingFailed')) {
        failureRefusals--
        throw new Error('the disk is still full (TrainingFailed)')
      }
    }
    return append(streamId, events, options)
  }
  t.teardown(() => {
    store.append = append
  })
  const endless = trainingBody(model.id, { data: { total_samples: 1_000_000 }, training: { target_accuracy: undefined, epochs: 100 } })
  const jobId = (await api('POST', '/training', endless)).body.job_id as string
  const pause = await api('POST', `/training/${jobId}/pause`)
  t.equal(pause.status, 409, JSON.stringify(pause.body))
  t.equal(failureRefusals, 0, 'the failure was refused twice')
  const types = (await store.readStream(trainingStream(jobId))).map((e) => e.type)
  t.ok(types.includes('TrainingFailed'), `the failure is in the log (${types.join(', ')})`)
  t.equal((await api('GET', `/training/${jobId}`)).body.status, 'failed')
})
