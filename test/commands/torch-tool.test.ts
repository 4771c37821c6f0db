import t from 'tap'
import { pythonRuntime, TorchTool, TorchToolError } from '../../src/commands/torch-tool.js'
import { engineOf } from '../../src/commands/training-validation.js'
import { syntheticTask } from '../../src/sdk/trainer/synthetic.js'
import { close, runPython, stateDictOf, TORCH_PRELUDE, torchScriptMlps } from '../helpers/torch.js'

const SIZES = { inputs: 6, hidden: 10, outputs: 3 }
// every model of the file in one Python run (each run imports torch: seconds on a busy machine)
const [mlp, logits, probabilities, regression, toExport, again] = await torchScriptMlps([
  { ...SIZES, seed: 3 },
  { ...SIZES, seed: 5 },
  { ...SIZES, seed: 5, softmax: true },
  { inputs: 4, hidden: 6, outputs: 2, seed: 9 },
  { ...SIZES, seed: 4 },
  { ...SIZES, seed: 6 },
])

/** The TorchScript engine of a model file, through one tool process for the whole file. */
const tool = new TorchTool()
t.teardown(() => tool.close())
const engine = async (bytes: Buffer, key = 'sha256:mlp') => engineOf({ format: 'torchscript', checksum: key, bytes, input_shape: null }, tool)

/** Weights moved off the model's own: every value + 0.01·k, so a result from the old ones shows. */
function shifted(weights: Record<string, Float32Array>): Record<string, Float32Array> {
  return Object.fromEntries(Object.entries(weights).map(([name, values]) => [name, values.map((v, k) => v + 0.01 * ((k % 7) - 3))]))
}

t.test("the tool's sizes and initial weights are the model's: its state_dict, by name, flattened", async (t) => {
  const bytes = mlp!
  const model = await engine(bytes)
  t.equal(model.inputSize, SIZES.inputs, 'input size from the first weight matrix')
  t.equal(model.outputSize, SIZES.outputs, 'output size from a forward pass')
  t.equal(model.endsInSoftmax, false)
  const initial = await model.initialWeights()
  const state = await stateDictOf(bytes)
  t.same(Object.keys(initial).sort(), Object.keys(state).sort())
  for (const [name, values] of Object.entries(state)) t.ok(close(initial[name]!, values, 0), `${name} equals the state_dict's`)
})

for (const softmax of [false, true]) {
  t.test(`evaluate equals torch's own cross-entropy and accuracy (${softmax ? 'a model ending in softmax' : 'logits'})`, async (t) => {
    const bytes = softmax ? probabilities! : logits!
    const model = await engine(bytes, `sha256:mlp-${softmax}`)
    t.equal(model.endsInSoftmax, softmax)
    const weights = shifted(await model.initialWeights())
    const set = syntheticTask({ inputs: SIZES.inputs, outputs: SIZES.outputs, seed: 11 }).validationSet(200)
    const got = await model.evaluate(weights, set.x, set.labels, 'cross_entropy')
    const expected = await runPython<{ loss: number; accuracy: number }>(`${TORCH_PRELUDE}
m = load(args['model'])
m.load_state_dict({k: torch.tensor(v).reshape(m.state_dict()[k].shape) for k, v in args['weights'].items()})
out = m(torch.tensor(args['x']).reshape(-1, ${SIZES.inputs}))
labels = torch.tensor(args['labels'])
loss = torch.nn.functional.nll_loss(torch.log(out), labels) if args['softmax'] else torch.nn.functional.cross_entropy(out, labels)
print(json.dumps({'loss': float(loss), 'accuracy': float((out.argmax(1) == labels).float().mean())}))
`, { model: bytes.toString('base64'), weights: Object.fromEntries(Object.entries(weights).map(([k, v]) => [k, Array.from(v)])), x: Array.from(set.x), labels: Array.from(set.labels), softmax })
    t.ok(Math.abs(got.loss - expected.loss) < 1e-5, `loss ${got.loss} vs torch ${expected.loss}`)
    t.equal(got.accuracy, expected.accuracy)
    t.not(got.accuracy, 1, 'a model that is not trained yet (the check can tell)')
  })
}

t.test("evaluate with mse equals torch's MSELoss, and accuracy counts rows within 0.5 of their targets", async (t) => {
  const bytes = regression!
  const model = await engine(bytes, 'sha256:regression')
  const weights = await model.initialWeights()
  const x = Float32Array.from({ length: 40 }, (_, i) => Math.sin(i))
  const targets = Float32Array.from({ length: 20 }, (_, i) => Math.cos(i) * 0.5)
  const got = await model.evaluate(weights, x, targets, 'mse')
  const expected = await runPython<{ loss: number; accuracy: number }>(`${TORCH_PRELUDE}
m = load(args['model'])
out = m(torch.tensor(args['x']).reshape(-1, 4))
target = torch.tensor(args['targets']).reshape(out.shape)
print(json.dumps({'loss': float(torch.nn.functional.mse_loss(out, target)), 'accuracy': float(((out - target).abs() < 0.5).all(1).float().mean())}))
`, { model: bytes.toString('base64'), x: Array.from(x), targets: Array.from(targets) })
  t.ok(Math.abs(got.loss - expected.loss) < 1e-6, `loss ${got.loss} vs torch ${expected.loss}`)
  t.equal(got.accuracy, expected.accuracy)
})

t.test('export writes a TorchScript file that torch.jit.load reads with the new weights, and that runs', async (t) => {
  const model = await engine(toExport!, 'sha256:export')
  const weights = shifted(await model.initialWeights())
  const exported = await model.export(weights)
  const loaded = await runPython<{ weights: Record<string, number[]>; outputs: number[] }>(`${TORCH_PRELUDE}
m = load(args)
print(json.dumps({'weights': weights(m), 'outputs': m(torch.ones(1, ${SIZES.inputs})).reshape(-1).tolist()}))
`, Buffer.from(exported).toString('base64'))
  for (const [name, values] of Object.entries(weights)) t.ok(close(loaded.weights[name]!, values, 0), `${name} is the new weights`)
  t.equal(loaded.outputs.length, SIZES.outputs, 'it runs')
})

t.test('a declared input shape is used as given; a model that does not run on it is a clear error', async (t) => {
  const bytes = mlp!
  const fits = await engineOf({ format: 'torchscript', checksum: 'sha256:shape', bytes, input_shape: [-1, SIZES.inputs] }, tool)
  t.equal(fits.inputSize, SIZES.inputs)
  await t.rejects(engineOf({ format: 'torchscript', checksum: 'sha256:shape', bytes, input_shape: [-1, 5] }, tool), { code: 'VALIDATION_ERROR', message: /does not run on inputs of shape \[2, 5\]/ })
  await t.rejects(engineOf({ format: 'torchscript', checksum: 'sha256:junk', bytes: Buffer.from('PK\u0003\u0004 not really'), input_shape: null }, tool), { code: 'VALIDATION_ERROR', message: /torch\.jit\.load failed/ })
})

t.test('the process is started again after it died, and the models it held are sent again', async (t) => {
  const own = new TorchTool()
  t.teardown(() => own.close())
  const bytes = again!
  const model = await engineOf({ format: 'torchscript', checksum: 'sha256:again', bytes, input_shape: null }, own)
  const weights = await model.initialWeights()
  const before = await model.evaluate(weights, new Float32Array(SIZES.inputs * 2), Int32Array.of(0, 1), 'cross_entropy')
  const pid = (own as unknown as { running: { child: { pid: number } } }).running.child.pid
  // killed under a call: the call is answered all the same, by a new process
  const during = model.evaluate(weights, new Float32Array(SIZES.inputs * 2), Int32Array.of(0, 1), 'cross_entropy')
  process.kill(pid, 'SIGKILL')
  t.same(await during, before)
  t.not((own as unknown as { running: { child: { pid: number } } }).running.child.pid, pid, 'a new process')
})

t.test('a model the process dropped (it keeps DCP_TOOL_MAX_MODELS) is sent again', async (t) => {
  process.env.DCP_TOOL_MAX_MODELS = '1'
  const own = new TorchTool()
  t.teardown(() => {
    own.close()
    delete process.env.DCP_TOOL_MAX_MODELS
  })
  const first = await engineOf({ format: 'torchscript', checksum: 'sha256:first', bytes: mlp!, input_shape: null }, own)
  const second = await engineOf({ format: 'torchscript', checksum: 'sha256:second', bytes: again!, input_shape: null }, own)
  t.same(Object.keys(await first.initialWeights()).sort(), Object.keys(await second.initialWeights()).sort())
  t.same(await first.initialWeights(), Object.fromEntries(Object.entries(await stateDictOf(mlp!)).map(([k, v]) => [k, Float32Array.from(v)])), 'the first model, loaded again')
})

t.test('without a Python runtime (DCP_PYTHON pointing nowhere, or a Python without torch) a call fails saying how to get one', async (t) => {
  t.equal(pythonRuntime({ DCP_PYTHON: '/nowhere/python' }), undefined)
  const none = new TorchTool({ python: pythonRuntime({ DCP_PYTHON: '/nowhere/python' }) })
  await t.rejects(none.call('inspect', { key: 'k', bytes: new Uint8Array(1) }), { name: 'TorchToolError', unavailable: true, message: /npm run setup:python/ })
  const noTorch = new TorchTool({ python: '/bin/false' })
  t.teardown(() => noTorch.close())
  const error = await noTorch.call('inspect', { key: 'k', bytes: new Uint8Array(1) }).catch((e: unknown) => e)
  t.ok(error instanceof TorchToolError && error.unavailable, String(error))
  await t.rejects(engineOf({ format: 'torchscript', checksum: 'k', bytes: new Uint8Array(1), input_shape: null }, none), { code: 'VALIDATION_ERROR', message: /runs in Python: this server has no Python runtime.*npm run setup:python/ })
})
