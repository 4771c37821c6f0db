import t from 'tap'
import { ADMIN_KEY, testApp } from '../helpers/app.js'

// Found by schemathesis: a label of 200 characters after a leading no-break space was accepted although the
// document says maxLength 200 (the length was checked after trimming); white space alone, which the
// document's minLength 1 allowed, was refused.
t.test('free-text fields take what the document allows and refuse what it forbids', async (t) => {
  const { app, customer } = await testApp(t)
  const alice = await customer()
  const token = (label: string) => app.inject({ method: 'POST', url: '/api/v1/admin/enrollment-tokens', headers: { 'x-admin-key': ADMIN_KEY }, payload: { label } })
  const project = (name: string) => app.inject({ method: 'POST', url: '/api/v1/projects', headers: { 'x-api-key': alice.key }, payload: { name, type: 'realtime' } })

  const doc = (await app.inject({ method: 'GET', url: '/api/v1/openapi.json' })).json()
  const label = doc.paths['/api/v1/admin/enrollment-tokens'].post.requestBody.content['application/json'].schema.properties.label
  t.match(label, { type: 'string', maxLength: 200, pattern: String }, 'the document states the bound and the pattern')

  const padded = await token(`\u00a0${'x'.repeat(200)}`)
  t.equal(padded.statusCode, 400, '201 characters as sent are over maxLength 200, whatever trimming leaves')
  t.match(padded.json().error, { code: 'VALIDATION_ERROR', message: /body\.label/ })

  const emoji = await token('😀'.repeat(200))
  t.equal(emoji.statusCode, 201, '200 emoji are 200 characters (code points, as JSON Schema counts them)')
  t.equal(emoji.json().label, '😀'.repeat(200))

  const trimmed = await project('  my project \n')
  t.equal(trimmed.statusCode, 201)
  t.equal(trimmed.json().name, 'my project', 'still trimmed')

  for (const blank of ['   ', '\u3000\t', '\ufeff']) {
    const refused = await project(blank)
    t.equal(refused.statusCode, 400, `${JSON.stringify(blank)} is refused`)
    t.match(refused.json().error.message, /name: must hold a character that is not white space/)
    t.notOk(new RegExp(label.pattern).test(blank), 'and the document\'s pattern refuses it too')
  }
  t.ok(new RegExp(label.pattern).test(' a '), 'the pattern takes text with spaces around it')
})
