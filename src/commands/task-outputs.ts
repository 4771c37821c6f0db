import type { z } from 'zod'
import type { BlobStore } from '../blobs/blob-store.js'
import { type OutputsBlob, TaskSpec } from '../domain/task.js'
import { storeInputs } from './task-inputs.js'

/**
 * Task outputs out of events (issue #25), as inputs are (src/commands/task-inputs.ts): outputs whose JSON is
 * larger than the inline limit (PAYLOAD_INLINE_MAX_BYTES, default 64 KiB) are written to the blob store
 * before their TaskCompleted is appended, and the event carries `outputs_blob: { sha256, bytes, count }`
 * in their place. A result held for validation (TaskResultHeld) and a validated TaskCompleted keep theirs
 * inline: the decider compares the held outputs with each later run's.
 */
type Outputs = z.infer<typeof TaskSpec.shape.inputs>

/** The blob reference for outputs too large to stay in their event (written to the store), or undefined when they stay inline. */
export async function storeOutputs(blobs: BlobStore | undefined, outputs: Outputs, inlineMaxBytes: number): Promise<OutputsBlob | undefined> {
  // the same JSON form as inputs: an array of { data, shape }
  const blob = await storeInputs(blobs, outputs, inlineMaxBytes)
  return blob && { ...blob, values: outputs.reduce((n, output) => n + output.data.length, 0) }
}

/** Why a task's outputs cannot be read back from their blob. */
export class OutputsUnavailableError extends Error {}

/** The outputs a TaskCompleted named, read back from their blob (checked against the reference). */
export async function readOutputs(blobs: BlobStore | undefined, ref: Pick<OutputsBlob, 'sha256' | 'bytes' | 'count' | 'values'>): Promise<Outputs> {
  if (!blobs) throw new OutputsUnavailableError(`the stored outputs (blob ${ref.sha256}) cannot be read: no blob store`)
  const bytes = await blobs.read(ref.sha256).catch((error: NodeJS.ErrnoException) => {
    throw new OutputsUnavailableError(error.code === 'ENOENT' ? `the stored outputs (blob ${ref.sha256}) are missing from the blob store` : `the stored outputs (blob ${ref.sha256}) cannot be read: ${error.message}`)
  })
  let json: unknown
  try {
    json = JSON.parse(bytes.toString('utf8'))
  } catch {
    throw new OutputsUnavailableError(`the stored outputs (blob ${ref.sha256}) are not JSON`)
  }
  const parsed = TaskSpec.shape.inputs.safeParse(json)
  if (bytes.length !== ref.bytes || !parsed.success || parsed.data.length !== ref.count || parsed.data.reduce((n, o) => n + o.data.length, 0) !== ref.values) {
    throw new OutputsUnavailableError(`the stored outputs (blob ${ref.sha256}) do not hold the ${ref.count} outputs (${ref.bytes} bytes) their task recorded`)
  }
  return parsed.data
}
