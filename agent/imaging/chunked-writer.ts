import { createHash } from 'node:crypto';
import type { FileHandle } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { ClientError, Status } from 'nice-grpc';
import {
  allZero,
  type ChunkManifest,
  checkManifest,
  chunkCount,
  chunkDigest,
  chunkRange,
  DIGEST_BYTES,
} from '../../common/chunk-manifest.js';
import { describeError as describe } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type { StatImageResponse } from '../../gen/metalcast/v1/agent_gateway.js';
import type { CommandProgress, WriteImageResult } from '../../gen/metalcast/v1/command.js';
import type { ImageSource } from './image-source.js';
import {
  DiskWriteError,
  FATAL_CODES,
  guardedCall,
  hashRange,
  isDiskError,
  RateMeter,
  type WriteImageOptions,
  type WriteImageTarget,
  WRITES_IN_FLIGHT,
  withRetries,
} from './disk-io.js';
import { AlignedBlocks, DirectWriter } from '../../common/disk-writes/direct-writes.js';
import { fetchInLanes, segmentCount } from './lanes/fetch-lanes.js';
import { type FetchRange, type PartialChunk, type RangeReceiver, receiveRange } from './lanes/receive-range.js';

/**
 * A chunk that fails verification this many times fails the deploy: one bad
 * chunk is a flipped bit on the way, the same chunk bad three times is a
 * controller whose copy is broken, and fetching it forever would hide that.
 */
export const MAX_CHUNK_FAILURES = 3;

/**
 * write_image against the image's chunk manifest (docs/chunk-manifest.md):
 *
 * 1. fetch the manifest and check it against the root digest StatImage announced;
 * 2. delta: read and hash the chunks the disk already holds (within the image's
 *    length) and keep those that match; all-zero chunks are written locally;
 * 3. fetch the rest in ranges of consecutive chunks, verify each chunk as it
 *    lands, and fetch again only a chunk that fails; a broken or stalled call
 *    resumes at the first byte not yet received, as the stream writer does.
 *
 * Every chunk on the disk is then proven by its sha256, and the manifest's
 * root ties those to the image whose sha256 the controller verified in the
 * same pass that built the manifest: so the whole-image sha256 is derived,
 * not re-read from the disk (the doc gives the argument). An agent restarted
 * mid-deploy, or a controller that restarted under it, resumes through the
 * same scan: what is on the disk is re-verified, never trusted.
 */
export async function writeImageByChunks(
  source: ImageSource,
  target: WriteImageTarget,
  options: WriteImageOptions,
  report: (progress: Partial<CommandProgress>) => void,
  signal: AbortSignal,
  logger: Logger,
  stat: StatImageResponse,
): Promise<WriteImageResult> {
  const started = Date.now();
  const size = stat.sizeBytes;
  // The start line, as the stream writer's: the benchmarks time a write from it to 'image written and verified'.
  logger.info(
    { image: target.image, device: target.devicePath, size, diskIsZeroed: options.diskIsZeroed },
    'writing image chunk by chunk: the manifest, then the chunks the disk does not already hold',
  );
  const manifest = await withRetries(() => fetchManifest(source, stat, signal), source, options, signal, logger, 'GetImageManifest');
  const count = chunkCount(size, manifest.chunkSize);
  const zeroDigestOf = zeroDigests();
  /** Sound zero test: the digest, which the root covers, not the bitmap, which it does not. */
  const isZero = (index: number) => chunkDigest(manifest, index).equals(zeroDigestOf(chunkRange(manifest, index).length));
  const done = new Uint8Array(count);
  const failures = new Map<number, number>();
  const partial = new Map<number, PartialChunk>();
  const rate = new RateMeter();
  let skipped = 0;
  let fetched = 0;
  let refetched = 0;
  let bytesSkipped = 0;
  let resumes = 0;
  let doneBytes = 0;
  let fromPeers = 0;
  let fromController = 0;
  const progress = (phase: string, extra: Partial<CommandProgress> = {}) =>
    report({
      phase,
      doneBytes,
      totalBytes: size,
      resumes,
      chunksTotal: count,
      chunksSkipped: skipped,
      chunksFetched: fetched,
      chunksRefetched: refetched,
      bytesFromPeers: fromPeers,
      bytesFromController: fromController,
      ...extra,
    });

  // Buffers for received chunks, used again once written; 4 MiB holds a chunk message of the default size.
  // Page-aligned, so that writes can bypass the page cache (common/disk-writes/direct-writes.ts).
  const blocks = new AlignedBlocks(WRITES_IN_FLIGHT + 1, 4 * 1024 * 1024);
  const writer = await DirectWriter.open(target.devicePath, blocks).catch((error: unknown) => {
    throw new Error(`opening ${target.devicePath} to write image '${target.image}' failed: ${describe(error)}`);
  });
  const device = writer.file;
  try {
    // 2. What the disk already holds.
    if (options.diskIsZeroed) {
      for (let index = 0; index < count; index++) {
        if (!isZero(index)) continue;
        done[index] = 1;
        skipped++;
        bytesSkipped += chunkRange(manifest, index).length;
      }
      doneBytes = bytesSkipped;
    } else {
      // A regular file with no blocks allocated (a new sparse disk image) reads as zeros: only the image's zero
      // chunks can match, so only those are read. Sound whatever st_blocks says: a chunk not read is fetched.
      const blank = await holdsNoData(device);
      if (blank) logger.info({ device: target.devicePath }, 'the target is a file with no data blocks: scanning only the zero chunks');
      const read = blank ? isZero : () => true;
      await scanDisk(device, manifest, signal, zeroDigestOf, read, (index, digest) => {
        const length = chunkRange(manifest, index).length;
        if (digest.equals(chunkDigest(manifest, index))) {
          done[index] = 1;
          skipped++;
          bytesSkipped += length;
          doneBytes += length;
        }
        progress('scanning', { doneBytes: Math.min(size, (index + 1) * manifest.chunkSize) });
      });
    }
    // All-zero chunks the disk lacks need no transfer: the manifest says what they hold.
    for (let index = 0; index < count; index++) {
      if (done[index] || !isZero(index)) continue;
      const { offset, length } = chunkRange(manifest, index);
      await writer.write(blocks.zeros(length), offset).catch((error: unknown) => {
        throw new Error(`writing ${target.devicePath} failed at ${offset} of ${size} bytes (zeroing): ${describe(error)}`);
      });
      done[index] = 1;
      fetched++;
      doneBytes += length;
    }
    logger.info(
      { image: target.image, chunks: count, chunkSize: manifest.chunkSize, skipped, bytesSkipped, zeroWritten: fetched },
      skipped > 0 ? 'the disk already holds some chunks of the image; fetching only the others' : 'fetching every chunk of the image',
    );

    // Fan-out (docs/fanout.md): peers of the deploy wave first, the controller for what no peer has; the loop below does the rest.
    if (options.fanout && source.exchange) {
      await options.fanout.fetch({
        image: target.image,
        devicePath: target.devicePath,
        manifest,
        done,
        device,
        source,
        signal,
        logger,
        stallTimeoutMs: options.stallTimeoutMs,
        maxAttempts: options.maxAttempts,
        onChunk: (_index, bytes, from) => {
          fetched++;
          doneBytes += bytes;
          if (from === 'peer') fromPeers += bytes;
          else fromController += bytes;
          rate.add(bytes);
          progress('writing', { rateBytesPerSecond: rate.perSecond(), etaSeconds: rate.eta(size - doneBytes) });
        },
      });
    }

    // 3. Fetch, verify, fetch again what failed.
    let attempts = 0;
    let fruitless = 0;
    let lastError = '';
    let receivedTotal = 0;
    const remaining = () => done.reduce((n, d) => n + (d ? 0 : 1), 0);
    while (remaining() > 0) {
      attempts++;
      const receivedBefore = receivedTotal;
      let failedThisPass = 0;
      const onReceived = (length: number) => {
        receivedTotal += length;
        fromController += length;
        rate.add(length);
        progress('writing', { rateBytesPerSecond: rate.perSecond(), etaSeconds: rate.eta(size - doneBytes) });
      };
      const judge = (index: number, ok: boolean, digest: Buffer) => {
        if (done[index]) return;
        if (ok) {
          done[index] = 1;
          fetched++;
          doneBytes += chunkRange(manifest, index).length;
          return;
        }
        const chunk = chunkRange(manifest, index);
        const failed = (failures.get(index) ?? 0) + 1;
        failures.set(index, failed);
        refetched++;
        failedThisPass++;
        logger.warn(
          { chunk: index, offset: chunk.offset, length: chunk.length, failures: failed },
          'a chunk failed verification against the manifest; fetching it again',
        );
        if (failed >= MAX_CHUNK_FAILURES) {
          throw new ChunkVerificationError(
            `chunk ${index} (bytes ${chunk.offset}-${chunk.offset + chunk.length - 1}) failed verification ${failed} times: it hashes to ${digest.toString('hex')}, the manifest says ${chunkDigest(manifest, index).toString('hex')}; the controller's copy of image '${target.image}' or the path to it corrupts data`,
          );
        }
      };
      try {
        const ranges = rangesToFetch(manifest, done, partial);
        // Asked at every pass: a connection error may have moved the agent to the next controller address.
        const lanes = source.lanes?.();
        const laneCount = lanes ? Math.min(options.streams, segmentCount(ranges, manifest.chunkSize)) : 1;
        if (lanes && laneCount > 1) {
          // Several connections, each on its own thread (agent/imaging/lanes): a chunk begun in an earlier
          // pass is fetched whole, as the lanes keep no partial hashes across calls.
          partial.clear();
          if (attempts === 1) logger.info({ streams: laneCount }, 'fetching over several connections at once, each on its own thread');
          const failure = await fetchInLanes({
            endpoint: lanes.endpoint,
            metadata: lanes.metadata,
            lanes: laneCount,
            image: target.image,
            devicePath: target.devicePath,
            manifest,
            stallTimeoutMs: options.stallTimeoutMs,
            ranges: rangesToFetch(manifest, done, partial),
            signal,
            logger,
            onReceived,
            onChunk: judge,
          });
          if (failure !== undefined) throw failure;
        } else {
          await fetchOnThisThread(
            source,
            target.image,
            ranges,
            { manifest, blocks, partial, write: (data, position) => writer.write(data, position) },
            options,
            signal,
            onReceived,
            judge,
          );
        }
      } catch (error) {
        const where = `${doneBytes} of ${size} bytes`;
        if (signal.aborted) throw new Error(`write_image cancelled at ${where}: the agent is stopping`);
        if (error instanceof DiskWriteError) throw new Error(`writing ${target.devicePath} failed at ${where}: ${error.message}`);
        if (error instanceof ChunkVerificationError) throw error;
        if (error instanceof ClientError && FATAL_CODES.has(error.code)) {
          throw new Error(`the controller refused the image read (${Status[error.code]}: ${error.details}) at ${where}`);
        }
        if (isDiskError(error)) throw new Error(`writing ${target.devicePath} failed at ${where}: ${(error as Error).message}`);
        source.failed(error);
        lastError = describe(error);
      }
      if (remaining() === 0) break;
      // A pass that ended cleanly with chunks to fetch again is no interruption: go again at once.
      if (lastError === '' && failedThisPass > 0) continue;
      const where = `${doneBytes} of ${size} bytes (${((100 * doneBytes) / size).toFixed(1)}%)`;
      fruitless = receivedTotal > receivedBefore ? 1 : fruitless + 1;
      if (fruitless >= options.maxAttempts) {
        throw new Error(
          `gave up after ${fruitless} attempts in a row without progress (${attempts} in all) at ${where}; last error: ${lastError}`,
        );
      }
      if (options.timeLimitMs > 0 && Date.now() - started >= options.timeLimitMs) {
        throw new Error(`time limit of ${options.timeLimitMs / 1000}s reached at ${where}; last error: ${lastError}`);
      }
      resumes++;
      const delay = Math.min(options.backoffMaxMs, options.backoffBaseMs * 2 ** (fruitless - 1)) * (0.5 + Math.random());
      logger.warn(
        { done: doneBytes, size, resumes, delayMs: Math.round(delay), reason: lastError },
        'image transfer interrupted; resuming from the last written offset',
      );
      lastError = '';
      progress('resuming');
      await sleep(delay, undefined, { signal }).catch(() => {});
      if (signal.aborted) throw new Error(`write_image cancelled at ${doneBytes} of ${size} bytes: the agent is stopping`);
    }

    progress('flushing', { doneBytes: size });
    await device.sync().catch((error: unknown) => {
      throw new Error(`flushing ${target.devicePath} failed after writing ${size} bytes: ${describe(error)}`);
    });
    if (options.verifyReadback) {
      progress('verifying', { doneBytes: 0 });
      const readBack = await hashRange(device, size, (read) => progress('verifying', { doneBytes: read }));
      if (readBack !== stat.sha256)
        throw new Error(`read-back verification failed: ${target.devicePath} hashes to ${readBack}, the image to ${stat.sha256}`);
    }
    logger.info(
      { size, resumes, skipped, fetched, refetched, bytesSkipped, fromPeers, fromController, seconds: (Date.now() - started) / 1000 },
      'image written and verified chunk by chunk',
    );
    return {
      devicePath: target.devicePath,
      writtenBytes: size,
      // Derived, not re-read: every chunk matched the root-checked manifest (docs/chunk-manifest.md).
      sha256: stat.sha256,
      resumes,
      bytesReceivedTwice: 0,
      chunksSkipped: skipped,
      chunksFetched: fetched,
      chunksRefetched: refetched,
      bytesSkipped,
      bytesFromPeers: fromPeers,
      bytesFromController: fromController,
    };
  } finally {
    // A device that failed or vanished may fail its close too; that must not hide the error that ended the write.
    await writer
      .close()
      .catch((error: unknown) => logger.warn({ err: error, device: target.devicePath }, 'closing the target disk failed'));
  }
}

class ChunkVerificationError extends Error {
  override name = 'ChunkVerificationError';
}

/** One pass over one connection on the agent's own thread: a guarded ReadImage call per range (disk-io.ts). */
async function fetchOnThisThread(
  source: ImageSource,
  image: string,
  ranges: FetchRange[],
  on: Pick<RangeReceiver, 'manifest' | 'blocks' | 'partial' | 'write'>,
  options: WriteImageOptions,
  signal: AbortSignal,
  onReceived: (bytes: number) => void,
  judge: RangeReceiver['onChunk'],
): Promise<void> {
  await guardedCall(signal, options.stallTimeoutMs, async (call) => {
    for (const range of ranges) {
      await receiveRange(source.read(image, range.offset, call.signal, range.end - range.offset), range, {
        ...on,
        writes: call.writes,
        onMessage: (bytes) => {
          call.alive();
          onReceived(bytes);
        },
        onChunk: judge,
      });
      await call.writes.all();
    }
  });
}

/**
 * The ranges of consecutive chunks not yet held. A chunk whose transfer
 * broke after some of its bytes were written and hashed resumes at its next
 * byte, so a fault costs what was in flight, not a whole chunk.
 */
export function rangesToFetch(manifest: ChunkManifest, done: Uint8Array, partial: Map<number, PartialChunk>): FetchRange[] {
  const ranges: FetchRange[] = [];
  for (let index = 0; index < done.length; index++) {
    if (done[index]) continue;
    const { offset, length } = chunkRange(manifest, index);
    const last = ranges.at(-1);
    if (last && last.end === offset) {
      last.end = offset + length;
      partial.delete(index); // fetched again from its start, inside the range
    } else {
      ranges.push({ offset: offset + (partial.get(index)?.received ?? 0), end: offset + length });
    }
  }
  return ranges;
}

/** The manifest in pages, checked against the root digest StatImage announced. */
async function fetchManifest(source: ImageSource, stat: StatImageResponse, signal: AbortSignal): Promise<ChunkManifest> {
  const count = stat.manifestChunkCount;
  if (chunkCount(stat.sizeBytes, stat.manifestChunkSizeBytes) !== count) {
    throw new Error(
      `the controller announced ${count} chunks of ${stat.manifestChunkSizeBytes} bytes for an image of ${stat.sizeBytes} bytes`,
    );
  }
  const digests = Buffer.alloc(count * DIGEST_BYTES);
  let next = 0;
  for await (const page of (source.manifest as NonNullable<ImageSource['manifest']>)(stat.image, 0, signal)) {
    const chunks = page.chunkSha256s.length / DIGEST_BYTES;
    if (page.firstChunk !== next || !Number.isInteger(chunks) || next + chunks > count) {
      throw new Error(`the controller sent a manifest page at chunk ${page.firstChunk} of ${chunks} chunks where ${next} was expected`);
    }
    digests.set(page.chunkSha256s, next * DIGEST_BYTES);
    next += chunks;
  }
  if (next !== count) throw new Error(`the manifest ended at chunk ${next} of ${count}`);
  const manifest: ChunkManifest = {
    chunkSize: stat.manifestChunkSizeBytes,
    sizeBytes: stat.sizeBytes,
    digests,
    // Zero chunks are told by their digest (zeroDigests): the bitmap is not covered by the root.
    zeroBitmap: Buffer.alloc(0),
    rootSha256: stat.manifestRootSha256,
  };
  checkManifest(manifest, stat.manifestRootSha256);
  return manifest;
}

/** sha256 of an all-zero chunk of a given length (the full size and the last chunk's). */
function zeroDigests(): (length: number) => Buffer {
  const cache = new Map<number, Buffer>();
  return (length) => {
    let digest = cache.get(length);
    if (!digest) {
      digest = createHash('sha256').update(Buffer.alloc(length)).digest();
      cache.set(length, digest);
    }
    return digest;
  };
}

/** True for a regular file with no data blocks allocated: it reads as zeros (st_blocks is 0 for block devices too, hence isFile). */
async function holdsNoData(device: FileHandle): Promise<boolean> {
  const stats = await device.stat().catch(() => undefined);
  return stats?.isFile() === true && stats.blocks === 0 && stats.size > 0;
}

/**
 * Reads and hashes the disk's chunks within the image's length for which
 * `read` is true, two reads in flight so that the disk and the hashing
 * overlap; memory: two chunks. Chunks not read are not reported.
 */
async function scanDisk(
  device: FileHandle,
  manifest: ChunkManifest,
  signal: AbortSignal,
  zeroDigestOf: (length: number) => Buffer,
  read: (index: number) => boolean,
  onChunk: (index: number, digest: Buffer) => void,
): Promise<void> {
  const indexes: number[] = [];
  for (let index = 0; index < chunkCount(manifest.sizeBytes, manifest.chunkSize); index++) if (read(index)) indexes.push(index);
  const buffers = [Buffer.allocUnsafe(manifest.chunkSize), Buffer.allocUnsafe(manifest.chunkSize)];
  const readChunk = async (nth: number): Promise<Buffer> => {
    const { offset, length } = chunkRange(manifest, indexes[nth] as number);
    const buffer = (buffers[nth % 2] as Buffer).subarray(0, length);
    let got = 0;
    while (got < length) {
      const { bytesRead } = await device.read(buffer, got, length - got, offset + got);
      if (bytesRead === 0) break; // a short device reads as a mismatch: the chunk is fetched
      got += bytesRead;
    }
    return got === length ? buffer : Buffer.alloc(0);
  };
  const count = indexes.length;
  let pending = count > 0 ? readChunk(0) : undefined;
  for (let nth = 0; nth < count; nth++) {
    signal.throwIfAborted();
    const data = await (pending as Promise<Buffer>);
    const index = indexes[nth] as number;
    // The next read goes into the other buffer while this one is hashed.
    pending = nth + 1 < count ? readChunk(nth + 1) : undefined;
    pending?.catch(() => {});
    // A chunk of zeros on the disk (a fresh or cleaned disk is mostly that) is told by a memcmp, no hash:
    // it matches exactly the chunks whose digest is that of zeros.
    onChunk(
      index,
      data.length === 0
        ? Buffer.alloc(DIGEST_BYTES)
        : allZero(data)
          ? zeroDigestOf(data.length)
          : createHash('sha256').update(data).digest(),
    );
  }
}
