import { existsSync } from 'node:fs'
import { mkdir } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { type Browser, chromium, type Page } from 'playwright-core'
import t, { type Test } from 'tap'
import { testApp } from '../helpers/app.js'
import { eventually } from '../helpers/device.js'
import { trainingSetup } from '../helpers/training.js'

/** Debian's chromium (`apt-get install -y chromium`); CHROMIUM_PATH overrides. */
const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/lib/chromium/chromium'
const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync']
/** Where the screenshot goes: never into the repository. */
const SCREENSHOT = process.env.DASHBOARD_SCREENSHOT ?? path.join(tmpdir(), 'dcp-dashboard.png')
/** The browser globals the functions run in the page use (the project's tsconfig has no DOM library). */
declare const document: { getElementById(id: string): { dataset: Record<string, string | undefined> } | null; querySelector(selector: string): { textContent: string | null } | null }
declare const sessionStorage: { getItem(key: string): string | null }

const SECTIONS = ['fleet', 'utilization', 'projects', 'jobs', 'tasks', 'throughput', 'efficiency', 'comparison']

t.test('the page and its assets are served without auth, with their content types, outside the API docs', async (t) => {
  const { app } = await testApp(t)
  const page = await app.inject({ method: 'GET', url: '/' })
  t.equal(page.statusCode, 200)
  t.match(page.headers['content-type'], /^text\/html/)
  t.match(page.headers['content-security-policy'], /script-src 'self'/)
  t.match(page.body, /id="api-key-form"/)
  t.match(page.body, /href="\/docs"/, 'links to the API docs')
  const assets = [
    ['/dashboard/assets/app.js', /^text\/javascript/, /X-API-Key/],
    ['/dashboard/assets/styles.css', /^text\/css/, /#benchmark-form/],
    ['/dashboard/assets/chart.umd.js', /^text\/javascript/, /window\.Chart/],
  ] as const
  for (const [url, type, content] of assets) {
    const asset = await app.inject({ method: 'GET', url })
    t.equal(asset.statusCode, 200, url)
    t.match(asset.headers['content-type'], type, `${url} content type`)
    t.match(asset.body, content, `${url} content`)
  }
  const missing = await app.inject({ method: 'GET', url: '/dashboard/assets/nope.js' })
  t.equal(missing.statusCode, 404)
  t.equal(missing.json().error.code, 'NOT_FOUND')
  await app.ready()
  const web = app.routeTable.filter((r) => r.url === '/' || r.url.startsWith('/dashboard/assets/'))
  t.equal(web.length, 4)
  t.ok(web.every((r) => r.auth === 'none'), 'no auth on the page and its assets')
  const openapi = (await app.inject({ method: 'GET', url: '/api/v1/openapi.json' })).json()
  t.notOk(Object.keys(openapi.paths).some((p) => p === '/' || p.startsWith('/dashboard/assets')), 'hidden from the OpenAPI document')
})

/** A missing chromium fails the test (it is a dependency of the suite, not optional). */
function chromiumInstalled(t: Test): boolean {
  if (existsSync(CHROMIUM)) return true
  t.fail(`Chromium not found at ${CHROMIUM}: install it with \`apt-get install -y chromium\` (or set CHROMIUM_PATH)`)
  return false
}

/**
 * Launches Debian's chromium. Call it after starting the app: teardowns run last-registered first, so the
 * browser, and with it the page's open event streams, goes before the app's close waits for them.
 */
async function launch(t: Test): Promise<Browser> {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS })
  t.teardown(() => browser.close())
  return browser
}

/** Everything the page reports that would be a bug: console errors, uncaught errors, failed API calls. */
function watch(page: Page) {
  const problems = { console: [] as string[], page: [] as string[], api: [] as string[] }
  page.on('console', (m) => {
    if (m.type() === 'error') problems.console.push(`${m.text()} (${m.location().url})`)
  })
  page.on('pageerror', (e) => problems.page.push(e.stack ?? e.message))
  page.on('response', (r) => {
    const url = new URL(r.url())
    if (url.pathname.startsWith('/api/v1/') && r.status() >= 400) problems.api.push(`${r.status()} ${r.request().method()} ${url.pathname}`)
  })
  return problems
}

/** Waits for a condition in the page; a timeout fails the assertion with `what` and lets the test go on. */
async function expectIn(t: Test, what: string, wait: () => Promise<unknown>, details: () => Promise<string>): Promise<boolean> {
  const failure = await wait().then(() => undefined, (error: Error) => error.message.split('\n')[0])
  t.equal(failure, undefined, failure === undefined ? what : `${what}: ${failure}; page shows: ${await details().catch(() => '?')}`)
  return failure === undefined
}

/** Each message once (a failing endpoint fails on every refresh). */
const unique = (messages: string[]) => [...new Set(messages)]

async function enterKey(page: Page, key: string) {
  await page.fill('#api-key-input', key)
  await page.click('#api-key-form button[type=submit]')
}

t.test('the dashboard in a browser: two devices, every section, an inference benchmark, no errors', async (t) => {
  if (!chromiumInstalled(t)) return
  const { url, alice, api } = await trainingSetup(t, { devices: 2 })
  const devices = await eventually(async () => {
    const r = await api('GET', '/devices')
    const ids = ((r.body.devices ?? r.body.data ?? []) as { id?: string; device_id?: string }[]).map((d) => d.id ?? d.device_id ?? '')
    return ids.length === 2 ? ids : undefined
  }, 10_000, 'two devices')
  const browser = await launch(t)

  // an active project: the page follows it live, over a stream opened with a ticket (never the key in a URL)
  const watched = (await api('POST', '/projects', { name: 'watched', type: 'realtime' })).body.project_id as string
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } })
  const problems = watch(page)
  const requested: string[] = []
  page.on('request', (r) => requested.push(r.url()))
  await page.goto(`${url}/`)
  t.ok(await page.isVisible('#api-key-form'), 'the page asks for an API key')
  await enterKey(page, alice.key)
  t.ok(await page.isHidden('#api-key-form'), 'the form hides once a key is given')
  t.equal(await page.evaluate(() => sessionStorage.getItem('dcp.apiKey')), alice.key, 'the key is kept in sessionStorage')

  // (both waits end early when the page shows an error: the assertion after them says which)
  const listed = (ids: string[]) => ids.every((id) => document.querySelector('#device-table')?.textContent?.includes(id))
  await page.waitForFunction((ids) => (ids.every((id) => document.querySelector('#device-table')?.textContent?.includes(id)) || document.getElementById('fleet')?.dataset.state === 'error'), devices, { timeout: 15_000 }).catch(() => {})
  t.ok(await page.evaluate(listed, devices), `the fleet section lists both devices in #device-table; it shows: ${await page.locator('#fleet').innerText()}`)

  await page.selectOption('#benchmark-mode', 'inference')
  await page.click('#benchmark-start')
  const result = page.locator('#benchmark-result')
  await page.waitForSelector('#benchmark-result:is([data-status="completed"], [data-status="failed"], [data-status="error"])', { timeout: 60_000 }).catch(() => {})
  t.equal(await result.getAttribute('data-status'), 'completed', `an inference benchmark started from the form completes; it shows: ${await result.innerText()}`)

  // one more refresh round after the benchmark, so every section has loaded with data in it
  await page.waitForTimeout(5_500)
  await page.waitForFunction((ids) => ids.every((id) => document.getElementById(id)?.dataset.state !== 'loading'), SECTIONS, { timeout: 15_000 }).catch(() => {})
  for (const id of SECTIONS) {
    const state = await page.getAttribute(`#${id}`, 'data-state')
    const error = state === 'ok' ? '' : await page.locator(`#${id} .section-error`).innerText().catch(() => '')
    t.equal(state, 'ok', `section ${id} loaded${error ? `: ${error}` : ''}`)
  }
  const liveCell = page.locator('#project-table tr', { hasText: watched }).locator('td').last()
  const live = await eventually(async () => ((await liveCell.innerText().catch(() => '')) === 'live' ? 'live' : undefined), 10_000, 'the project live').catch(async () => liveCell.innerText().catch(() => '?'))
  t.equal(live, 'live', 'the active project is followed live')
  t.ok(requested.some((u) => u.includes(`/projects/${watched}/stream?`) && u.includes('ticket=dcp_t_')), 'its stream opened with a ticket')
  t.notOk(requested.some((u) => u.includes('api_key=')), 'no URL the page asked for holds the API key')

  const chartErrors = await page.locator('#efficiency .chart-error:visible').allInnerTexts()
  t.same(chartErrors, [], 'every efficiency chart loaded')

  await mkdir(path.dirname(SCREENSHOT), { recursive: true })
  await page.screenshot({ path: SCREENSHOT, fullPage: true })
  t.comment(`screenshot: ${SCREENSHOT}`)

  t.same(unique(problems.api), [], 'every API call succeeded')
  t.same(unique(problems.console), [], 'no console errors')
  t.same(unique(problems.page), [], 'no uncaught errors in the page')
})

t.test('a refused key is said so in the page, and another key can be given', async (t) => {
  if (!chromiumInstalled(t)) return
  const { app, customer } = await testApp(t)
  const alice = await customer()
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  const browser = await launch(t)
  const page = await browser.newPage()
  // the browser itself logs each 401 response to the console, so only uncaught errors count here
  const problems = watch(page)
  await page.goto(`${url}/`)
  await enterKey(page, 'dcp_k_not-a-key')
  await expectIn(
    t,
    'a 401 shows a message and the key form again',
    () => page.waitForSelector('#auth-message:visible', { timeout: 10_000 }),
    () => page.locator('body').innerText(),
  )
  t.match(await page.locator('#auth-message').innerText(), /refused.*401/i)
  t.ok(await page.isVisible('#api-key-form'), 'the form is back')
  await enterKey(page, alice.key)
  t.equal(await page.evaluate(() => sessionStorage.getItem('dcp.apiKey')), alice.key, 'the new key replaces the old one')
  await expectIn(
    t,
    'the new key is accepted: the fleet section loads',
    () => page.waitForSelector('#fleet[data-state="ok"]', { timeout: 10_000 }),
    () => page.locator('#fleet').innerText(),
  )
  t.ok(await page.isHidden('#auth-message'), 'the message is gone')
  await page.click('#change-key')
  t.ok(await page.isVisible('#api-key-form'), '"Change key" shows the form again')
  t.same(problems.page, [], 'no uncaught errors in the page')
})
