import type { BlobStore } from '../blobs/blob-store.js'
import { type Dataset, parseDataset, shardRows, splitDataset } from '../datasets/parse.js'
import type { DatasetRow } from '../projections/datasets.js'
import { DomainError } from '../domain/errors.js'
import { decodeWeights, encodeWeights } from '../domain/fedavg.js'
import type { MODEL_FORMATS } from '../domain/model.js'
import { modelFormatOf, type TrainingSpec } from '../domain/training-job.js'
import { checkTrainable, defaultLoss, evaluate, exportOnnx, type Labels, loadTrainable, type LossKind, syntheticTask, type Weights } from '../sdk/trainer/index.js'
import { type TorchTool, TorchToolError } from './torch-tool.js'

export type { Weights }
export type Loss = TrainingSpec['training_config']['loss']
export type ModelFormat = (typeof MODEL_FORMATS)[number]

/** Samples the server keeps aside to check each round's weights. */
const STREAM_VALIDATION_SAMPLES = 1000

/** The model a job trains: its format, its file, and the input shape its upload declared (TorchScript declares none of its own). */
export interface TrainedModel {
  format: ModelFormat
  checksum: string
  bytes: Uint8Array
  input_shape: number[] | null
}

/**
 * What the server does with a model's weights, one implementation per format: the TypeScript trainer for
 * ONNX, the Python tool (src/commands/torch-tool.ts) for TorchScript. Sizes are floats per sample.
 */
export interface Engine {
  inputSize: number
  outputSize: number
  endsInSoftmax: boolean
  initialWeights(): Promise<Weights>
  evaluate(weights: Weights, x: Float32Array, labels: Labels, loss: LossKind): Promise<{ loss: number; accuracy: number }>
  export(weights: Weights): Promise<Uint8Array>
}

function onnxEngine(bytes: Uint8Array): Engine {
  const check = checkTrainable(bytes)
  if (!check.ok) throw new DomainError('VALIDATION_ERROR', `model_id: ${check.message}`)
  const model = loadTrainable(bytes)
  return {
    inputSize: model.inputSize,
    outputSize: model.outputSize,
    endsInSoftmax: model.endsInSoftmax,
    initialWeights: async () => model.getWeights(),
    evaluate: async (weights, x, labels, loss) => {
      model.setWeights(weights)
      const result = evaluate(model, x, labels, { loss })
      return { loss: result.loss, accuracy: result.accuracy }
    },
    export: async (weights) => exportOnnx(model.source, weights),
  }
}

/** A TorchScript model through the tool; 400 when the server has no Python to run it, or the model does not run. */
async function torchEngine(model: TrainedModel, tool: TorchTool): Promise<Engine> {
  const ref = { key: model.checksum, bytes: model.bytes }
  const inputSize = featuresOf(model.input_shape)
  const inspected = await refuseUnrunnable(tool.call<{ input_size: number; output_size: number; ends_in_softmax: boolean }>('inspect', ref, inputSize ? { input_size: inputSize } : {}))
  const b64 = (values: Float32Array) => Buffer.from(values.buffer, values.byteOffset, values.byteLength).toString('base64')
  const weightsOf = (weights: Weights) => encodeWeights(weights).toString('base64')
  return {
    inputSize: inspected.input_size,
    outputSize: inspected.output_size,
    endsInSoftmax: inspected.ends_in_softmax,
    initialWeights: async () => decodeWeights(Buffer.from((await tool.call<{ weights: string }>('weights', ref)).weights, 'base64')),
    evaluate: (weights, x, labels, loss) =>
      tool.call('evaluate', ref, { weights: weightsOf(weights), x: b64(x), rows: x.length / inspected.input_size, labels: b64(Float32Array.from(labels)), loss, input_size: inspected.input_size }),
    export: async (weights) => Buffer.from((await tool.call<{ bytes: string }>('export', ref, { weights: weightsOf(weights) })).bytes, 'base64'),
  }
}

async function refuseUnrunnable<T>(call: Promise<T>): Promise<T> {
  try {
    return await call
  } catch (error) {
    if (!(error instanceof TorchToolError)) throw error
    if (error.unavailable) throw new DomainError('VALIDATION_ERROR', `model_id: a TorchScript model trains with torch, which this server runs in Python: ${error.message}`)
    throw new DomainError('VALIDATION_ERROR', `model_id: the TorchScript model cannot be trained: ${error.message}`)
  }
}

/** Floats per sample of a declared input shape (`[-1, 8]` or `[1, 8]`: 8); undefined when it says none. */
function featuresOf(shape: number[] | null): number | undefined {
  const dims = shape?.slice(1) ?? []
  return dims.length > 0 && dims.every((d) => d > 0) ? dims.reduce((a, b) => a * b, 1) : undefined
}

/** The engine of a model's format. */
export function engineOf(model: TrainedModel, tool: TorchTool): Promise<Engine> {
  return model.format === 'torchscript' ? torchEngine(model, tool) : Promise.resolve(onnxEngine(model.bytes))
}

/**
 * Checks at submission that the model can be trained on the data, and picks the loss: a 400 that names an
 * unsupported operator, a TorchScript model on a server without Python, or a dataset whose rows do not fit
 * the model's input or output.
 */
export async function trainingPlan(model: TrainedModel, loss: Loss | undefined, dataset: DatasetRow | undefined, tool: TorchTool): Promise<{ loss: Loss }> {
  const engine = await engineOf(model, tool)
  const chosen: Loss = loss ?? defaultLoss(engine)
  if (chosen === 'cross_entropy' && engine.outputSize < 2) throw new DomainError('VALIDATION_ERROR', `training_config.loss: cross_entropy needs a model with 2 outputs or more; this one has ${engine.outputSize}`)
  if (dataset) {
    if (dataset.features !== engine.inputSize) throw new DomainError('VALIDATION_ERROR', `data_config.dataset_id: the dataset has ${dataset.features} features per row; the model takes ${engine.inputSize}`)
    if (chosen === 'cross_entropy' && dataset.label_kind !== 'class') throw new DomainError('VALIDATION_ERROR', 'data_config.dataset_id: cross_entropy needs class labels (whole numbers from 0); the dataset has values')
    if (chosen === 'cross_entropy' && dataset.classes > engine.outputSize) throw new DomainError('VALIDATION_ERROR', `data_config.dataset_id: labels go up to ${dataset.classes - 1}; the model has ${engine.outputSize} outputs`)
    if (chosen === 'mse' && engine.outputSize !== 1) throw new DomainError('VALIDATION_ERROR', `data_config.dataset_id: a dataset has one target per row; the model has ${engine.outputSize} outputs`)
  }
  return { loss: chosen }
}

/** What the coordinator needs for one job, whatever the model's format: its starting weights, each round's check, the export. */
export interface Validation {
  initialWeights(): Weights
  /** Validation loss and accuracy of these weights. */
  evaluate(weights: Weights): Promise<{ loss: number; accuracy: number }>
  /** The model file with these weights. */
  export(weights: Weights): Promise<Uint8Array>
  /** Rows of the training part a device of `count` takes as shard `index` (dataset jobs). */
  datasetShard?(index: number, count: number): { dataset_id: string; download_path: string; checksum: string; format: 'csv' | 'jsonl'; start: number; end: number }
}

/**
 * The job's validation: the same samples whatever the format (the synthetic task of the model's sizes for
 * a stream, the dataset's held-out rows), checked by the format's engine.
 */
export async function loadValidation(spec: TrainingSpec, inputShape: number[] | null, blobs: BlobStore, tool: TorchTool): Promise<Validation> {
  const bytes = await blobs.read(spec.model_checksum.replace(/^sha256:/, ''))
  const engine = await engineOf({ format: modelFormatOf(spec), checksum: spec.model_checksum, bytes, input_shape: inputShape }, tool)
  const loss: LossKind = spec.training_config.loss
  const initial = await engine.initialWeights()
  const base = {
    initialWeights: () => initial,
    export: (weights: Weights) => engine.export(weights),
  }
  if (spec.data_config.type === 'stream') {
    const task = syntheticTask({ inputs: engine.inputSize, outputs: engine.outputSize, seed: spec.seed, kind: loss === 'mse' ? 'regression' : 'classification', clustersPerClass: spec.data_config.clusters_per_class })
    const set = task.validationSet(STREAM_VALIDATION_SAMPLES)
    return { ...base, evaluate: (weights) => engine.evaluate(weights, set.x, set.labels, loss) }
  }
  const { dataset_id: id, dataset_checksum: checksum, dataset_format: format } = spec.data_config
  if (!id || !checksum || !format) throw new Error(`training job ${spec.job_id}: a dataset job without its dataset`)
  const parsed = parseDataset(await blobs.read(checksum.replace(/^sha256:/, '')), format)
  const { train, validation } = splitDataset(parsed, { validationFraction: spec.data_config.validation_fraction, seed: spec.seed })
  const labels = asLabels(validation, loss)
  return {
    ...base,
    evaluate: (weights) => engine.evaluate(weights, validation.features, labels, loss),
    datasetShard: (index, count) => {
      const [start, end] = shardRows(train.rows, count, index)
      return { dataset_id: id, download_path: `/api/v1/sdk/datasets/${id}`, checksum, format, start, end }
    },
  }
}

/** Class labels as indices for cross-entropy; values as they are for MSE. */
function asLabels(dataset: Dataset, loss: LossKind): Labels {
  return loss === 'mse' ? dataset.labels : Int32Array.from(dataset.labels)
}
