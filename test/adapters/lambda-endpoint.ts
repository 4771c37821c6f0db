/**
 * A local server that speaks Lambda's Invoke API (`POST /2015-03-31/functions/:name/invocations`), as AWS
 * answers it: the function's JSON with 200; a thrown error as 200 with `X-Amz-Function-Error: Unhandled` and
 * `{"errorMessage","errorType","stackTrace"}`; an unknown function as 404 ResourceNotFoundException; the 6 MB
 * request and response limits. The functions are real handlers, called as the Lambda runtime would.
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'

export type LambdaFunction = (event: unknown) => Promise<unknown>

export interface Invocation {
  name: string
  event: unknown
  invocationType: string | undefined
  authorization: string | undefined
  requestBytes: number
  responseBytes: number
}

/** Lambda's synchronous limits: 6 MB in, 6 MB (+100 bytes) out. */
const MAX_REQUEST = 6 * 1024 * 1024
const MAX_RESPONSE = 6 * 1024 * 1024 + 100

export interface LambdaEndpoint {
  url: string
  /** Every HTTP request that reached the server, whatever its path. */
  requests: number
  invocations: Invocation[]
  close(): Promise<void>
}

export async function startLambdaEndpoint(functions: Record<string, LambdaFunction>): Promise<LambdaEndpoint> {
  const endpoint = { url: '', requests: 0, invocations: [] as Invocation[], close: async () => {} }
  const server = createServer((request, response) => {
    endpoint.requests++
    void serve(functions, endpoint.invocations, request, response)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  endpoint.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  endpoint.close = () => {
    server.closeAllConnections()
    return new Promise<void>((resolve) => server.close(() => resolve()))
  }
  return endpoint
}

async function serve(functions: Record<string, LambdaFunction>, invocations: Invocation[], request: IncomingMessage, response: ServerResponse): Promise<void> {
  const body = await read(request)
  const match = /^\/2015-03-31\/functions\/([^/]+)\/invocations$/.exec(request.url?.split('?')[0] ?? '')
  if (request.method !== 'POST' || !match) return awsError(response, 404, 'UnknownOperationException', 'Unknown operation')
  const name = decodeURIComponent(match[1] as string)
  const fn = functions[name]
  if (!fn) return awsError(response, 404, 'ResourceNotFoundException', `Function not found: arn:aws:lambda:us-east-1:000000000000:function:${name}`)
  if (body.length > MAX_REQUEST) return awsError(response, 413, 'RequestTooLargeException', `Request must be smaller than ${MAX_REQUEST} bytes for the InvokeFunction operation`)
  const invocation: Invocation = {
    name,
    event: JSON.parse(body.toString('utf8')),
    invocationType: header(request, 'x-amz-invocation-type'),
    authorization: header(request, 'authorization'),
    requestBytes: body.length,
    responseBytes: 0,
  }
  invocations.push(invocation)
  let payload: string
  let functionError: string | undefined
  try {
    payload = JSON.stringify(await fn(invocation.event)) ?? 'null'
  } catch (error) {
    const e = error as Error
    functionError = 'Unhandled'
    payload = JSON.stringify({ errorMessage: e.message, errorType: e.name, stackTrace: (e.stack ?? '').split('\n').slice(1).map((l) => l.trim()) })
  }
  if (Buffer.byteLength(payload) > MAX_RESPONSE) {
    functionError = 'Unhandled'
    payload = JSON.stringify({ errorMessage: `Response payload size exceeded maximum allowed payload size (${MAX_RESPONSE} bytes).`, errorType: 'Function.ResponseSizeTooLarge' })
  }
  invocation.responseBytes = Buffer.byteLength(payload)
  response.writeHead(200, {
    'content-type': 'application/json',
    'x-amz-executed-version': '$LATEST',
    'x-amzn-requestid': `req-${invocations.length}`,
    ...(functionError ? { 'x-amz-function-error': functionError } : {}),
  })
  response.end(payload)
}

function awsError(response: ServerResponse, status: number, type: string, message: string): void {
  response.writeHead(status, { 'content-type': 'application/json', 'x-amzn-errortype': type, 'x-amzn-requestid': 'req-error' })
  response.end(JSON.stringify({ Type: 'User', message }))
}

const header = (request: IncomingMessage, name: string) => {
  const value = request.headers[name]
  return Array.isArray(value) ? value[0] : value
}

async function read(request: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = []
  for await (const chunk of request) chunks.push(chunk as Buffer)
  return Buffer.concat(chunks)
}
