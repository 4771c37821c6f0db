/** The operators the trainer can run forward and backward (ONNX default domain, float32 only). */
export const SUPPORTED_OPERATORS = ['Gemm', 'MatMul', 'Add', 'Relu', 'Sigmoid', 'Tanh', 'Softmax', 'Flatten'] as const

export type SupportedOperator = (typeof SUPPORTED_OPERATORS)[number]

/** A model the trainer cannot train: its structure, a tensor type or shape, or an attribute value. */
export class TrainerError extends Error {
  override readonly name: string = 'TrainerError'
}

/** The graph holds an operator the trainer has no kernel for; `operator` names it (with its domain if not ONNX's). */
export class UnsupportedOperatorError extends TrainerError {
  override readonly name = 'UnsupportedOperatorError'

  constructor(readonly operator: string) {
    super(`operator ${operator} is not supported by the trainer (supported: ${SUPPORTED_OPERATORS.join(', ')})`)
  }
}
