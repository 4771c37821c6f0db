/**
 * image_classification: `{"image": "<base64 PNG or JPEG, or a data: URL>"}` -> one float tensor the size the
 * model declares, NCHW or NHWC, RGB or grayscale, scaled to [0,1] and normalised with mean/std.
 */
import jpeg from 'jpeg-js'
import { PNG } from 'pngjs'
import type { Tensor } from '../protocol/frames.js'
import { fieldError, modelError, showShape, type AdapterOptions } from './options.js'
import type { AdapterModel } from './runtime.js'

const IMAGENET_MEAN = [0.485, 0.456, 0.406]
const IMAGENET_STD = [0.229, 0.224, 0.225]
/** Grayscale default: [0,1] becomes [-1,1]. */
const GRAY_MEAN = [0.5]
const GRAY_STD = [0.5]
/** Largest image decoded by default, in pixels (a 25 MP photo); the decoded RGBA needs 4 bytes a pixel. */
export const MAX_PIXELS = 25_000_000
/** Largest tensor produced, in values (the device protocol's limit). */
const MAX_VALUES = 16_000_000

export interface ImagePlan {
  layout: 'NCHW' | 'NHWC'
  channels: 1 | 3
  height: number
  width: number
  mean: number[]
  std: number[]
  /** The tensor's shape: input_shape with batch 1. */
  shape: number[]
}

/** Decoded pixels, 4 bytes (RGBA) each, row by row. */
export interface Rgba {
  width: number
  height: number
  data: Uint8Array
}

export function imagePlan(model: AdapterModel, options: AdapterOptions): ImagePlan {
  const shape = model.input_shape
  const example = 'e.g. [1, 3, 224, 224] (NCHW) or [1, 224, 224, 3] (NHWC)'
  if (!shape || shape.length !== 4) throw modelError(`input_shape ${showShape(shape)}: image_classification needs a 4-dimensional input_shape, ${example}`)
  const [batch, d1, d2, d3] = shape as [number, number, number, number]
  if (batch !== 1 && batch !== -1) throw modelError(`input_shape ${showShape(shape)}: image_classification sends one image per tensor; set the batch dimension to 1 or -1`)
  const layout = d1 === 1 || d1 === 3 ? 'NCHW' : d3 === 1 || d3 === 3 ? 'NHWC' : undefined
  if (!layout) throw modelError(`input_shape ${showShape(shape)}: image_classification needs 1 or 3 channels, at dimension 1 (NCHW) or 3 (NHWC)`)
  const [channels, height, width] = (layout === 'NCHW' ? [d1, d2, d3] : [d3, d1, d2]) as [1 | 3, number, number]
  if (height < 1 || width < 1) throw modelError(`input_shape ${showShape(shape)}: image_classification needs a fixed height and width to resize to; set input_shape, ${example}`)
  if (channels * height * width > MAX_VALUES) throw modelError(`input_shape ${showShape(shape)}: more than ${MAX_VALUES} values per image`)
  const mean = perChannel('mean', options.mean ?? (channels === 1 ? GRAY_MEAN : IMAGENET_MEAN), channels)
  const std = perChannel('std', options.std ?? (channels === 1 ? GRAY_STD : IMAGENET_STD), channels)
  const out = layout === 'NCHW' ? [1, channels, height, width] : [1, height, width, channels]
  return { layout, channels, height, width, mean, std, shape: out }
}

/** One value applies to every channel; otherwise one per channel. */
function perChannel(name: string, values: number[], channels: number): number[] {
  if (values.length === 1) return Array.from({ length: channels }, () => values[0] as number)
  if (values.length !== channels) throw modelError(`adapter_options.${name}: ${values.length} values for ${channels} channels; give 1 or ${channels}`)
  return values
}

/** The business input `{"image": ...}` -> the model's tensor. */
export function imageTensor(input: unknown, field: string, plan: ImagePlan, maxPixels = MAX_PIXELS): Tensor {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) throw fieldError(field, 'must be an object {"image": "<base64 PNG or JPEG>"}')
  if (!('image' in input)) throw fieldError(`${field}.image`, 'required: a base64 PNG or JPEG image')
  const pixels = decodeImage(input.image, `${field}.image`, maxPixels)
  return { data: toTensorData(pixels, plan), shape: plan.shape }
}

/** Base64 (or a `data:image/...;base64,` URL) -> RGBA pixels, refused beyond `maxPixels`. */
export function decodeImage(value: unknown, field: string, maxPixels = MAX_PIXELS): Rgba {
  if (typeof value !== 'string') throw fieldError(field, 'must be a string: a base64 PNG or JPEG image')
  const bytes = base64Bytes(value, field)
  if (isPng(bytes)) return decodePng(bytes, field, maxPixels)
  if (isJpeg(bytes)) return decodeJpeg(bytes, field, maxPixels)
  throw fieldError(field, 'not a PNG or JPEG image')
}

function base64Bytes(value: string, field: string): Buffer {
  let text = value
  if (text.startsWith('data:')) {
    const comma = text.indexOf(',')
    if (comma < 0 || !text.slice(0, comma).endsWith(';base64')) throw fieldError(field, 'a data: URL must be base64, e.g. data:image/png;base64,...')
    text = text.slice(comma + 1)
  }
  text = text.replace(/\s+/g, '')
  if (text.length === 0 || !/^[A-Za-z0-9+/_-]+={0,2}$/.test(text)) throw fieldError(field, 'not valid base64')
  return Buffer.from(text, 'base64')
}

const isPng = (b: Buffer) => b.length >= 24 && b.readUInt32BE(0) === 0x89504e47 && b.readUInt32BE(4) === 0x0d0a1a0a
const isJpeg = (b: Buffer) => b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff

function decodePng(bytes: Buffer, field: string, maxPixels: number): Rgba {
  // The header says the size: refuse a huge image before pngjs allocates it.
  const width = bytes.readUInt32BE(16)
  const height = bytes.readUInt32BE(20)
  if (width * height > maxPixels) throw fieldError(field, `image of ${width}x${height} pixels is larger than ${maxPixels} pixels`)
  try {
    const png = PNG.sync.read(bytes)
    return { width: png.width, height: png.height, data: png.data }
  } catch (error) {
    throw fieldError(field, `could not decode the PNG image (${(error as Error).message})`)
  }
}

function decodeJpeg(bytes: Buffer, field: string, maxPixels: number): Rgba {
  try {
    const img = jpeg.decode(bytes, { useTArray: true, formatAsRGBA: true, maxResolutionInMP: maxPixels / 1e6, maxMemoryUsageInMB: 512 })
    if (img.width < 1 || img.height < 1) throw new Error('no pixels')
    return img
  } catch (error) {
    if (/maxResolutionInMP/.test((error as Error).message)) throw fieldError(field, `image is larger than ${maxPixels} pixels`)
    throw fieldError(field, `could not decode the JPEG image (${(error as Error).message})`)
  }
}

/**
 * Resize (bilinear, pixel centres aligned as OpenCV's INTER_LINEAR and PyTorch's align_corners=False, no
 * antialiasing), convert to the model's channels, scale to [0,1], normalise, lay out. Alpha is ignored.
 */
export function toTensorData(img: Rgba, plan: ImagePlan): number[] {
  const { channels, height: H, width: W, layout, mean, std } = plan
  const planes = channels === 1 ? [luma(img)] : [0, 1, 2].map((c) => plane(img, c))
  const xs = samples(img.width, W)
  const ys = samples(img.height, H)
  const data = new Array<number>(channels * H * W)
  for (let y = 0; y < H; y++) {
    const sy = ys[y] as Sample
    for (let x = 0; x < W; x++) {
      const sx = xs[x] as Sample
      for (let c = 0; c < channels; c++) {
        const p = planes[c] as Float64Array
        const top = (p[sy.i0 * img.width + sx.i0] as number) * (1 - sx.w) + (p[sy.i0 * img.width + sx.i1] as number) * sx.w
        const bottom = (p[sy.i1 * img.width + sx.i0] as number) * (1 - sx.w) + (p[sy.i1 * img.width + sx.i1] as number) * sx.w
        const value = (top * (1 - sy.w) + bottom * sy.w) / 255
        const at = layout === 'NCHW' ? c * H * W + y * W + x : (y * W + x) * channels + c
        data[at] = (value - (mean[c] as number)) / (std[c] as number)
      }
    }
  }
  return data
}

interface Sample {
  i0: number
  i1: number
  w: number
}

/** For each destination index, the two source indices and the weight of the second. */
function samples(from: number, to: number): Sample[] {
  const scale = from / to
  return Array.from({ length: to }, (_, d) => {
    const s = Math.min(Math.max((d + 0.5) * scale - 0.5, 0), from - 1)
    const i0 = Math.floor(s)
    return { i0, i1: Math.min(i0 + 1, from - 1), w: s - i0 }
  })
}

function plane(img: Rgba, channel: number): Float64Array {
  const out = new Float64Array(img.width * img.height)
  for (let i = 0; i < out.length; i++) out[i] = img.data[i * 4 + channel] as number
  return out
}

/** Grayscale as ITU-R BT.601 luma, as PIL's convert('L'). */
function luma(img: Rgba): Float64Array {
  const d = img.data
  const out = new Float64Array(img.width * img.height)
  for (let i = 0; i < out.length; i++) out[i] = 0.299 * (d[i * 4] as number) + 0.587 * (d[i * 4 + 1] as number) + 0.114 * (d[i * 4 + 2] as number)
  return out
}

