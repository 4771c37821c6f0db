import t from 'tap'
import { DatasetError, MAX_DATASET_ROWS, parseDataset, shardRows, splitDataset, type Dataset } from '../../src/datasets/parse.js'

const bytes = (text: string) => new TextEncoder().encode(text)
const csv = (text: string) => parseDataset(bytes(text), 'csv')
const jsonl = (text: string) => parseDataset(bytes(text), 'jsonl')
const plain = (ds: Dataset) => ({ ...ds, features: [...ds.features], labels: [...ds.labels] })
const refused = (message: RegExp) => ({ constructor: DatasetError, message })

t.test('a CSV with a label column: the other columns are the features, row by row', async (t) => {
  t.same(plain(csv('age,label,income\n30,1,5000\n41,0,0.5\n')), { features: [30, 5000, 41, 0.5], labels: [1, 0], rows: 2, columns: 2, labelKind: 'class' })
  t.same(plain(csv('a,b,target\r\n1,2,0.5\r\n\r\n-3,2.5e-1,+2\r\n')), { features: [1, 2, -3, 0.25], labels: [0.5, 2], rows: 2, columns: 2, labelKind: 'value' }, 'no column named label: the last one is')
  t.same(plain(csv('\ufeff"x", "LABEL"\n" 1.5",2\n')).features, [1.5], 'BOM, quoted cells and the name in any case')
})

t.test('JSON lines of features and a label', async (t) => {
  t.same(plain(jsonl('{"features":[1,2.5],"label":3}\n\n{"label":0,"features":[-1,0]}')), { features: [1, 2.5, -1, 0], labels: [3, 0], rows: 2, columns: 2, labelKind: 'class' })
  t.equal(jsonl('{"features":[1],"label":-1}').labelKind, 'value', 'a negative label is a value')
  t.equal(jsonl('{"features":[1],"label":1.5}').labelKind, 'value')
})

t.test('a bad CSV row is refused, naming its line and what is wrong', async (t) => {
  const cases: Array<[string, RegExp]> = [
    ['a,label\n1,0\n2\n', /^line 3: expected 2 columns, got 1$/],
    ['a,label\n1,0,7\n', /^line 2: expected 2 columns, got 3$/],
    ['a,label\n\n1,0\nabc,1\n', /^line 4: column "a": "abc" is not a number$/],
    ['a,label\n0x10,1\n', /^line 2: column "a": "0x10" is not a number$/],
    ['a,label\nInfinity,1\n', /^line 2: column "a": "Infinity" is not a number$/],
    ['a,label\n1e999,1\n', /^line 2: column "a": "1e999" is not a number$/],
    ['a,b,label\n1,,0\n', /^line 2: column "b": missing value$/],
    ['a,label\n1, \n', /^line 2: missing label$/],
    ['a,label\n1,cat\n', /^line 2: label "cat" is not a number$/],
    ['a,label\n"1,0\n', /^line 2: a quoted cell is not closed$/],
    ['label\n1\n', /^line 1: the header needs at least one feature column and a label column$/],
    ['label,a,Label\n1,2,3\n', /^line 1: two columns are named label$/],
    ['a,label\n', /^the file has a header but no rows$/],
    ['', /^the file is empty$/],
    ['\n \n\r\n', /^the file is empty$/],
  ]
  for (const [text, message] of cases) t.throws(() => csv(text), refused(message), JSON.stringify(text))
  t.throws(() => csv('a,label\n1,x\n'), { name: 'DatasetError', message: 'line 2: label "x" is not a number', line: 2 }, 'the line is on the error too')
})

t.test('a bad JSON line is refused, naming its line and what is wrong', async (t) => {
  const cases: Array<[string, RegExp]> = [
    ['{"features":[1],"label":0}\n{"features":[1],\n', /^line 2: not valid JSON$/],
    ['[1,2]\n', /^line 1: expected an object \{"features":\[\.\.\.\],"label":n\}$/],
    ['{"features":"1,2","label":0}\n', /^line 1: "features" must be an array of numbers$/],
    ['{"features":[],"label":0}\n', /^line 1: "features" is empty$/],
    ['{"features":[1,"2"],"label":0}\n', /^line 1: features\[1\] is not a number: "2"$/],
    ['{"features":[1,null],"label":0}\n', /^line 1: features\[1\] is not a number: null$/],
    ['{"features":[1]}\n', /^line 1: missing label$/],
    ['{"features":[1],"label":"a"}\n', /^line 1: label "a" is not a number$/],
    ['{"features":[1,2],"label":0}\n\n{"features":[1],"label":0}\n', /^line 3: expected 2 features, got 1$/],
    ['', /^the file is empty$/],
  ]
  for (const [text, message] of cases) t.throws(() => jsonl(text), refused(message), JSON.stringify(text))
  t.throws(() => parseDataset(Uint8Array.of(0x61, 0xff, 0x0a), 'csv'), refused(/^the file is not UTF-8 text$/))
})

t.test(`more than ${MAX_DATASET_ROWS} rows are refused at the first row too many`, async (t) => {
  const rows = '1,0\n'.repeat(MAX_DATASET_ROWS)
  t.throws(() => csv(`a,label\n${rows}2,1\n`), refused(/^line 1000002: more than 1,000,000 rows$/))
  t.equal(csv(`a,label\n${rows}`).rows, MAX_DATASET_ROWS, 'exactly the limit is fine')
})

t.test('a split is a seeded shuffle: the same seed gives the same split, every row lands once', async (t) => {
  const n = 50
  const ds = csv(`id,label\n${Array.from({ length: n }, (_, i) => `${i},${i % 3}`).join('\n')}`)
  const { train, validation } = splitDataset(ds, { seed: 42 })
  t.equal(validation.rows, 10, 'validationFraction defaults to 0.2')
  t.equal(train.rows, 40)
  const ids = [...train.features, ...validation.features]
  t.same([...ids].sort((a, b) => a - b), Array.from({ length: n }, (_, i) => i))
  t.not(ids.join(), Array.from({ length: n }, (_, i) => i).join(), 'shuffled')
  for (const part of [train, validation]) {
    part.features.forEach((id, i) => t.equal(part.labels[i], id % 3, `row ${id} keeps its label`))
    t.equal(part.labelKind, 'class')
    t.equal(part.columns, 1)
  }
  t.same(plain(splitDataset(ds, { seed: 42, validationFraction: 0.2 }).train), plain(train))
  t.not([...splitDataset(ds, { seed: 43 }).train.features].join(), [...train.features].join(), 'another seed, another order')
  // pinned (and checked against a Python transcription): every device and SDK must reproduce this order
  t.same([...splitDataset(csv('id,label\n0,0\n1,0\n2,0\n3,0\n4,0\n'), { seed: 1, validationFraction: 0.4 }).validation.features], [4, 2])
})

t.test('a split keeps at least one row on each side, and refuses a fraction outside [0, 1)', async (t) => {
  const two = csv('a,label\n1,0\n2,1\n')
  t.same([splitDataset(two, { seed: 1, validationFraction: 0.01 }).validation.rows, splitDataset(two, { seed: 1, validationFraction: 0.9 }).train.rows], [1, 1])
  t.equal(splitDataset(two, { seed: 1, validationFraction: 0 }).validation.rows, 0)
  t.equal(splitDataset(csv('a,label\n1,0\n'), { seed: 1 }).train.rows, 1)
  t.throws(() => splitDataset(two, { seed: 1, validationFraction: 1 }), RangeError)
  t.throws(() => splitDataset(two, { seed: 1, validationFraction: -0.1 }), RangeError)
})

t.test('shards are contiguous, in order, cover every row once and differ by at most one row', async (t) => {
  t.same([0, 1, 2].map((i) => shardRows(10, 3, i)), [[0, 4], [4, 7], [7, 10]])
  t.same([0, 1, 2].map((i) => shardRows(2, 3, i)), [[0, 1], [1, 2], [2, 2]])
  for (let rows = 0; rows <= 40; rows++) {
    for (let shards = 1; shards <= 9; shards++) {
      const ranges = Array.from({ length: shards }, (_, i) => shardRows(rows, shards, i))
      const sizes = ranges.map(([s, e]) => e - s)
      const ok = ranges.every(([s], i) => s === (i === 0 ? 0 : ranges[i - 1]![1])) && ranges.at(-1)![1] === rows && Math.max(...sizes) - Math.min(...sizes) <= 1
      if (!ok) t.fail(`${rows} rows in ${shards} shards: ${JSON.stringify(ranges)}`)
    }
  }
  t.throws(() => shardRows(10, 0, 0), /shards must be an integer >= 1/)
  t.throws(() => shardRows(10, 3, 3), /index must be an integer in \[0, 3\), got 3/)
  t.throws(() => shardRows(-1, 3, 0), /rows must be an integer >= 0/)
})
