import { readFile } from 'node:fs/promises'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import t from 'tap'
import { ADMIN_KEY, INTERNAL_TOKEN, multipart } from '../helpers/app.js'
import { inferenceSetup } from '../helpers/inference.js'
import { ensureSchemathesis, runSchemathesis, schemathesisReport } from '../helpers/schemathesis.js'

/**
 * Issue #21: schemathesis against a real server's OpenAPI document, with every check (response schemas
 * included) and its stateful phase, must find nothing. The seed is fixed and the examples per operation
 * bounded, and the run has a time budget (the file takes about three minutes).
 *
 * Alone: `npm test -- test/http/schemathesis.test.ts` (the README says how to fuzz a running `npm start`).
 */
/** The repository's settings: the seed, the credentials (from the environment), the exemptions and why. */
const CONFIG = fileURLToPath(new URL('../../schemathesis.toml', import.meta.url))
const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url))
/** Test cases per operation and phase, and the run's time budget (schemathesis repeats fuzzing while time is left). */
const MAX_EXAMPLES = 10
const MAX_TIME_S = 150

t.test('schemathesis finds no failure in the API', { timeout: 420_000 }, async (t) => {
  // 1. schemathesis from PyPI, in the repository's venv (a failure to install fails the test, saying why)
  ensureSchemathesis()
  // 2. a real server: Postgres, a customer with a model and a dataset, a real worker that runs inference
  const { app, url, alice, model, dir } = await inferenceSetup(t, { workers: 1, overrides: { authFailures: { max: 1_000_000, windowMs: 60_000 } } }) // the fuzzer's own bad credentials must not lock its address out
  const form = multipart({ name: 'fuzz data' }, { field: 'file', name: 'data.csv', content: Buffer.from('a,b,label\n1,2,0\n3,4,1\n5,6,0\n') })
  const dataset = await app.inject({ method: 'POST', url: '/api/v1/datasets', headers: { ...form.headers, 'x-api-key': alice.key }, payload: form.payload })
  t.equal(dataset.statusCode, 201, 'a dataset to start from')
  t.ok(model.id, 'a model to start from')
  const device = JSON.parse(await readFile(path.join(dir, 'w0', 'device.json'), 'utf8')) as { sdk_token: string }
  // 3. every security scheme of the document gets its credential (schemathesis.toml reads them from the environment)
  const credentials = { DCP_API_KEY: alice.key, DCP_ADMIN_KEY: ADMIN_KEY, DCP_INTERNAL_TOKEN: INTERNAL_TOKEN, DCP_SDK_TOKEN: device.sdk_token }
  // 4. every phase, the stateful one included, and every check: schemathesis.toml enables them all and says
  // which operation skips which check, and why (a `--checks` option here would override those lines)
  const args = [
    '--config-file', CONFIG, 'run', `${url}/api/v1/openapi.json`,
    '--phases', 'examples,coverage,fuzzing,stateful',
    '--max-examples', String(MAX_EXAMPLES),
    '--max-time', String(MAX_TIME_S),
    '--workers', '1',
    '--request-timeout', '30',
    '--no-color',
    '--output-truncate', 'false',
  ]
  const run = await runSchemathesis(args, { cwd: REPO_ROOT, env: credentials, timeoutMs: (MAX_TIME_S + 90) * 1000 })
  t.notOk(run.timedOut, `schemathesis finished within its budget of ${MAX_TIME_S} s (and 90 s to spare)`)
  if (run.code !== 0) t.comment(schemathesisReport(run.output))
  t.equal(run.code, 0, 'schemathesis reports no failure (its report is above)')
  t.match(schemathesisReport(run.output), /Stateful[\s\S]*Test cases:\s+[1-9]\d* generated/, 'it generated test cases, the stateful phase ran')
})
