/**
 * The device-side trainer for federated training: dense ONNX graphs (Gemm, MatMul, Add, Relu, Sigmoid, Tanh,
 * Softmax, Flatten) trained in TypeScript, as onnxruntime-node has no training API.
 */
export { SUPPORTED_OPERATORS, TrainerError, UnsupportedOperatorError } from './errors.js'
export { exportOnnx } from './export.js'
export { checkTrainable, loadTrainable, type Parameter, type TrainableCheck, type TrainableModel, type Weights } from './graph.js'
export type { Labels, LossKind } from './loss.js'
export { createOptimizer, type Optimizable, type Optimizer, type OptimizerKind } from './optimizer.js'
export { mixSeeds, Random } from './random.js'
export { syntheticTask, syntheticTaskFor, type SyntheticSample, type SyntheticTask, type SyntheticTaskOptions } from './synthetic.js'
export { defaultLoss, evaluate, type EvaluateOptions, type Evaluation, trainStep } from './train.js'
