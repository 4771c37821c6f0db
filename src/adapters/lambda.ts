/**
 * The adapters run in AWS Lambda: dcmp-preprocess and dcmp-postprocess, both lambda-handler.ts. Synchronous
 * invocations (RequestResponse), split so that each request and each response stays under Lambda's 6 MB
 * limit. passthrough stays in this process: it only checks a tensor, not worth a round trip.
 *
 * Errors: the function's structured `{"error"}` answer -> the same DomainError as in-process (a 400);
 * a function error (it threw, timed out, ran out of memory) -> ADAPTER_FAILED; the function could not be
 * reached (connection refused, not found, throttled) -> ADAPTER_UNAVAILABLE.
 */
import { InvokeCommand, LambdaClient, type LambdaClientConfig } from '@aws-sdk/client-lambda'
import { z } from 'zod'
import { DomainError } from '../domain/errors.js'
import type { Tensor } from '../protocol/frames.js'
import { planPostprocess, postprocessAll } from './postprocess.js'
import { planPreprocess, preprocessAll } from './preprocess.js'
import type { AdapterModel, Adapters } from './runtime.js'
import { decodeTensor, encodeTensor, PostprocessReply, PreprocessReply, wireModel, wireTensorBytes } from './wire.js'

export interface LambdaAdaptersOptions {
  region: string
  /** Another Invoke endpoint than AWS's, e.g. http://localhost:9001 (default: AWS's for the region). */
  endpoint?: string
  preprocessFunction: string
  postprocessFunction: string
  /** Default: the AWS SDK's chain (AWS_ACCESS_KEY_ID..., ~/.aws, the instance role). */
  credentials?: LambdaClientConfig['credentials']
  /** Most bytes one request or response carries (default 5_000_000, under Lambda's 6 MB). */
  maxPayloadBytes?: number
  /** ms an invocation may take before it is abandoned and tried once more (default 30_000). */
  requestTimeoutMs?: number
  /** Invocations in flight at once for one call (default 4). */
  concurrency?: number
}

const DEFAULT_MAX_PAYLOAD_BYTES = 5_000_000
const DEFAULT_TIMEOUT_MS = 30_000
const DEFAULT_CONCURRENCY = 4
/** A generous guess of a result's JSON bytes per output value (regression returns them all). */
const RESULT_BYTES_PER_VALUE = 25
const RESULT_BYTES = 200
/** The answer's JSON around its tensors or results: `{"tensors":[]}`. */
const REPLY_BYTES = 64

/** JSON bytes of one item in a request and in its response. */
interface Cost {
  request: number
  response: number
}

const FunctionErrorPayload = z.object({ errorType: z.string().optional(), errorMessage: z.string().optional() })

export class LambdaAdapters implements Adapters {
  private readonly client: LambdaClient
  private readonly maxBytes: number
  private readonly concurrency: number

  constructor(private readonly options: LambdaAdaptersOptions) {
    this.client = new LambdaClient({
      region: options.region,
      ...(options.endpoint ? { endpoint: options.endpoint } : {}),
      ...(options.credentials ? { credentials: options.credentials } : {}),
      // One retry: a request waits on this, and the SDK's default of 3 attempts with backoff is too long.
      maxAttempts: 2,
      // Without throwOnRequestTimeout the SDK only logs a request that runs past requestTimeout.
      requestHandler: { requestTimeout: options.requestTimeoutMs ?? DEFAULT_TIMEOUT_MS, throwOnRequestTimeout: true, connectionTimeout: 5_000 },
    })
    this.maxBytes = options.maxPayloadBytes ?? DEFAULT_MAX_PAYLOAD_BYTES
    this.concurrency = options.concurrency ?? DEFAULT_CONCURRENCY
  }

  async preprocess(model: AdapterModel, inputs: unknown[], field: (i: number) => string): Promise<Tensor[]> {
    const adapter = model.preprocessing ?? 'passthrough'
    if (adapter === 'passthrough') return preprocessAll(model, inputs, field)
    // The model's configuration is refused here, as in-process, before anything is sent.
    const shape = planPreprocess(model).shape ?? []
    const values = shape.reduce((a, b) => a * b, 1)
    const fields = inputs.map((_, i) => field(i))
    const envelope = { adapter, model: wireModel(model), inputs: [], fields: [] }
    const costs = inputs.map((input, i) => ({ request: jsonBytes(input) + jsonBytes(fields[i]) + 2, response: wireTensorBytes(values, shape) + 1 }))
    if (wireTensorBytes(values, shape) + REPLY_BYTES > this.maxBytes) {
      throw new DomainError('PAYLOAD_TOO_LARGE', `model input_shape ${JSON.stringify(shape)}: a tensor of ${values} values is more than one Lambda response carries (${this.maxBytes} bytes); use ADAPTER_RUNTIME=local for this model`)
    }
    const runs = this.split(costs, { request: jsonBytes(envelope), response: REPLY_BYTES }, field)
    return this.invokeRuns(runs, async ([start, end]) => {
      const reply = await this.invoke(this.options.preprocessFunction, { ...envelope, inputs: inputs.slice(start, end), fields: fields.slice(start, end) })
      const parsed = this.read(this.options.preprocessFunction, PreprocessReply, reply)
      if ('error' in parsed) throw new DomainError(parsed.error.code, parsed.error.message)
      if (parsed.tensors.length !== end - start) throw this.failed(this.options.preprocessFunction, `answered ${parsed.tensors.length} tensors for ${end - start} inputs`)
      return parsed.tensors.map(decodeTensor)
    })
  }

  async postprocess(model: AdapterModel, outputs: Tensor[]): Promise<unknown[]> {
    const adapter = model.postprocessing ?? 'passthrough'
    if (adapter === 'passthrough') return postprocessAll(model, outputs)
    planPostprocess(model)
    const wired = outputs.map(encodeTensor)
    const envelope = { adapter, model: wireModel(model), outputs: [] }
    const costs = outputs.map((o) => ({ request: wireTensorBytes(o.data.length, o.shape) + 1, response: o.data.length * RESULT_BYTES_PER_VALUE + RESULT_BYTES }))
    const runs = this.split(costs, { request: jsonBytes(envelope), response: REPLY_BYTES }, (i) => `outputs.${i}`)
    return this.invokeRuns(runs, async ([start, end]) => {
      const reply = await this.invoke(this.options.postprocessFunction, { ...envelope, outputs: wired.slice(start, end) })
      const parsed = this.read(this.options.postprocessFunction, PostprocessReply, reply)
      if ('error' in parsed) throw new DomainError(parsed.error.code, parsed.error.message)
      if (parsed.results.length !== end - start) throw this.failed(this.options.postprocessFunction, `answered ${parsed.results.length} results for ${end - start} outputs`)
      return parsed.results
    })
  }

  async close(): Promise<void> {
    this.client.destroy()
  }

  /** Consecutive runs [start, end) whose request and response each fit in maxBytes, envelope included. */
  private split(costs: Cost[], envelope: Cost, field: (i: number) => string): Array<[number, number]> {
    const runs: Array<[number, number]> = []
    let start = 0
    let request = envelope.request
    let response = envelope.response
    costs.forEach((cost, i) => {
      if (envelope.request + cost.request > this.maxBytes) {
        throw new DomainError('PAYLOAD_TOO_LARGE', `${field(i)}: ${cost.request} bytes is more than one Lambda invocation carries (${this.maxBytes} bytes)`)
      }
      if (i > start && (request + cost.request > this.maxBytes || response + cost.response > this.maxBytes)) {
        runs.push([start, i])
        start = i
        request = envelope.request
        response = envelope.response
      }
      request += cost.request
      response += cost.response
    })
    if (costs.length > start) runs.push([start, costs.length])
    return runs
  }

  /**
   * Each run's items, in order, `concurrency` invocations at a time. After a failure no new run starts, and
   * the earliest run's error is thrown: the first bad input, as in-process.
   */
  private async invokeRuns<R>(runs: Array<[number, number]>, invokeRun: (run: [number, number]) => Promise<R[]>): Promise<R[]> {
    const results: R[][] = []
    const errors: unknown[] = []
    let next = 0
    const worker = async () => {
      while (next < runs.length && errors.length === 0) {
        const i = next++
        try {
          results[i] = await invokeRun(runs[i] as [number, number])
        } catch (error) {
          errors[i] = error
        }
      }
    }
    await Promise.all(Array.from({ length: Math.min(this.concurrency, runs.length) }, worker))
    const first = errors.find((e) => e !== undefined)
    if (first !== undefined) throw first
    return results.flat()
  }

  /** One synchronous invocation: the function's JSON answer, or the error that says why there is none. */
  private async invoke(fn: string, payload: unknown): Promise<unknown> {
    let response
    try {
      response = await this.client.send(new InvokeCommand({ FunctionName: fn, InvocationType: 'RequestResponse', Payload: Buffer.from(JSON.stringify(payload)) }))
    } catch (error) {
      throw new DomainError('ADAPTER_UNAVAILABLE', `${fn} could not be invoked: ${describe(error)}`)
    }
    const text = response.Payload ? Buffer.from(response.Payload).toString('utf8') : ''
    if (response.FunctionError) {
      const reported = FunctionErrorPayload.safeParse(parseJson(text))
      const what = reported.success && reported.data.errorMessage !== undefined
        ? `${reported.data.errorType ?? response.FunctionError}: ${reported.data.errorMessage}`
        : `${response.FunctionError}: ${text.slice(0, 500)}`
      throw this.failed(fn, what)
    }
    return parseJson(text)
  }

  /** The answer in the shape we expect; anything else is the function's failure. */
  private read<T>(fn: string, schema: z.ZodType<T>, reply: unknown): T {
    const parsed = schema.safeParse(reply)
    if (!parsed.success) throw this.failed(fn, `unexpected answer: ${JSON.stringify(reply)?.slice(0, 200)}`)
    return parsed.data
  }

  private failed(fn: string, what: string): DomainError {
    return new DomainError('ADAPTER_FAILED', `${fn} failed: ${what}`)
  }
}

const jsonBytes = (value: unknown) => Buffer.byteLength(JSON.stringify(value) ?? 'null')

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text)
  } catch {
    return undefined
  }
}

function describe(error: unknown): string {
  if (!(error instanceof Error)) return String(error)
  const status = (error as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode
  return `${error.name}: ${error.message}${status ? ` (HTTP ${status})` : ''}`
}
