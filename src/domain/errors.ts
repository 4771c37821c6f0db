/**
 * A business rule said no. `code` is one of the API's error codes (e.g. `CANNOT_PAUSE`, `NOT_FOUND`);
 * src/http/errors.ts maps codes to HTTP statuses once, for every route.
 */
export class DomainError extends Error {
  constructor(readonly code: string, message: string, readonly details?: Record<string, unknown>) {
    super(message)
    this.name = 'DomainError'
  }
}
