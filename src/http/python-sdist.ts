import { readdir, readFile } from 'node:fs/promises'
import path from 'node:path'
import { promisify } from 'node:util'
import { gzip } from 'node:zlib'
import { Header } from 'tar'

const BLOCK = 512

/**
 * The Python device SDK (sdk/python) as an sdist that `pip install <file>` takes: a gzipped tar of
 * `dcp_device-<version>/` holding pyproject.toml, README.md, the `dcp_device` package and a PKG-INFO made from
 * pyproject's name and version. Built from the files on each request (a few dozen kB), so it always matches
 * the checkout, and needs no Python on the server.
 */
export async function pythonSdist(root: string): Promise<{ fileName: string; bytes: Buffer }> {
  const pyproject = await readFile(path.join(root, 'pyproject.toml'), 'utf8')
  const version = /^version\s*=\s*"([^"]+)"/m.exec(pyproject)?.[1]
  if (!version) throw new Error(`${root}/pyproject.toml names no version`)
  const base = `dcp_device-${version}`
  const files: Array<[string, Buffer]> = [
    ['PKG-INFO', Buffer.from(`Metadata-Version: 2.1\nName: dcp-device\nVersion: ${version}\n`)],
    ['pyproject.toml', Buffer.from(pyproject)],
    ['README.md', await readFile(path.join(root, 'README.md'))],
  ]
  const modules = (await readdir(path.join(root, 'dcp_device'))).filter((name) => name.endsWith('.py')).sort()
  for (const name of modules) files.push([`dcp_device/${name}`, await readFile(path.join(root, 'dcp_device', name))])
  const blocks = files.flatMap(([name, content]) => [header(`${base}/${name}`, content.length), content, Buffer.alloc(padding(content.length))])
  const tarball = Buffer.concat([...blocks, Buffer.alloc(2 * BLOCK)])
  return { fileName: `${base}.tar.gz`, bytes: await promisify(gzip)(tarball) }
}

function header(name: string, size: number): Buffer {
  const block = Buffer.alloc(BLOCK)
  new Header({ path: name, mode: 0o644, size, mtime: new Date(0), type: 'File', uid: 0, gid: 0 }).encode(block, 0)
  return block
}

const padding = (size: number) => (BLOCK - (size % BLOCK)) % BLOCK
