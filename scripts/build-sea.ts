/**
 * Builds a Node.js single executable application (SEA) from one CommonJS
 * file: `node --experimental-sea-config` prepares the blob, and the blob is
 * put into a copy of the Node.js binary.
 *
 * Node.js documents postject for the second step; postject is not among our
 * dependencies, so this file does what postject does on Linux, which is
 * small: the blob goes into the executable as an ELF note named
 * NODE_SEA_BLOB in a new PT_NOTE segment (Node.js finds it by walking its
 * own program headers, through dl_iterate_phdr), and the sentinel fuse
 * string in the binary is flipped from ':0' to ':1'. The program header
 * table does not fit where it is, so a copy with the two new entries is
 * placed at the end of the file, in a new read-only PT_LOAD segment that
 * also holds the note, mapped at the address the kernel expects it at.
 * Only 64-bit little-endian ELF (Linux on x86-64 and arm64) is handled;
 * elsewhere seaSupport says why not.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, copyFileSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';

/** The string Node.js checks to know it carries a SEA blob; its last character is the fuse. */
const SEA_FUSE = 'NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2:';
const NOTE_NAME = 'NODE_SEA_BLOB';

const PT_LOAD = 1;
const PT_NOTE = 4;
const PT_PHDR = 6;
const PF_R = 4;
const PHDR_SIZE = 56;
/** Alignment of the new segment: a multiple of every page size Linux uses (4K, 16K, 64K). */
const SEGMENT_ALIGN = 0x10000;

/** Why a SEA cannot be built with this Node.js on this machine, or undefined when it can. */
export function seaSupport(nodeBinary = process.execPath): string | undefined {
  if (process.platform !== 'linux') {
    return `building the single executable here is implemented for Linux (ELF) only, not ${process.platform}; use postject there`;
  }
  if (!['x64', 'arm64'].includes(process.arch)) return `building the single executable is not implemented for ${process.arch}`;
  const [major] = process.versions.node.split('.').map(Number);
  if ((major ?? 0) < 20) return `Node.js ${process.version} has no --experimental-sea-config (20 or newer has)`;
  const binary = readFileSync(nodeBinary);
  if (binary.indexOf(`${SEA_FUSE}0`) < 0) {
    return `${nodeBinary} has no unblown SEA fuse: it was built without single executable support, or already carries a blob`;
  }
  return undefined;
}

/**
 * Puts `blob` into an ELF executable as postject does for Node.js (see the
 * file comment). Pure: returns the new file's bytes.
 */
export function injectSeaBlob(executable: Buffer, blob: Buffer): Buffer {
  if (executable.readUInt32BE(0) !== 0x7f454c46) throw new Error('not an ELF file');
  if (executable[4] !== 2 || executable[5] !== 1) throw new Error('only 64-bit little-endian ELF files are supported');
  const phoff = Number(executable.readBigUInt64LE(32));
  const phentsize = executable.readUInt16LE(54);
  const phnum = executable.readUInt16LE(56);
  if (phentsize !== PHDR_SIZE || phnum === 0xffff)
    throw new Error(`unexpected program header table (entry size ${phentsize}, ${phnum} entries)`);

  interface Phdr {
    type: number;
    flags: number;
    offset: bigint;
    vaddr: bigint;
    paddr: bigint;
    filesz: bigint;
    memsz: bigint;
    align: bigint;
  }
  const phdrs: Phdr[] = [];
  for (let i = 0; i < phnum; i++) {
    const at = phoff + i * PHDR_SIZE;
    phdrs.push({
      type: executable.readUInt32LE(at),
      flags: executable.readUInt32LE(at + 4),
      offset: executable.readBigUInt64LE(at + 8),
      vaddr: executable.readBigUInt64LE(at + 16),
      paddr: executable.readBigUInt64LE(at + 24),
      filesz: executable.readBigUInt64LE(at + 32),
      memsz: executable.readBigUInt64LE(at + 40),
      align: executable.readBigUInt64LE(at + 48),
    });
  }
  const loads = phdrs.filter((p) => p.type === PT_LOAD);
  const first = loads[0];
  if (first?.offset !== 0n) throw new Error('the first loadable segment does not start at the beginning of the file');
  if (phdrs.some((p) => p.type === PT_NOTE && hasNote(executable, p, NOTE_NAME))) {
    throw new Error(`the executable already carries a ${NOTE_NAME} note`);
  }
  // Where file offset 0 is mapped; the new segment keeps that offset-to-address relation,
  // so the program headers are where both old and new kernels compute AT_PHDR to be.
  const base = first.vaddr;
  let end = 0n;
  for (const p of loads) if (p.vaddr + p.memsz > end) end = p.vaddr + p.memsz;
  const segmentOffset = alignUp(BigInt(Math.max(executable.length, Number(end - base))), BigInt(SEGMENT_ALIGN));

  const newPhnum = phnum + 2;
  const tableSize = newPhnum * PHDR_SIZE;
  const noteOffsetInSegment = Number(alignUp(BigInt(tableSize), 8n));
  const name = Buffer.from(`${NOTE_NAME}\0`);
  const noteSize = 12 + Number(alignUp(BigInt(name.length), 4n)) + Number(alignUp(BigInt(blob.length), 4n));
  const segmentSize = noteOffsetInSegment + noteSize;

  const segment = Buffer.alloc(segmentSize);
  const noteAt = noteOffsetInSegment;
  segment.writeUInt32LE(name.length, noteAt);
  segment.writeUInt32LE(blob.length, noteAt + 4);
  segment.writeUInt32LE(0, noteAt + 8);
  name.copy(segment, noteAt + 12);
  blob.copy(segment, noteAt + 12 + Number(alignUp(BigInt(name.length), 4n)));

  const at = (offset: bigint | number) => base + BigInt(offset);
  const newLoad: Phdr = {
    type: PT_LOAD,
    flags: PF_R,
    offset: segmentOffset,
    vaddr: at(segmentOffset),
    paddr: at(segmentOffset),
    filesz: BigInt(segmentSize),
    memsz: BigInt(segmentSize),
    align: BigInt(SEGMENT_ALIGN),
  };
  const noteOffset = segmentOffset + BigInt(noteOffsetInSegment);
  const newNote: Phdr = {
    type: PT_NOTE,
    flags: PF_R,
    offset: noteOffset,
    vaddr: at(noteOffset),
    paddr: at(noteOffset),
    filesz: BigInt(noteSize),
    memsz: BigInt(noteSize),
    align: 4n,
  };
  // Loadable segments must stay sorted by address: the new one, the highest, goes after the last.
  const lastLoad = phdrs.lastIndexOf(loads.at(-1) as Phdr);
  const table = [...phdrs.slice(0, lastLoad + 1), newLoad, ...phdrs.slice(lastLoad + 1), newNote].map((p) =>
    p.type === PT_PHDR
      ? {
          ...p,
          offset: segmentOffset,
          vaddr: at(segmentOffset),
          paddr: at(segmentOffset),
          filesz: BigInt(tableSize),
          memsz: BigInt(tableSize),
        }
      : p,
  );
  table.forEach((p, i) => {
    const o = i * PHDR_SIZE;
    segment.writeUInt32LE(p.type, o);
    segment.writeUInt32LE(p.flags, o + 4);
    segment.writeBigUInt64LE(p.offset, o + 8);
    segment.writeBigUInt64LE(p.vaddr, o + 16);
    segment.writeBigUInt64LE(p.paddr, o + 24);
    segment.writeBigUInt64LE(p.filesz, o + 32);
    segment.writeBigUInt64LE(p.memsz, o + 40);
    segment.writeBigUInt64LE(p.align, o + 48);
  });

  const out = Buffer.alloc(Number(segmentOffset) + segmentSize);
  executable.copy(out, 0);
  segment.copy(out, Number(segmentOffset));
  out.writeBigUInt64LE(segmentOffset, 32);
  out.writeUInt16LE(newPhnum, 56);

  const fuse = out.indexOf(`${SEA_FUSE}0`);
  if (fuse < 0) throw new Error('the SEA fuse was not found: this Node.js was built without single executable support');
  if (out.indexOf(`${SEA_FUSE}0`, fuse + 1) >= 0) throw new Error('the SEA fuse string occurs more than once');
  out.write('1', fuse + SEA_FUSE.length, 'latin1');
  return out;
}

function hasNote(file: Buffer, segment: { offset: bigint; filesz: bigint }, name: string): boolean {
  let pos = Number(segment.offset);
  const end = pos + Number(segment.filesz);
  while (pos + 12 <= end) {
    const namesz = file.readUInt32LE(pos);
    const descsz = file.readUInt32LE(pos + 4);
    if (file.toString('latin1', pos + 12, pos + 12 + namesz).replace(/\0+$/, '') === name) return true;
    pos += 12 + Number(alignUp(BigInt(namesz), 4n)) + Number(alignUp(BigInt(descsz), 4n));
  }
  return false;
}

function alignUp(value: bigint, to: bigint): bigint {
  return ((value + to - 1n) / to) * to;
}

/** The first `name` on the PATH that is a file, or undefined. */
function onPath(name: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    try {
      if (dir && statSync(join(dir, name)).isFile()) return join(dir, name);
    } catch {
      // not here
    }
  }
  return undefined;
}

export interface SeaResult {
  path: string;
  bytes: number;
  /** Whether the Node.js binary in it had its symbols and debug information stripped (needs binutils' strip). */
  stripped: boolean;
}

/**
 * Makes `output`, a copy of this Node.js that runs `mainCjs` (one
 * self-contained CommonJS file) instead of its usual command line. Startup
 * code cache is included. Throws with the reason when seaSupport() objects.
 */
export function buildSea(mainCjs: string, output: string, options: { nodeBinary?: string } = {}): SeaResult {
  const nodeBinary = options.nodeBinary ?? process.execPath;
  const unsupported = seaSupport(nodeBinary);
  if (unsupported) throw new Error(unsupported);
  const work = mkdtempSync(join(tmpdir(), 'metalcast-sea-'));
  try {
    const blob = join(work, 'sea.blob');
    const config = join(work, 'sea-config.json');
    writeFileSync(
      config,
      JSON.stringify({ main: mainCjs, output: blob, disableExperimentalSEAWarning: true, useCodeCache: true, useSnapshot: false }),
    );
    const prepared = spawnSync(nodeBinary, ['--experimental-sea-config', config], { encoding: 'utf8' });
    if (prepared.status !== 0) throw new Error(`node --experimental-sea-config failed: ${prepared.stderr || prepared.stdout}`);

    // A ramdisk has no use for the debug information, which is most of an unstripped binary.
    const copy = join(work, 'node');
    copyFileSync(nodeBinary, copy);
    const strip = onPath('strip');
    let stripped = false;
    if (strip) {
      execFileSync(strip, ['--strip-all', copy]);
      stripped = true;
    }
    const injected = injectSeaBlob(readFileSync(copy), readFileSync(blob));
    writeFileSync(output, injected);
    chmodSync(output, 0o755);
    return { path: output, bytes: injected.length, stripped };
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}
