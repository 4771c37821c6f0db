import t from 'tap'
import { checkAdapterConfig, InProcessAdapters } from '../../src/adapters/runtime.js'
import { DomainError } from '../../src/domain/errors.js'
import { GREEN, jpegBase64, model, pngBase64, pngBytes, RED, redGreen, rounded } from './fixtures.js'

const adapters = new InProcessAdapters()
const raw = { mean: [0], std: [1] }
const image = (input_shape: number[], adapter_options: Record<string, unknown> | null = raw) => model({ preprocessing: 'image_classification', input_shape, adapter_options })
const one = async (m = image([1, 3, 2, 2]), input: unknown = { image: pngBase64(4, 4, redGreen) }) => {
  const [tensor] = await adapters.preprocess(m, [input], () => 'input')
  return tensor!
}
const refusal = (code: string, message: RegExp) => ({ constructor: DomainError, code, message })

t.test('a 4x4 PNG, half red half green, shrinks to the model\'s 2x2 as NCHW planes', async (t) => {
  const tensor = await one()
  t.same(tensor.shape, [1, 3, 2, 2])
  t.same(rounded(tensor.data), [1, 0, 1, 0, /* G */ 0, 1, 0, 1, /* B */ 0, 0, 0, 0])
})

t.test('NHWC when the last dimension holds the channels: pixel by pixel', async (t) => {
  const tensor = await one(image([-1, 2, 2, 3]))
  t.same(tensor.shape, [1, 2, 2, 3], 'batch -1 becomes 1')
  t.same(rounded(tensor.data), [1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0])
})

t.test('bilinear upscaling weighs the two nearest pixels, centres aligned', async (t) => {
  const ramp = pngBase64(2, 1, (x) => (x === 0 ? [0, 0, 0] : [255, 255, 255]))
  const tensor = await one(image([1, 1, 1, 4]), { image: ramp })
  t.same(rounded(tensor.data), [0, 0.25, 0.75, 1])
})

t.test('grayscale: BT.601 luma, by default normalised with mean 0.5 and std 0.5', async (t) => {
  const tensor = await one(image([1, 1, 2, 2], null))
  const red = (0.299 - 0.5) / 0.5
  const green = (0.587 - 0.5) / 0.5
  t.same(rounded(tensor.data), rounded([red, green, red, green]))
})

t.test('RGB is normalised with ImageNet mean and std by default, adapter_options override them', async (t) => {
  const white = { image: pngBase64(1, 1, () => [255, 255, 255]) }
  const imagenet = await one(image([1, 3, 1, 1], null), white)
  t.same(rounded(imagenet.data), rounded([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))
  const custom = await one(image([1, 3, 1, 1], { mean: [0.5, 0, 1], std: [0.5] }), white)
  t.same(rounded(custom.data), [1, 2, 0], 'one std for every channel')
})

t.test('a JPEG decodes too, and a data: URL is the same image', async (t) => {
  const red = jpegBase64(8, 8, () => RED)
  const tensor = await one(image([1, 3, 2, 2]), { image: red })
  const [r, g, b] = [tensor.data.slice(0, 4), tensor.data.slice(4, 8), tensor.data.slice(8)]
  t.ok(r.every((v) => v > 0.95) && g.every((v) => v < 0.05) && b.every((v) => v < 0.05), `red within JPEG loss: ${rounded(tensor.data, 3)}`)
  const url = await one(image([1, 3, 2, 2]), { image: `data:image/jpeg;base64,${red}` })
  t.same(url.data, tensor.data)
  const greenPng = await one(image([1, 3, 1, 1]), { image: `data:image/png;base64,\n${pngBase64(3, 3, () => GREEN)}` })
  t.same(rounded(greenPng.data), [0, 1, 0], 'whitespace in the base64 is ignored')
})

t.test('a client mistake is a VALIDATION_ERROR naming the field', async (t) => {
  const m = image([1, 3, 2, 2])
  const at = (input: unknown) => adapters.preprocess(m, [{ image: pngBase64(1, 1, () => RED) }, input], (i) => `inputs.${i}`)
  const corrupt = pngBytes(4, 4, redGreen)
  corrupt.fill(0, 33, corrupt.length - 12)
  const huge = pngBytes(1, 1, () => RED)
  huge.writeUInt32BE(100_000, 16)
  huge.writeUInt32BE(100_000, 20)
  const cases: Array<[unknown, RegExp]> = [
    ['not an object', /^inputs\.1: must be an object \{"image"/],
    [{ picture: 'x' }, /^inputs\.1\.image: required/],
    [{ image: 42 }, /^inputs\.1\.image: must be a string/],
    [{ image: '***' }, /^inputs\.1\.image: not valid base64$/],
    [{ image: Buffer.from('hello, not an image').toString('base64') }, /^inputs\.1\.image: not a PNG or JPEG image$/],
    [{ image: 'data:image/png,abc' }, /^inputs\.1\.image: a data: URL must be base64/],
    [{ image: corrupt.toString('base64') }, /^inputs\.1\.image: could not decode the PNG image/],
    [{ image: Buffer.from([0xff, 0xd8, 0xff, 0xe0, 1, 2, 3]).toString('base64') }, /^inputs\.1\.image: could not decode the JPEG image/],
    [{ image: huge.toString('base64') }, /^inputs\.1\.image: image of 100000x100000 pixels is larger than/],
  ]
  for (const [input, message] of cases) await t.rejects(at(input), refusal('VALIDATION_ERROR', message), String(message))
})

t.test('a model without a fixed size, channels or a batch of one is refused with what to set', async (t) => {
  const cases: Array<[AdapterModelPart, RegExp]> = [
    [{ input_shape: null }, /^model input_shape null: image_classification needs a 4-dimensional input_shape, e\.g\. \[1, 3, 224, 224\]/],
    [{ input_shape: [1, 3, -1, -1] }, /needs a fixed height and width to resize to; set input_shape/],
    [{ input_shape: [1, 5, 8, 8] }, /needs 1 or 3 channels/],
    [{ input_shape: [4, 3, 8, 8] }, /set the batch dimension to 1 or -1/],
    [{ input_shape: [1, 3, 8, 8], adapter_options: { mean: [0.1, 0.2] } }, /^model adapter_options\.mean: 2 values for 3 channels/],
    [{ input_shape: [1, 3, 8, 8], adapter_options: { std: [0] } }, /^model adapter_options\.std/],
  ]
  for (const [fields, message] of cases) {
    const m = { ...image([1, 3, 2, 2], null), ...fields }
    t.match(checkAdapterConfig(m), message, `checkAdapterConfig: ${String(message)}`)
    await t.rejects(adapters.preprocess(m, [{ image: pngBase64(1, 1, () => RED) }], () => 'input'), refusal('VALIDATION_ERROR', message))
  }
  t.equal(checkAdapterConfig(image([1, 224, 224, 3])), null, 'NHWC with fixed size is fine')
})

type AdapterModelPart = Partial<ReturnType<typeof model>>
