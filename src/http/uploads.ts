import type { FastifyInstance } from 'fastify'
import { DomainError } from '../domain/errors.js'

declare module 'fastify' {
  interface FastifyContextConfig {
    /** A file upload (models, datasets): it takes one of the upload slots while it runs. */
    upload?: boolean
  }
  interface FastifyRequest {
    uploadSlot: (() => void) | undefined
  }
  interface FastifyInstance {
    /** Uploads in progress now. */
    uploadsInProgress(): number
  }
}

/**
 * Uploads in progress, bounded: a model or dataset file streams to the blob store and is then read to be
 * checked (a model of up to MAX_MODEL_BYTES is decoded whole), so many at once could exhaust the server's
 * memory. At most `total` run at once, `perCustomer` of them one customer's; past that, 429 RATE_LIMITED
 * with Retry-After (the upload is refused before its body is read).
 */
export function registerUploadSlots(app: FastifyInstance, limits: { total: number; perCustomer: number }): void {
  let running = 0
  const byCustomer = new Map<string, number>()
  app.decorateRequest('uploadSlot', undefined)
  app.decorate('uploadsInProgress', () => running)
  // after authentication (onRequest), before the body is read
  app.addHook('preValidation', async (request, reply) => {
    if (!request.routeOptions.config?.upload) return
    const customer = request.caller?.customerId ?? ''
    const own = byCustomer.get(customer) ?? 0
    if (running >= limits.total || own >= limits.perCustomer) {
      void reply.header('retry-after', '5')
      const why = own >= limits.perCustomer ? `you have ${own} uploads in progress and a customer may have ${limits.perCustomer}` : `${running} uploads are in progress, the most this server takes at once`
      throw new DomainError('RATE_LIMITED', `${why}; retry when one has finished`)
    }
    running++
    byCustomer.set(customer, own + 1)
    let held = true
    request.uploadSlot = () => {
      if (!held) return
      held = false
      running--
      const left = (byCustomer.get(customer) ?? 1) - 1
      if (left === 0) byCustomer.delete(customer)
      else byCustomer.set(customer, left)
    }
  })
  app.addHook('onResponse', async (request) => request.uploadSlot?.())
  app.addHook('onRequestAbort', async (request) => request.uploadSlot?.())
}
