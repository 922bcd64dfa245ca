import { join } from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { open } from 'node:fs/promises';
import type { ChunkManifest } from '../../common/chunk-manifest.js';
import { clientChannelOptions } from '../../common/grpc-options.js';
import type { RunningController } from '../../controller/controller.js';
import { ImageFiles } from '../../controller/images/image-files.js';
import { manifestOfFile } from '../../controller/images/manifest/build.js';
import type { Store } from '../../controller/store/store.js';
import { SqliteStore } from '../../controller/store/sqlite.js';

/**
 * Makes image content that looks like a disk image: random data with
 * all-zero stretches (so the zero-chunk path is exercised), of `size` bytes.
 */
export function makeImageContent(size: number, seed = 1): Buffer {
  const content = randomBytes(size);
  // Zero out every third MiB, like the unused space of a real image.
  const mib = 1024 * 1024;
  for (let at = mib * (seed % 3); at < size; at += 3 * mib) content.fill(0, at, Math.min(size, at + mib));
  return content;
}

export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/**
 * Stores an image in a running controller directly (the upload API has its own tests), with its chunk
 * manifest as an upload would have it (delete it from the store to test an image from before manifests).
 */
export async function addImage(controller: RunningController, name: string, content: Buffer): Promise<{ sha256: string; size: number }> {
  const stored = await controller.imageFiles.receive(
    (async function* () {
      for (let at = 0; at < content.length; at += 1024 * 1024) yield content.subarray(at, at + 1024 * 1024);
    })(),
  );
  const image = await controller.store.createImage({
    name,
    state: 'ready',
    sha256: stored.sha256,
    sizeBytes: stored.sizeBytes,
    sourceUrl: '',
    expectedChecksum: '',
    error: '',
  });
  await controller.manifests.get(image);
  return { sha256: stored.sha256, size: stored.sizeBytes };
}

/** Bytes of `content` in chunk-aligned, all-zero chunks of `chunkSize`: what ReadImage sends as zero markers. */
export function zeroChunkBytes(content: Uint8Array, chunkSize: number): number {
  let zero = 0;
  for (let at = 0; at < content.length; at += chunkSize) {
    const chunk = content.subarray(at, Math.min(content.length, at + chunkSize));
    if (chunk.every((byte) => byte === 0)) zero += chunk.length;
  }
  return zero;
}

/**
 * How many image bytes one broken transfer may make the controller send
 * again: bytes counted by metalcast_image_bytes_served_total (a chunk is
 * counted when ReadImage yields it) that never reached the writer, because
 * the agent resumes from the last offset it wrote. Derived from the buffers
 * between the two:
 *
 * - controller: grpc-js's response stream is an object-mode Writable with
 *   highWaterMark 16 and nice-grpc awaits 'drain' when write() says so, so at
 *   most 16 yielded messages wait there (transfer-faults.test.ts sees it: a
 *   reader that grants no window gets exactly 16 chunks served);
 * - the wire: HTTP/2 flow control. The agent's channel sets
 *   'grpc-node.flow_control_window' (4 MiB, common/grpc-options.ts) as the
 *   stream's initial window and the connection's window, so at most that
 *   many DATA bytes are unacknowledged: in the controller's socket, the
 *   kernel, a proxy, or the agent's unread HTTP/2 buffers. A data chunk costs
 *   its size plus about 20 bytes of it, a zero chunk only the 20 bytes, so
 *   all of the image's zero chunks can ride along besides the window's worth
 *   of data;
 * - agent: data the agent's HTTP/2 stream has credited back but grpc-js has
 *   not parsed (an Http2Stream's readable highWaterMark is 64 KiB, plus one
 *   16 KiB frame); one message grpc-js holds while paused; and grpc-js's
 *   ClientReadableStream, an object-mode Readable with highWaterMark 16;
 * - the chunk that was partly received when the link broke.
 *
 * So per fault: window + (16 + 1 + 16 + 1) chunks + 80 KiB + zero-chunk bytes.
 */
export function resendAllowancePerFault(chunkSize: number, zeroBytes: number): { bytes: number; explain: string } {
  const window = Number(clientChannelOptions({ timeMs: 1000, timeoutMs: 1000 })['grpc-node.flow_control_window']);
  if (!(window > 0)) throw new Error('the agent channel sets no grpc-node.flow_control_window; the allowance needs one');
  const serverMessages = 16;
  const agentMessages = 1 + 16;
  const partialChunks = 1;
  const http2ReadBuffer = 64 * 1024 + 16 * 1024;
  const chunks = serverMessages + agentMessages + partialChunks;
  return {
    bytes: window + chunks * chunkSize + http2ReadBuffer + zeroBytes,
    explain: `window ${window} + ${chunks} chunks of ${chunkSize} + ${http2ReadBuffer} HTTP/2 read buffer + ${zeroBytes} zero-chunk bytes`,
  };
}

/** The first `size` bytes of a disk file (a fake machine's disk is a sparse 1 GiB file; the rest is not read). */
export async function readDiskStart(path: string, size: number): Promise<Buffer> {
  const file = await open(path, 'r');
  try {
    const buffer = Buffer.alloc(size);
    let done = 0;
    while (done < size) {
      const { bytesRead } = await file.read(buffer, done, size - done, done);
      if (bytesRead === 0) throw new Error(`the disk file ${path} ends at ${done} bytes, before ${size}`);
      done += bytesRead;
    }
    return buffer;
  } finally {
    await file.close();
  }
}

/** The controller's image transfer counters, read from its registry (which a stopped controller keeps). */
export interface ImageTransferCounters {
  /** metalcast_image_bytes_served_total: every chunk ReadImage yielded, zero markers at their length. */
  served: number;
  /** metalcast_image_transfer_resumes_total: ReadImage calls that started past offset 0. */
  resumes: number;
}

export async function imageTransferCounters(controller: RunningController): Promise<ImageTransferCounters> {
  const sum = async (name: string) => {
    const metric = controller.registry.getSingleMetric(name);
    if (!metric) throw new Error(`the controller has no metric ${name}`);
    const { values } = await metric.get();
    return values.reduce((total, sample) => total + sample.value, 0);
  };
  return { served: await sum('metalcast_image_bytes_served_total'), resumes: await sum('metalcast_image_transfer_resumes_total') };
}

/**
 * Seeds an image into a controller's data directory before the controller
 * starts (tests and benchmarks that run the controller as a process; the
 * upload API has its own tests). The image row goes into the data
 * directory's SQLite database, or into `store` when given (PostgreSQL,
 * shared by several controllers). Returns where the blob is.
 */
export async function seedImage(
  dataDir: string,
  name: string,
  content: Iterable<Uint8Array> | AsyncIterable<Uint8Array>,
  store?: Store,
  /** Also stores the chunk manifest, as an upload does (without it, the controller builds it at first use). */
  manifestChunkSize?: number,
): Promise<{ sha256: string; size: number; blob: string }> {
  const stored = await seedImageBlob(dataDir, content, manifestChunkSize);
  const target = store ?? SqliteStore.open(join(dataDir, 'metalcast.db'));
  try {
    if (stored.manifest) await target.putImageManifest(stored.sha256, stored.manifest);
    await target.createImage({
      name,
      state: 'ready',
      sha256: stored.sha256,
      sizeBytes: stored.size,
      sourceUrl: '',
      expectedChecksum: '',
      error: '',
    });
  } finally {
    if (!store) await target.close();
  }
  return stored;
}

/** Puts an image's content (no row) into a controller's data directory. */
export async function seedImageBlob(
  dataDir: string,
  content: Iterable<Uint8Array> | AsyncIterable<Uint8Array>,
  manifestChunkSize?: number,
): Promise<{ sha256: string; size: number; blob: string; manifest?: ChunkManifest }> {
  const files = new ImageFiles(join(dataDir, 'images'));
  await files.init();
  const stored = await files.receive(content);
  const blob = files.blobPath(stored.sha256);
  // Built from the stored file, as the controller builds one at first use (controller/images/manifest/).
  const manifest = manifestChunkSize ? (await manifestOfFile(blob, manifestChunkSize)).manifest : undefined;
  return { sha256: stored.sha256, size: stored.sizeBytes, blob, manifest };
}
