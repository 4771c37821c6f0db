/** Models and real images for the adapter tests. */
import jpeg from 'jpeg-js'
import { PNG } from 'pngjs'
import type { AdapterModel } from '../../src/adapters/runtime.js'

export function model(fields: Partial<AdapterModel> = {}): AdapterModel {
  return {
    model_id: 'mdl_test',
    input_shape: null,
    output_shape: null,
    input_schema: null,
    labels: null,
    preprocessing: null,
    postprocessing: null,
    adapter_options: null,
    ...fields,
  }
}

type Pixel = (x: number, y: number) => [number, number, number]

function rgba(width: number, height: number, pixel: Pixel): Buffer {
  const data = Buffer.alloc(width * height * 4)
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const [r, g, b] = pixel(x, y)
      data.set([r, g, b, 255], (y * width + x) * 4)
    }
  }
  return data
}

export function pngBytes(width: number, height: number, pixel: Pixel): Buffer {
  const png = new PNG({ width, height })
  rgba(width, height, pixel).copy(png.data)
  return PNG.sync.write(png)
}

export const pngBase64 = (width: number, height: number, pixel: Pixel) => pngBytes(width, height, pixel).toString('base64')
export const jpegBase64 = (width: number, height: number, pixel: Pixel) => jpeg.encode({ width, height, data: rgba(width, height, pixel) }, 100).data.toString('base64')

export const RED: [number, number, number] = [255, 0, 0]
export const GREEN: [number, number, number] = [0, 255, 0]
/** Left half red, right half green. */
export const redGreen: Pixel = (x, _y) => (x < 2 ? RED : GREEN)

/** Numbers rounded, to compare floats. */
export const rounded = (values: number[], digits = 6) => values.map((v) => Number(v.toFixed(digits)))

export const field = (i: number) => `inputs.${i}`
