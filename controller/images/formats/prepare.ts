import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { open, rm } from 'node:fs/promises';
import { Status } from 'nice-grpc-common';
import type { ChunkManifest } from '../../../common/chunk-manifest.js';
import { MetalcastError } from '../../../common/errors.js';
import { DETECT_HEAD_BYTES, DETECT_TAIL_BYTES, detectFormat, type ImageFormat, UnsupportedFormatError } from './detect.js';
import { checkQcow2Header, UnsafeQcow2Error } from './qcow2-header.js';
import { allocatedExtents, convertQcow2ToRaw, type Extent, ImageToolMissingError, inspectQcow2, QemuImgError } from './qemu-img.js';

/**
 * What an image was when it arrived and where its data lies, recorded with
 * the image: nodes always receive the raw form, whose sha256 and size are
 * the image's own.
 */
export interface ImageFormatInfo {
  /** The format of the file as uploaded or imported. */
  format: ImageFormat;
  /** sha256 and size of the file as uploaded or imported (the qcow2 itself); for raw, those of the image. */
  sourceSha256: string;
  sourceSizeBytes: number;
  /** The ranges of the raw image that hold data, sorted; everything else is zeros. */
  extents: Extent[];
  /** Sum of the extents' lengths. */
  allocatedBytes: number;
}

export interface PreparedImage {
  /** The raw file to keep: the received file itself for raw, a new file for qcow2. */
  path: string;
  sha256: string;
  sizeBytes: number;
  info: ImageFormatInfo;
  /** The chunk manifest of the raw file, when one was built (controller/images/manifest/build.ts). */
  manifest?: ChunkManifest;
}

export interface PrepareOptions {
  /** Largest virtual size of a qcow2 image (--max-image-virtual-size). */
  maxVirtualSize: number;
  /** A fresh path beside the received file, for the raw output of a conversion. */
  tempPath: () => string;
  signal?: AbortSignal;
  /** Default qemu-img on the PATH. */
  qemuImg?: string;
}

/** More extents than this are coalesced over their smallest gaps (a gap then travels as data): the list stays small enough for the image row. */
export const MAX_EXTENTS = 65_536;

const refused = (message: string) => new MetalcastError(Status.INVALID_ARGUMENT, message);

/**
 * Turns a received file into what the image store keeps: detects its
 * format from its content; for qcow2, checks the header (no backing file,
 * no external data file, no encryption, not corrupt, virtual size within
 * the limit), asks `qemu-img info` the same under prlimit, converts it to a
 * sparse raw file with `qemu-img convert`, punches holes where that holds
 * zeros (`fallocate --dig-holes`) and hashes it; a raw file is kept as it
 * is (ImageFiles.receive left its zero blocks holes as they arrived:
 * controller/images/blob-writer.ts). Either way the allocated extents come
 * from `qemu-img map`. Throws MetalcastError:
 * INVALID_ARGUMENT for content that is refused, FAILED_PRECONDITION when
 * the controller lacks a tool.
 */
export async function prepareImage(
  path: string,
  source: { sha256: string; sizeBytes: number },
  options: PrepareOptions,
): Promise<PreparedImage> {
  const { head, tail } = await readEnds(path, source.sizeBytes);
  let format: ImageFormat;
  try {
    format = detectFormat(head, tail);
  } catch (error) {
    if (error instanceof UnsupportedFormatError) throw refused(error.message);
    throw error;
  }
  const tool = { binary: options.qemuImg, signal: options.signal };
  try {
    if (format === 'raw') {
      // Received with its zero blocks left as holes (blob-writer.ts): there is nothing to dig.
      const extents = limitExtents(await allocatedExtents(path, tool));
      return {
        path,
        sha256: source.sha256,
        sizeBytes: source.sizeBytes,
        info: { format, sourceSha256: source.sha256, sourceSizeBytes: source.sizeBytes, ...summed(extents) },
      };
    }
    const header = checkQcow2Header(head, options.maxVirtualSize);
    const info = await inspectQcow2(path, options.maxVirtualSize, tool);
    if (info.virtualSize !== header.virtualSize) {
      throw new UnsafeQcow2Error(`the qcow2 header says ${header.virtualSize} bytes, qemu-img ${info.virtualSize}: the header is corrupt`);
    }
    const raw = options.tempPath();
    try {
      await convertQcow2ToRaw(path, raw, info.virtualSize, tool);
      // qemu-img allocates the first block of a new raw file whatever it holds; a hole it is if it holds zeros.
      await digHoles(raw, options.signal);
      await fsync(raw);
      const sha256 = await sha256File(raw, options.signal);
      const extents = limitExtents(await allocatedExtents(raw, tool));
      return {
        path: raw,
        sha256,
        sizeBytes: info.virtualSize,
        info: { format, sourceSha256: source.sha256, sourceSizeBytes: source.sizeBytes, ...summed(extents) },
      };
    } catch (error) {
      await rm(raw, { force: true });
      throw error;
    }
  } catch (error) {
    if (error instanceof UnsafeQcow2Error) throw refused(`qcow2 image refused: ${error.message}`);
    if (error instanceof QemuImgError) throw refused(`the ${format} image cannot be read: ${error.message}`);
    if (error instanceof ImageToolMissingError) throw new MetalcastError(Status.FAILED_PRECONDITION, error.message);
    throw error;
  }
}

/** The ranges and their total. */
function summed(extents: Extent[]): { extents: Extent[]; allocatedBytes: number } {
  return { extents, allocatedBytes: extents.reduce((sum, [, length]) => sum + length, 0) };
}

/** At most {@link MAX_EXTENTS}: the smallest gaps are filled first (what was a hole then counts as data, never the reverse). */
export function limitExtents(extents: Extent[], max = MAX_EXTENTS): Extent[] {
  let current = extents;
  let gap = 4096;
  while (current.length > max) {
    const merged: Extent[] = [];
    for (const [offset, length] of current) {
      const last = merged.at(-1);
      if (last && offset - (last[0] + last[1]) <= gap) last[1] = offset + length - last[0];
      else merged.push([offset, length]);
    }
    current = merged;
    gap *= 2;
  }
  return current;
}

async function readEnds(path: string, size: number): Promise<{ head: Buffer; tail: Buffer }> {
  const file = await open(path, 'r');
  try {
    const head = Buffer.alloc(Math.min(DETECT_HEAD_BYTES, size));
    await file.read(head, 0, head.length, 0);
    const tail = Buffer.alloc(Math.min(DETECT_TAIL_BYTES, size));
    await file.read(tail, 0, tail.length, size - tail.length);
    return { head, tail };
  } finally {
    await file.close();
  }
}

/** util-linux's fallocate --dig-holes: blocks of zeros become holes, so the store keeps (and qemu-img map reports) only data. */
function digHoles(path: string, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    // A file system without hole punching keeps the zeros: the extents are then wider, never wrong.
    execFile('fallocate', ['--dig-holes', path], { signal, timeout: 60 * 60_000 }, () => resolve());
  });
}

async function fsync(path: string): Promise<void> {
  const file = await open(path, 'r+');
  try {
    await file.sync();
  } finally {
    await file.close();
  }
}

function sha256File(path: string, signal?: AbortSignal): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    createReadStream(path, { highWaterMark: 4 * 1024 * 1024, signal })
      .on('data', (data) => hash.update(data))
      .on('error', reject)
      .on('end', () => resolve(hash.digest('hex')));
  });
}
