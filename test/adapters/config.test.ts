import t from 'tap'
import { ADAPTER_ENV, adaptersFromEnv, readAdapterSettings } from '../../src/adapters/config.js'
import { LambdaAdapters } from '../../src/adapters/lambda.js'
import { handler } from '../../src/adapters/lambda-handler.js'
import { InProcessAdapters } from '../../src/adapters/runtime.js'
import { field, model } from './fixtures.js'
import { startLambdaEndpoint } from './lambda-endpoint.js'

t.test('by default the adapters run in this process', async (t) => {
  t.type(adaptersFromEnv({}), InProcessAdapters)
  t.type(adaptersFromEnv({ ADAPTER_RUNTIME: 'local', AWS_REGION: 'not-checked-here' }), InProcessAdapters, 'Lambda settings are not read for local')
})

t.test('the Lambda settings: defaults, and every variable listed for the README', async (t) => {
  const settings = readAdapterSettings({ ADAPTER_RUNTIME: 'lambda', LAMBDA_ENDPOINT: 'http://localhost:9001', LAMBDA_PREPROCESS_FUNCTION: '' })
  t.same(settings, {
    ADAPTER_RUNTIME: 'lambda',
    AWS_REGION: 'us-east-1',
    LAMBDA_ENDPOINT: 'http://localhost:9001',
    LAMBDA_PREPROCESS_FUNCTION: 'dcmp-preprocess',
    LAMBDA_POSTPROCESS_FUNCTION: 'dcmp-postprocess',
    LAMBDA_TIMEOUT_MS: 30_000,
  }, 'an empty variable counts as unset')
  t.same(ADAPTER_ENV.map((v) => v.name).sort(), Object.keys(settings).sort(), 'the list names exactly the variables read')
  t.ok(ADAPTER_ENV.every((v) => v.description.length > 10))
})

t.test('a bad value is a clear error naming the variable', async (t) => {
  const cases: Array<[Record<string, string>, RegExp]> = [
    [{ ADAPTER_RUNTIME: 'aws' }, /^invalid adapter settings: ADAPTER_RUNTIME="aws": must be local or lambda$/],
    [{ ADAPTER_RUNTIME: 'lambda', LAMBDA_ENDPOINT: 'localhost:9001' }, /LAMBDA_ENDPOINT="localhost:9001": must be an http\(s\) URL/],
    [{ ADAPTER_RUNTIME: 'lambda', AWS_REGION: 'mars' }, /AWS_REGION="mars": must be an AWS region such as us-east-1/],
    [{ ADAPTER_RUNTIME: 'lambda', LAMBDA_POSTPROCESS_FUNCTION: 'two words' }, /LAMBDA_POSTPROCESS_FUNCTION="two words": must be a Lambda function name or ARN/],
    [{ ADAPTER_RUNTIME: 'lambda', LAMBDA_TIMEOUT_MS: 'soon' }, /LAMBDA_TIMEOUT_MS="soon": must be a whole number of ms/],
  ]
  for (const [env, message] of cases) t.throws(() => adaptersFromEnv(env), message, String(message))
  t.ok(readAdapterSettings({ ADAPTER_RUNTIME: 'lambda', LAMBDA_PREPROCESS_FUNCTION: 'arn:aws:lambda:eu-west-1:123456789012:function:pre:$LATEST' }), 'an ARN with a version is a function name')
})

t.test('ADAPTER_RUNTIME=lambda invokes the named functions at LAMBDA_ENDPOINT', async (t) => {
  const endpoint = await startLambdaEndpoint({ 'my-pre': handler, 'my-post': handler })
  t.teardown(endpoint.close)
  // The SDK's own credential chain reads these, as on a server.
  Object.assign(process.env, { AWS_ACCESS_KEY_ID: 'test', AWS_SECRET_ACCESS_KEY: 'test' })
  const adapters = adaptersFromEnv({ ADAPTER_RUNTIME: 'lambda', AWS_REGION: 'eu-west-1', LAMBDA_ENDPOINT: endpoint.url, LAMBDA_PREPROCESS_FUNCTION: 'my-pre', LAMBDA_POSTPROCESS_FUNCTION: 'my-post' })
  t.teardown(() => adapters.close?.())
  t.type(adapters, LambdaAdapters)
  const m = model({ preprocessing: 'tabular', postprocessing: 'regression', adapter_options: { features: ['x', 'y'] } })
  t.same(await adapters.preprocess(m, [{ x: 1, y: 2 }], field), [{ data: [1, 2], shape: [1, 2] }])
  t.same(await adapters.postprocess(m, [{ data: [4], shape: [1] }]), [{ value: 4 }])
  t.same(endpoint.invocations.map((i) => i.name), ['my-pre', 'my-post'])
  t.match(endpoint.invocations[0]?.authorization, /Credential=test\/\d{8}\/eu-west-1\/lambda\//)
})
