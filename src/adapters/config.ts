/** Which adapters the server uses, from the environment: in this process (default) or in AWS Lambda. */
import { z } from 'zod'
import { LambdaAdapters } from './lambda.js'
import { InProcessAdapters, type Adapters } from './runtime.js'

/** The environment variables read here, their defaults and meaning (the README's table comes from this). */
export const ADAPTER_ENV = [
  { name: 'ADAPTER_RUNTIME', default: 'local', description: 'Where pre- and post-processing run: `local` (in the server process) or `lambda` (AWS Lambda functions)' },
  { name: 'AWS_REGION', default: 'us-east-1', description: 'Region of the Lambda functions (lambda runtime)' },
  { name: 'LAMBDA_ENDPOINT', default: '', description: 'Another Lambda Invoke endpoint, e.g. `http://localhost:9001` (default: AWS for the region)' },
  { name: 'LAMBDA_PREPROCESS_FUNCTION', default: 'dcmp-preprocess', description: 'Name or ARN of the pre-processing function' },
  { name: 'LAMBDA_POSTPROCESS_FUNCTION', default: 'dcmp-postprocess', description: 'Name or ARN of the post-processing function' },
  { name: 'LAMBDA_TIMEOUT_MS', default: '30000', description: 'ms one invocation may take before it is abandoned (it is tried once more)' },
] as const

/** A function name, a name with a version or alias, or an ARN. */
const FunctionName = z.string().regex(/^[A-Za-z0-9_:.$-]{1,170}$/, 'must be a Lambda function name or ARN')

/** The Lambda variables are checked only when the Lambda runtime is chosen: AWS_REGION may serve others too. */
const Settings = z.discriminatedUnion('ADAPTER_RUNTIME', [
  z.object({ ADAPTER_RUNTIME: z.literal('local') }),
  z.object({
    ADAPTER_RUNTIME: z.literal('lambda'),
    AWS_REGION: z.string().regex(/^[a-z]{2}(-[a-z]+)+-\d{1,2}$/, 'must be an AWS region such as us-east-1'),
    LAMBDA_ENDPOINT: z.url({ protocol: /^https?$/, error: 'must be an http(s) URL such as http://localhost:9001' }).optional(),
    LAMBDA_PREPROCESS_FUNCTION: FunctionName,
    LAMBDA_POSTPROCESS_FUNCTION: FunctionName,
    LAMBDA_TIMEOUT_MS: z.coerce.number({ error: 'must be a whole number of ms from 100 to 900000' }).int().min(100).max(900_000),
  }),
], { error: 'must be local or lambda' })
export type AdapterSettings = z.infer<typeof Settings>

/** The settings, defaults applied (an empty variable counts as unset); a clear Error on a bad value. */
export function readAdapterSettings(env: NodeJS.ProcessEnv): AdapterSettings {
  const values = Object.fromEntries(ADAPTER_ENV.map((v) => [v.name, env[v.name] || v.default || undefined]))
  const parsed = Settings.safeParse(values)
  if (parsed.success) return parsed.data
  const problems = parsed.error.issues.map((i) => `${i.path.join('.')}=${JSON.stringify(values[String(i.path[0])] ?? '')}: ${i.message}`)
  throw new Error(`invalid adapter settings: ${problems.join('; ')}`)
}

export function adaptersFromEnv(env: NodeJS.ProcessEnv): Adapters {
  const settings = readAdapterSettings(env)
  if (settings.ADAPTER_RUNTIME === 'local') return new InProcessAdapters()
  return new LambdaAdapters({
    region: settings.AWS_REGION,
    ...(settings.LAMBDA_ENDPOINT ? { endpoint: settings.LAMBDA_ENDPOINT } : {}),
    preprocessFunction: settings.LAMBDA_PREPROCESS_FUNCTION,
    postprocessFunction: settings.LAMBDA_POSTPROCESS_FUNCTION,
    requestTimeoutMs: settings.LAMBDA_TIMEOUT_MS,
  })
}
