import { errorCodes, type FastifyInstance } from 'fastify'
import sjson from 'secure-json-parse'
import { DomainError } from '../domain/errors.js'

const PROTO_MESSAGE =
  'body: a "__proto__" key, or a "constructor" object with a "prototype" key, is refused (it could change the prototype of objects the server builds); rename the key'

/**
 * JSON bodies as fastify's own parser reads them (secure-json-parse, prototype poisoning refused), except that
 * its one message for every refusal ("Body is not valid JSON") becomes one that says what is refused when
 * the JSON is valid but holds a `__proto__` or `constructor.prototype` key. Nesting depth is checked after
 * parsing, with NUL (errors.ts), so that it names the field.
 */
export function registerJsonParser(app: FastifyInstance): void {
  app.removeContentTypeParser('application/json')
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (_request, body, done) => {
    const text = body as string
    if (text.length === 0) return done(new errorCodes.FST_ERR_CTP_EMPTY_JSON_BODY(), undefined)
    let parsed: unknown
    try {
      parsed = JSON.parse(text)
    } catch {
      return done(new errorCodes.FST_ERR_CTP_INVALID_JSON_BODY(), undefined)
    }
    // the scan only when the text could hold such a key (secure-json-parse's own shortcut)
    if (typeof parsed === 'object' && parsed !== null && (text.includes('__proto__') || text.includes('constructor')) && sjson.scan(parsed, { protoAction: 'error', constructorAction: 'error', safe: true }) === null) {
      return done(new DomainError('VALIDATION_ERROR', PROTO_MESSAGE), undefined)
    }
    done(null, parsed)
  })
}
