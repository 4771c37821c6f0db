/** Which adapters the server uses, from the environment: in this process (default) or in AWS Lambda. */
import { z } from 'zod'
import { LambdaAdapters } from './lambda.js'
import { IMAGE_DEFAULTS, type ImagePoolOptions } from './image-pool.js'
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

/** The image decoding variables (the local runtime's: with Lambda the functions decode), for the README's table. */
export const IMAGE_ENV = [
  { name: 'IMAGE_DECODE_THREADS', default: String(IMAGE_DEFAULTS.threads), description: 'Worker threads that decode images at most (default: the cores less one, 1 to 4)' },
  { name: 'IMAGE_DECODE_TIMEOUT_MS', default: String(IMAGE_DEFAULTS.timeoutMs), description: 'ms one image may take to decode on its thread before the request gets a TIMEOUT' },
  { name: 'IMAGE_MAX_PIXELS', default: String(IMAGE_DEFAULTS.maxPixels), description: 'Pixels an image may have; a larger one is a 400 naming the field' },
  { name: 'IMAGE_DECODE_DUTY', default: String(IMAGE_DEFAULTS.duty), description: 'Share of the time a decoding thread may work, above 0 and at most 1: after an image it rests in proportion, so that image batches leave the cores to the event loop and the devices (1: no rests)' },
] as const

const whole = (min: number, max: number) => z.coerce.number({ error: `must be a whole number from ${min} to ${max}` }).int().min(min).max(max)
const ImageSettings = z.object({
  IMAGE_DECODE_THREADS: whole(1, 64),
  IMAGE_DECODE_TIMEOUT_MS: whole(10, 600_000),
  IMAGE_MAX_PIXELS: whole(1, 100_000_000),
  IMAGE_DECODE_DUTY: z.coerce.number({ error: 'must be a number above 0 and at most 1' }).gt(0, 'must be above 0').max(1, 'must be at most 1'),
})

/** The image decoding settings, defaults applied; a clear Error on a bad value. */
export function readImageSettings(env: NodeJS.ProcessEnv): Required<ImagePoolOptions> {
  const values = Object.fromEntries(IMAGE_ENV.map((v) => [v.name, env[v.name] || v.default]))
  const parsed = ImageSettings.safeParse(values)
  if (!parsed.success) throw new Error(`invalid image settings: ${parsed.error.issues.map((i) => `${i.path.join('.')}=${JSON.stringify(values[String(i.path[0])])}: ${i.message}`).join('; ')}`)
  return { threads: parsed.data.IMAGE_DECODE_THREADS, timeoutMs: parsed.data.IMAGE_DECODE_TIMEOUT_MS, maxPixels: parsed.data.IMAGE_MAX_PIXELS, duty: parsed.data.IMAGE_DECODE_DUTY }
}

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
  if (settings.ADAPTER_RUNTIME === 'local') return new InProcessAdapters({ image: readImageSettings(env) })
  return new LambdaAdapters({
    region: settings.AWS_REGION,
    ...(settings.LAMBDA_ENDPOINT ? { endpoint: settings.LAMBDA_ENDPOINT } : {}),
    preprocessFunction: settings.LAMBDA_PREPROCESS_FUNCTION,
    postprocessFunction: settings.LAMBDA_POSTPROCESS_FUNCTION,
    requestTimeoutMs: settings.LAMBDA_TIMEOUT_MS,
  })
}
