import { Readable } from 'node:stream'
import type { BlobStore } from '../blobs/blob-store.js'
import { type InputsBlob, type QueuedSpec, TaskSpec } from '../domain/task.js'

/**
 * Task inputs out of events (issue #25): inputs whose JSON is larger than `inlineMaxBytes` (default 64 KiB)
 * are written to the content-addressed blob store before their TaskQueued is appended, and the event carries
 * `inputs_blob: { sha256, bytes, count }` in their place. The log stays small (EventStoreDB refuses an
 * append above 1 MiB; a batch chunk of 1,024 inputs of 784 values is several MiB of JSON), replays do not
 * parse tensors, and identical inputs are one file.
 */
export const TASK_INPUTS_DEFAULTS = { inlineMaxBytes: 64 * 1024 }

/** Longest JSON text of a float64 (`-1.2345678901234567e-308`) and its comma: a bound that spares stringifying small inputs. */
const MAX_CHARS_PER_VALUE = 25

type Inputs = TaskSpec['inputs']

/**
 * The blob reference for inputs too large to stay in their event (written, or written again, to the store:
 * a blob kept again is new to the collector, so one that was about to be collected survives), or undefined
 * when they stay inline.
 */
export async function storeInputs(blobs: BlobStore | undefined, inputs: Inputs, inlineMaxBytes: number): Promise<InputsBlob | undefined> {
  if (!blobs || upperBound(inputs) <= inlineMaxBytes) return undefined
  const json = Buffer.from(JSON.stringify(inputs))
  if (json.length <= inlineMaxBytes) return undefined
  const pending = await blobs.write(Readable.from([json]))
  await pending.keep()
  return { sha256: pending.sha256, bytes: pending.size, count: inputs.length }
}

/** A bound on the inputs' JSON length, from their sizes alone. */
function upperBound(inputs: Inputs): number {
  let bytes = 2
  for (const input of inputs) bytes += 32 + (input.data.length + input.shape.length) * MAX_CHARS_PER_VALUE
  return bytes
}

/** Why a task's inputs cannot be read back from its blob. */
export class InputsUnavailableError extends Error {}

/** The task with its inputs: as recorded, or read back from their blob (checked against the reference). */
export async function withInputs(blobs: BlobStore | undefined, spec: QueuedSpec): Promise<TaskSpec> {
  const { inputs_blob: ref, inputs, ...rest } = spec
  if (!ref) {
    if (!inputs) throw new InputsUnavailableError('it has neither inputs nor an inputs blob')
    return { ...rest, inputs }
  }
  if (!blobs) throw new InputsUnavailableError(`its inputs are in blob ${ref.sha256} and this scheduler has no blob store`)
  const bytes = await blobs.read(ref.sha256).catch((error: NodeJS.ErrnoException) => {
    throw new InputsUnavailableError(error.code === 'ENOENT' ? `its inputs blob ${ref.sha256} is missing from the blob store` : `its inputs blob ${ref.sha256} cannot be read: ${error.message}`)
  })
  let json: unknown
  try {
    json = JSON.parse(bytes.toString('utf8'))
  } catch {
    throw new InputsUnavailableError(`its inputs blob ${ref.sha256} is not JSON`)
  }
  const parsed = TaskSpec.shape.inputs.safeParse(json)
  if (bytes.length !== ref.bytes || !parsed.success || parsed.data.length !== ref.count) {
    throw new InputsUnavailableError(`its inputs blob ${ref.sha256} does not hold the ${ref.count} inputs (${ref.bytes} bytes) its task recorded`)
  }
  return { ...rest, inputs: parsed.data }
}
