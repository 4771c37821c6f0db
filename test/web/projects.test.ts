import { existsSync } from 'node:fs'
import { chromium } from 'playwright-core'
import t from 'tap'
import { inferenceSetup, input, poll } from '../helpers/inference.js'

/** Debian's chromium (`apt-get install -y chromium`); CHROMIUM_PATH overrides. */
const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/lib/chromium/chromium'
const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync']

t.test("the live-projects table shows a completed batch project's counts (it has no live stream)", async (t) => {
  if (!existsSync(CHROMIUM)) return void t.fail(`Chromium not found at ${CHROMIUM}: install it with \`apt-get install -y chromium\` (or set CHROMIUM_PATH)`)
  const { api, model, url, alice } = await inferenceSetup(t, { workers: 1 })
  const queued = await api('POST', '/inference/batch', { model_id: model.id, inputs: [0, 1, 2].map((i) => ({ data: input(i), shape: [1, 10] })) })
  t.equal(queued.status, 202, JSON.stringify(queued.body))
  await poll(api, queued.body.job_id, (b) => b.status === 'completed')
  const projectId = queued.body.project_id as string
  t.match((await api('GET', '/dashboard/projects')).body.projects, [{ project_id: projectId, status: 'completed', submitted_tasks: 3, completed_tasks: 3, failed_tasks: 0 }])

  // after the app, so it closes first (teardowns run last-registered first)
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS })
  t.teardown(() => browser.close())
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } })
  const errors: string[] = []
  page.on('pageerror', (e) => errors.push(e.message))
  await page.goto(`${url}/`)
  await page.fill('#api-key-input', alice.key)
  await page.click('#api-key-form button[type=submit]')
  const row = page.locator('#project-table tbody tr', { hasText: projectId })
  await row.waitFor({ timeout: 15_000 })
  const cells = await row.locator('td').allInnerTexts()
  // project, name, type, status, submitted, completed, failed, inputs/s, p50, p95, p99, stream
  t.same(cells.slice(3, 7).map((c) => c.trim()), ['completed', '3', '3', '0'], `the row shows its counts: ${cells.join(' | ')}`)
  t.equal(cells[11]?.trim(), 'not active')
  t.same(errors, [], 'no uncaught errors in the page')
})
