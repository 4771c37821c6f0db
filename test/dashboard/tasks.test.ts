import t from 'tap'
import { inferenceSetup, input } from '../helpers/inference.js'

t.test('GET /dashboard/tasks shows the kind of device, inputs, finish and latency of every task, in a project or not', async (t) => {
  const { api, model, projections } = await inferenceSetup(t, { workers: 1 })
  const single = await api('POST', '/inference', { model_id: model.id, input: { data: input(1), shape: [1, 10] } })
  t.equal(single.status, 200, JSON.stringify(single.body))
  const project = (await api('POST', '/projects', { name: 'live', type: 'realtime', model_id: model.id })).body
  const inProject = await api('POST', '/inference', { model_id: model.id, project_id: project.project_id, input: { data: input(2), shape: [1, 10] } })
  t.equal(inProject.status, 200, JSON.stringify(inProject.body))

  const tasks = (await api('GET', '/dashboard/tasks')).body.tasks as any[]
  t.equal(tasks.length, 2)
  const outside = tasks.find((task) => task.job_id === single.body.job_id)
  t.match(outside, { project_id: null, status: 'completed', instance_type: 'user', inputs: 1, finished_at: /^\d{4}-\d\d-\d\dT/ })
  t.ok(outside.latency_ms > 0, `a task outside a project has its latency (${outside.latency_ms})`)
  const inside = tasks.find((task) => task.job_id === inProject.body.job_id)
  t.match(inside, { project_id: project.project_id, status: 'completed', instance_type: 'user', inputs: 1, finished_at: /^\d{4}-\d\d-\d\dT/ })
  t.ok(inside.latency_ms > 0)
  t.ok(Date.parse(outside.finished_at) >= Date.parse(outside.queued_at))
  t.same((await api('GET', `/dashboard/tasks?project_id=${project.project_id}`)).body.tasks.map((task: any) => task.job_id), [inProject.body.job_id])

  // every figure comes from the events: a rebuild of the tasks read model gives the same rows
  await projections.rebuild('tasks')
  t.same((await api('GET', '/dashboard/tasks')).body.tasks, tasks, 'the same after a rebuild')
})
