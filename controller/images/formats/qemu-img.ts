import { execFile } from 'node:child_process';
import { UnsafeQcow2Error } from './qcow2-header.js';

/**
 * Debian's qemu-img (package qemu-utils), run the way OpenStack runs it on
 * images it did not make: the format always given explicitly (never
 * probed), and under prlimit (util-linux) with a CPU-time and an
 * address-space limit, so that a hostile image cannot make it spin or
 * allocate without end.
 */

const GIB = 1024 ** 3;

export interface ProcessLimits {
  /** RLIMIT_CPU: the process is killed after this much CPU time. */
  cpuSeconds: number;
  /** RLIMIT_AS: the most virtual memory the process may map. */
  addressSpaceBytes: number;
}

/** What OpenStack (nova, glance, cinder) allows `qemu-img info`: 30 s of CPU, 1 GiB of address space. */
export const INFO_LIMITS: ProcessLimits = { cpuSeconds: 30, addressSpaceBytes: 1 * GIB };
/** `qemu-img map` walks metadata only. */
export const MAP_LIMITS: ProcessLimits = { cpuSeconds: 60, addressSpaceBytes: 1 * GIB };

/** Limits for converting an image of this virtual size: decompressing costs CPU in proportion to the data. */
export function convertLimits(virtualSize: number): ProcessLimits {
  return { cpuSeconds: 120 + Math.ceil((virtualSize / GIB) * 20), addressSpaceBytes: 2 * GIB };
}

/** qemu-img or prlimit is missing: the controller host needs a package. */
export class ImageToolMissingError extends Error {
  override name = 'ImageToolMissingError';
}

/** qemu-img failed, was killed at its limits, or answered what we cannot use. */
export class QemuImgError extends Error {
  override name = 'QemuImgError';
}

export interface QemuImgOptions {
  /** Default 'qemu-img' on the PATH. */
  binary?: string;
  signal?: AbortSignal;
  /** Run below normal priority (conversions), so that serving images and heartbeats come first. */
  nice?: boolean;
  /** Wall-clock bound besides the CPU limit (default 10 min). */
  timeoutMs?: number;
}

/** Runs qemu-img under prlimit; resolves with its stdout. */
export function runQemuImg(args: string[], limits: ProcessLimits, options: QemuImgOptions = {}): Promise<string> {
  const binary = options.binary ?? 'qemu-img';
  const command = [
    `--cpu=${limits.cpuSeconds}`,
    `--as=${limits.addressSpaceBytes}`,
    '--',
    ...(options.nice ? ['nice', '-n', '10'] : []),
    binary,
    ...args,
  ];
  return new Promise((resolve, reject) => {
    execFile(
      'prlimit',
      command,
      { signal: options.signal, timeout: options.timeoutMs ?? 600_000, maxBuffer: 256 * 1024 * 1024, encoding: 'utf8' },
      (error, stdout, stderr) => {
        if (!error) return resolve(stdout);
        const failure = error as NodeJS.ErrnoException & { signal?: string; killed?: boolean; code?: string | number };
        if (failure.code === 'ENOENT') {
          return reject(new ImageToolMissingError('prlimit is not installed on the controller (Debian package util-linux)'));
        }
        if (options.signal?.aborted) return reject(options.signal.reason ?? error);
        const text = stderr.trim();
        if ((failure.code as unknown) === 127 || (/failed to execute/i.test(text) && text.includes(binary))) {
          return reject(new ImageToolMissingError(`${binary} is not installed on the controller: apt-get install -y qemu-utils`));
        }
        if (failure.signal === 'SIGXCPU' || failure.signal === 'SIGKILL' || /killed/i.test(String(failure.signal))) {
          return reject(
            new QemuImgError(
              `qemu-img ${args[0]} was stopped at its limit of ${limits.cpuSeconds} s of CPU time (the image is too large or malformed)`,
            ),
          );
        }
        if (failure.killed)
          return reject(new QemuImgError(`qemu-img ${args[0]} took longer than ${(options.timeoutMs ?? 600_000) / 1000} s`));
        const first = text.split('\n').find((line) => line.trim() !== '') ?? `exit code ${String(failure.code)}`;
        reject(new QemuImgError(first.replace(/^qemu-img: /, '')));
      },
    );
  });
}

/** What `qemu-img info --output=json` says about a qcow2 file, checked. */
export interface Qcow2Info {
  virtualSize: number;
  /** Bytes the file takes on the controller's disk. */
  actualSize: number;
  clusterSize: number;
  /** "0.10" (version 2) or "1.1" (version 3). */
  compat: string;
}

interface InfoJson {
  'virtual-size'?: number;
  format?: string;
  'actual-size'?: number;
  'cluster-size'?: number;
  encrypted?: boolean;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  'format-specific'?: { type?: string; data?: { compat?: string; 'data-file'?: string; 'data-file-raw'?: boolean; corrupt?: boolean } };
}

/**
 * `qemu-img info --output=json -f qcow2` under {@link INFO_LIMITS}, and the
 * same refusals as the header check, from what QEMU itself parsed: a
 * backing file, a data file, encryption, a corrupt image, an oversize one.
 */
export async function inspectQcow2(path: string, maxVirtualSize: number, options: QemuImgOptions = {}): Promise<Qcow2Info> {
  let out: string;
  try {
    out = await runQemuImg(['info', '--output=json', '-f', 'qcow2', path], INFO_LIMITS, options);
  } catch (error) {
    if (error instanceof QemuImgError) throw new UnsafeQcow2Error(`qemu-img cannot read the qcow2 header: ${error.message}`);
    throw error;
  }
  let info: InfoJson;
  try {
    info = JSON.parse(out) as InfoJson;
  } catch {
    throw new QemuImgError('qemu-img info did not answer JSON');
  }
  const data = info['format-specific']?.data ?? {};
  if (info.format !== 'qcow2') throw new UnsafeQcow2Error(`qemu-img reads the file as ${info.format}, not qcow2`);
  if (info['backing-filename'] !== undefined || info['full-backing-filename'] !== undefined) {
    throw new UnsafeQcow2Error(
      'the qcow2 image has a backing file, and is refused; flatten it first (qemu-img convert -O qcow2 overlay.qcow2 flat.qcow2)',
    );
  }
  if (data['data-file'] !== undefined) {
    throw new UnsafeQcow2Error(
      'the qcow2 image keeps its data in an external data file, and is refused; convert it into a self-contained image first',
    );
  }
  if (info.encrypted) throw new UnsafeQcow2Error('the qcow2 image is encrypted; upload the plain image');
  if (data.corrupt)
    throw new UnsafeQcow2Error('qemu-img reports the qcow2 image as corrupt; repair it (qemu-img check -r all) or export it again');
  const virtualSize = info['virtual-size'];
  if (typeof virtualSize !== 'number' || !Number.isSafeInteger(virtualSize) || virtualSize <= 0) {
    throw new UnsafeQcow2Error(`qemu-img reports an unusable virtual size (${String(virtualSize)})`);
  }
  if (virtualSize > maxVirtualSize) {
    throw new UnsafeQcow2Error(
      `the qcow2 image's virtual size is ${virtualSize} bytes, more than this controller accepts (--max-image-virtual-size, ${maxVirtualSize} bytes)`,
    );
  }
  return { virtualSize, actualSize: info['actual-size'] ?? 0, clusterSize: info['cluster-size'] ?? 0, compat: data.compat ?? '' };
}

/** qcow2 to a sparse raw file (-S 4k: runs of zeros of 4 KiB and more become holes), under {@link convertLimits}. */
export async function convertQcow2ToRaw(source: string, target: string, virtualSize: number, options: QemuImgOptions = {}): Promise<void> {
  await runQemuImg(['convert', '-f', 'qcow2', '-O', 'raw', '-S', '4k', source, target], convertLimits(virtualSize), {
    ...options,
    nice: true,
    timeoutMs: options.timeoutMs ?? 60 * 60_000,
  });
}

/** [offset, length] of a byte range, in bytes. */
export type Extent = [number, number];

interface MapEntry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

/**
 * The ranges of a raw file that hold data, from `qemu-img map
 * --output=json -f raw` (which asks the file system for its holes);
 * adjacent ranges are merged. Everything outside them reads as zeros.
 */
export async function allocatedExtents(rawPath: string, options: QemuImgOptions = {}): Promise<Extent[]> {
  const out = await runQemuImg(['map', '--output=json', '-f', 'raw', rawPath], MAP_LIMITS, options);
  let entries: MapEntry[];
  try {
    entries = JSON.parse(out) as MapEntry[];
  } catch {
    throw new QemuImgError('qemu-img map did not answer JSON');
  }
  const extents: Extent[] = [];
  for (const entry of entries) {
    if (!entry.data || entry.zero) continue;
    const last = extents.at(-1);
    if (last && last[0] + last[1] === entry.start) last[1] += entry.length;
    else extents.push([entry.start, entry.length]);
  }
  return extents;
}
