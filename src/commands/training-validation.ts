import type { BlobStore } from '../blobs/blob-store.js'
import { type Dataset, parseDataset, shardRows, splitDataset } from '../datasets/parse.js'
import type { DatasetRow } from '../projections/datasets.js'
import { DomainError } from '../domain/errors.js'
import type { TrainingSpec } from '../domain/training-job.js'
import { checkTrainable, defaultLoss, evaluate, exportOnnx, type Labels, loadTrainable, type LossKind, syntheticTask, type TrainableModel, type Weights } from '../sdk/trainer/index.js'

export type { Weights }
export type Loss = TrainingSpec['training_config']['loss']

/** Samples the server keeps aside to check each round's weights. */
const STREAM_VALIDATION_SAMPLES = 1000

/**
 * Checks at submission that the trainer can train the model on the data, and picks the loss: a 400 that
 * names an unsupported operator, or a dataset whose rows do not fit the model's input or output.
 */
export function trainingPlan(modelBytes: Uint8Array, loss: Loss | undefined, dataset: DatasetRow | undefined): { loss: Loss } {
  const check = checkTrainable(modelBytes)
  if (!check.ok) throw new DomainError('VALIDATION_ERROR', `model_id: ${check.message}`)
  const model = loadTrainable(modelBytes)
  const chosen: Loss = loss ?? defaultLoss(model)
  if (chosen === 'cross_entropy' && model.outputSize < 2) throw new DomainError('VALIDATION_ERROR', `training_config.loss: cross_entropy needs a model with 2 outputs or more; this one has ${model.outputSize}`)
  if (dataset) {
    if (dataset.features !== model.inputSize) throw new DomainError('VALIDATION_ERROR', `data_config.dataset_id: the dataset has ${dataset.features} features per row; the model takes ${model.inputSize}`)
    if (chosen === 'cross_entropy' && dataset.label_kind !== 'class') throw new DomainError('VALIDATION_ERROR', 'data_config.dataset_id: cross_entropy needs class labels (whole numbers from 0); the dataset has values')
    if (chosen === 'cross_entropy' && dataset.classes > model.outputSize) throw new DomainError('VALIDATION_ERROR', `data_config.dataset_id: labels go up to ${dataset.classes - 1}; the model has ${model.outputSize} outputs`)
    if (chosen === 'mse' && model.outputSize !== 1) throw new DomainError('VALIDATION_ERROR', `data_config.dataset_id: a dataset has one target per row; the model has ${model.outputSize} outputs`)
  }
  return { loss: chosen }
}

/** What the coordinator needs of the trainer for one job: its validation set, its starting weights, the export. */
export interface Validation {
  initialWeights(): Weights
  /** Validation loss and accuracy of these weights. */
  evaluate(weights: Weights): { loss: number; accuracy: number }
  /** The model file with these weights. */
  export(weights: Weights): Uint8Array
  /** Rows of the training part a device of `count` takes as shard `index` (dataset jobs). */
  datasetShard?(index: number, count: number): { dataset_id: string; download_path: string; checksum: string; format: 'csv' | 'jsonl'; start: number; end: number }
}

export async function loadValidation(spec: TrainingSpec, blobs: BlobStore): Promise<Validation> {
  const model = loadTrainable(await blobs.read(spec.model_checksum.replace(/^sha256:/, '')))
  const loss: LossKind = spec.training_config.loss
  const initial = model.getWeights()
  const base = {
    initialWeights: () => initial,
    export: (weights: Weights) => exportOnnx(model.source, weights),
  }
  if (spec.data_config.type === 'stream') {
    const task = syntheticTask({ inputs: model.inputSize, outputs: model.outputSize, seed: spec.seed, kind: loss === 'mse' ? 'regression' : 'classification', clustersPerClass: spec.data_config.clusters_per_class })
    const set = task.validationSet(STREAM_VALIDATION_SAMPLES)
    return { ...base, evaluate: (weights) => check(model, weights, set.x, set.labels, loss) }
  }
  const { dataset_id: id, dataset_checksum: checksum, dataset_format: format } = spec.data_config
  if (!id || !checksum || !format) throw new Error(`training job ${spec.job_id}: a dataset job without its dataset`)
  const parsed = parseDataset(await blobs.read(checksum.replace(/^sha256:/, '')), format)
  const { train, validation } = splitDataset(parsed, { validationFraction: spec.data_config.validation_fraction, seed: spec.seed })
  const labels = asLabels(validation, loss)
  return {
    ...base,
    evaluate: (weights) => check(model, weights, validation.features, labels, loss),
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

function check(model: TrainableModel, weights: Weights, x: Float32Array, labels: Labels, loss: LossKind) {
  model.setWeights(weights)
  const result = evaluate(model, x, labels, { loss })
  return { loss: result.loss, accuracy: result.accuracy }
}
