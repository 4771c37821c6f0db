import t from 'tap'
import { WrongExpectedRevisionError } from '../../src/event-store/errors.js'
import { inferenceSetup, input, poll } from '../helpers/inference.js'

const batch = (modelId: string) => ({ model_id: modelId, name: 'nightly', inputs: [0, 1, 2].map((i) => ({ data: input(i), shape: [1, 10] })) })

t.test("a batch's new project is recorded with its job and tasks: a failure writing them leaves no orphan project", async (t) => {
  const { api, model, store } = await inferenceSetup(t, { workers: 1 })
  // the database fails the write of the job and its tasks (once)
  const appendMany = store.appendMany.bind(store)
  let failures = 1
  store.appendMany = async (appends) => {
    if (failures > 0 && appends.some((a) => a.events.some((e) => e.type === 'InferenceRequested'))) {
      failures--
      throw new Error('the connection was lost')
    }
    return appendMany(appends)
  }
  t.teardown(() => {
    store.appendMany = appendMany
  })
  const failed = await api('POST', '/inference/batch', batch(model.id))
  t.equal(failed.status, 500)
  const events = await store.readAll()
  t.notOk(events.some((e) => e.type === 'ProjectCreated'), 'no project recorded without its job')
  t.same((await api('GET', '/projects')).body.projects, [], 'no project listed')

  const queued = await api('POST', '/inference/batch', batch(model.id))
  t.equal(queued.status, 202, JSON.stringify(queued.body))
  await poll(api, queued.body.job_id, (b) => b.status === 'completed')
  const project = await api('GET', `/projects/${queued.body.project_id}`)
  t.match(project.body, { project_id: queued.body.project_id, name: 'nightly', type: 'batch', status: 'completed', total_tasks: 3, completed_tasks: 3 })
})

t.test("a batch project id taken already (the same millisecond) is picked again, and the batch goes in", async (t) => {
  const { api, model, store } = await inferenceSetup(t, { workers: 1 })
  const appendMany = store.appendMany.bind(store)
  let taken = 1
  store.appendMany = async (appends) => {
    const project = appends.find((a) => a.events.some((e) => e.type === 'ProjectCreated'))
    if (project && taken-- > 0) throw new WrongExpectedRevisionError(project.streamId, 'no_stream', 0)
    return appendMany(appends)
  }
  t.teardown(() => {
    store.appendMany = appendMany
  })
  const queued = await api('POST', '/inference/batch', batch(model.id))
  t.equal(queued.status, 202, JSON.stringify(queued.body))
  t.match(queued.body.project_id, /^batch_\d+_\w{6}$/, 'another id')
  const created = (await store.readAll()).filter((e) => e.type === 'ProjectCreated')
  t.equal(created.length, 1)
})
