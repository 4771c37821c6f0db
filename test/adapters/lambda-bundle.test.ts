import { execFileSync } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import t from 'tap'
import { LambdaAdapters } from '../../src/adapters/lambda.js'
import { InProcessAdapters } from '../../src/adapters/runtime.js'
import { field, model, pngBase64, redGreen } from './fixtures.js'
import { startLambdaEndpoint, type LambdaFunction } from './lambda-endpoint.js'

const root = fileURLToPath(new URL('../..', import.meta.url))

t.test('the bundle docs/adapters.md deploys (esbuild, CommonJS, index.handler) answers as the source does', async (t) => {
  // 1. build it as the docs say
  const dir = mkdtempSync(path.join(tmpdir(), 'dcp-lambda-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const esbuild = path.join(root, 'node_modules/.bin/esbuild')
  execFileSync(esbuild, ['src/adapters/lambda-handler.ts', '--bundle', '--platform=node', '--target=node20', '--format=cjs', '--minify', `--outfile=${path.join(dir, 'index.js')}`], { cwd: root, stdio: 'pipe' })
  // 2. load it from outside the repository, as the Lambda runtime would, and serve it as both functions
  const { handler } = createRequire(path.join(dir, 'index.js'))('./index.js') as { handler: LambdaFunction }
  const endpoint = await startLambdaEndpoint({ 'dcmp-preprocess': handler, 'dcmp-postprocess': handler })
  t.teardown(endpoint.close)
  const lambda = new LambdaAdapters({ region: 'us-east-1', endpoint: endpoint.url, preprocessFunction: 'dcmp-preprocess', postprocessFunction: 'dcmp-postprocess', credentials: { accessKeyId: 'test', secretAccessKey: 'test' } })
  t.teardown(() => lambda.close())
  // 3. same answers as in-process, a client mistake included
  const local = new InProcessAdapters()
  const m = model({ preprocessing: 'image_classification', postprocessing: 'top_k_labels', input_shape: [1, 3, 4, 4], labels: ['a', 'b', 'c'] })
  const inputs = [{ image: pngBase64(4, 4, redGreen) }]
  t.same(await lambda.preprocess(m, inputs, field), await local.preprocess(m, inputs, field))
  const outputs = [{ data: [0.5, 2, -1], shape: [1, 3] }]
  t.same(await lambda.postprocess(m, outputs), await local.postprocess(m, outputs))
  await t.rejects(lambda.preprocess(m, [{ image: 'bm90IGFuIGltYWdl' }], field), { code: 'VALIDATION_ERROR', message: 'inputs.0.image: not a PNG or JPEG image' })
  t.equal(endpoint.invocations.length, 3)
})
