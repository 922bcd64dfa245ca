import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { ClientError, Status } from 'nice-grpc';
import type { Logger } from '../../common/logging.js';
import type { StatImageResponse } from '../../gen/metalcast/v1/agent_gateway.js';
import type { CommandProgress, WriteImageResult } from '../../gen/metalcast/v1/command.js';
import { chunkParts } from '../../common/read-image-codec.js';
import type { ImageSource } from './image-source.js';
import { describeError as describe } from '../../common/errors.js';

import {
  DiskWriteError,
  FATAL_CODES,
  guardedCall,
  hashRange,
  isDiskError,
  RateMeter,
  type WriteImageOptions,
  type WriteImageTarget,
  withRetries,
  writeAllAt,
} from './disk-io.js';
import { writeFully } from '../../common/disk-writes/positional-writes.js';

// What callers of writeImage import from here.
export { DEFAULT_WRITE_OPTIONS, type WriteImageOptions, type WriteImageTarget } from './disk-io.js';

/** StatImage with retries, checked against what the deploy expects: the first step of either writer. */
export async function statImageFor(
  source: ImageSource,
  target: WriteImageTarget,
  options: WriteImageOptions,
  signal: AbortSignal,
  logger: Logger,
): Promise<StatImageResponse> {
  const stat = await withRetries(() => source.stat(target.image, signal), source, options, signal, logger, 'StatImage');
  if (target.expectedSha256 !== '' && stat.sha256 !== target.expectedSha256) {
    throw new Error(`the controller's image '${target.image}' has sha256 ${stat.sha256}, but the deploy expects ${target.expectedSha256}`);
  }
  if (target.expectedSizeBytes !== 0 && stat.sizeBytes !== target.expectedSizeBytes) {
    throw new Error(
      `the controller's image '${target.image}' is ${stat.sizeBytes} bytes, but the deploy expects ${target.expectedSizeBytes}`,
    );
  }
  if (stat.sizeBytes > target.deviceSizeBytes) {
    throw new Error(
      `image '${target.image}' (${stat.sizeBytes} bytes) does not fit on ${target.devicePath} (${target.deviceSizeBytes} bytes)`,
    );
  }
  return stat;
}

/**
 * Streams an image onto a disk: chunks are written at their offsets and
 * hashed in order; a stall or a broken call resumes from the last written
 * offset with jittered backoff; success needs every byte, the right sha256
 * and a flush to the device. Nothing reports success on a short or corrupt
 * write. For images without a chunk manifest (write-image.ts picks).
 */
export async function writeImageStream(
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
  logger.info(
    { image: target.image, device: target.devicePath, size, chunk: stat.chunkSizeBytes },
    options.diskIsZeroed
      ? 'writing image; all-zero chunks are skipped because the disk was erased to zeros'
      : 'writing image; all-zero chunks are written as zeros because the disk may hold old data',
  );

  const device = await open(target.devicePath, 'r+').catch((error: unknown) => {
    throw new Error(`opening ${target.devicePath} to write image '${target.image}' failed: ${describe(error)}`);
  });
  const hash = createHash('sha256');
  const zeros = Buffer.alloc(Math.max(stat.chunkSizeBytes, 1));
  const rate = new RateMeter();
  let offset = 0;
  let attempts = 0;
  let fruitless = 0;
  let resumes = 0;
  let lastError = '';
  try {
    while (offset < size) {
      attempts++;
      const offsetBefore = offset;
      try {
        // Up to WRITES_IN_FLIGHT writes queued while the next chunks are received and hashed, so that one slow
        // write does not stop the stream (memory: that many chunks); a failing one aborts the read at once
        // (guardedCall, disk-io.ts).
        await guardedCall(signal, options.stallTimeoutMs, async (call) => {
          for await (const chunk of source.read(target.image, offset, call.signal)) {
            call.alive();
            // chunkParts, not chunk.data: reading `data` of a chunk received in parts joins them (a copy).
            const parts = chunk.zero ? [] : chunkParts(chunk);
            const length = chunk.zero ? chunk.length : parts.reduce((sum, part) => sum + part.length, 0);
            if (chunk.offset !== offset || length === 0 || offset + length > size || (chunk.zero && length > zeros.length)) {
              throw new Error(`the controller sent a chunk at ${chunk.offset} of ${length} bytes where ${offset} was expected`);
            }
            await call.writes.room();
            if (chunk.zero) {
              hash.update(zeros.subarray(0, length));
              if (!options.diskIsZeroed) call.writes.add(writeFully(device, zeros.subarray(0, length), offset));
            } else {
              // The chunk as received (common/grpc-wire.ts): hashed and written without joining it into one buffer.
              for (const part of parts) hash.update(part);
              call.writes.add(parts.length === 1 ? writeFully(device, parts[0]!, offset) : writeAllAt(device, parts, offset));
            }
            offset += length;
            rate.add(length);
            report({
              phase: 'writing',
              doneBytes: offset,
              totalBytes: size,
              rateBytesPerSecond: rate.perSecond(),
              etaSeconds: rate.eta(size - offset),
              resumes,
            });
          }
          await call.writes.all();
          if (offset < size) throw new Error(`the controller ended the stream at ${offset} of ${size} bytes`);
        });
      } catch (error) {
        if (signal.aborted) throw new Error(`write_image cancelled at ${offset} of ${size} bytes: the agent is stopping`);
        // A write still in flight when the stream broke may have failed too (guardedCall reports that one): its
        // bytes are already counted in offset, so resuming past them would leave a hole that the hash cannot see.
        if (error instanceof DiskWriteError) {
          throw new Error(`writing ${target.devicePath} failed at ${offset} of ${size} bytes: ${error.message}`);
        }
        if (error instanceof ClientError && FATAL_CODES.has(error.code)) {
          throw new Error(`the controller refused the image read (${Status[error.code]}: ${error.details}) at ${offset} of ${size} bytes`);
        }
        if (isDiskError(error))
          throw new Error(`writing ${target.devicePath} failed at ${offset} of ${size} bytes: ${(error as Error).message}`);
        source.failed(error);
        lastError = describe(error);
      }
      if (offset >= size) break;
      const elapsed = Date.now() - started;
      const where = `${offset} of ${size} bytes (${((100 * offset) / size).toFixed(1)}%)`;
      fruitless = offset > offsetBefore ? 1 : fruitless + 1;
      if (fruitless >= options.maxAttempts) {
        throw new Error(
          `gave up after ${fruitless} attempts in a row without progress (${attempts} in all) at ${where}; last error: ${lastError}`,
        );
      }
      if (options.timeLimitMs > 0 && elapsed >= options.timeLimitMs) {
        throw new Error(`time limit of ${options.timeLimitMs / 1000}s reached at ${where}; last error: ${lastError}`);
      }
      resumes++;
      const delay = Math.min(options.backoffMaxMs, options.backoffBaseMs * 2 ** (fruitless - 1)) * (0.5 + Math.random());
      logger.warn(
        { offset, size, resumes, delayMs: Math.round(delay), reason: lastError },
        'image transfer interrupted; resuming from the last written offset',
      );
      report({ phase: 'resuming', doneBytes: offset, totalBytes: size, resumes });
      await sleep(delay, undefined, { signal }).catch(() => {});
      if (signal.aborted) throw new Error(`write_image cancelled at ${offset} of ${size} bytes: the agent is stopping`);
    }

    const digest = hash.digest('hex');
    if (digest !== stat.sha256) {
      throw new Error(
        `sha256 mismatch after writing ${size} bytes: the controller announced ${stat.sha256}, the data received hashes to ${digest}`,
      );
    }
    report({ phase: 'flushing', doneBytes: size, totalBytes: size, resumes });
    await device.sync().catch((error: unknown) => {
      throw new Error(`flushing ${target.devicePath} failed after writing ${size} bytes: ${describe(error)}`);
    });
    if (options.verifyReadback) {
      report({ phase: 'verifying', doneBytes: 0, totalBytes: size, resumes });
      const readBack = await hashRange(device, size, (done) => report({ phase: 'verifying', doneBytes: done, totalBytes: size, resumes }));
      if (readBack !== digest)
        throw new Error(`read-back verification failed: ${target.devicePath} hashes to ${readBack}, the image to ${digest}`);
    }
    logger.info({ size, resumes, seconds: (Date.now() - started) / 1000 }, 'image written and verified');
    return {
      devicePath: target.devicePath,
      writtenBytes: size,
      sha256: digest,
      resumes,
      bytesReceivedTwice: 0,
      chunksSkipped: 0,
      chunksFetched: 0,
      chunksRefetched: 0,
      bytesSkipped: 0,
      bytesFromPeers: 0,
      bytesFromController: size,
    };
  } finally {
    // A device that failed or vanished may fail its close too; that must not hide the error that ended the write.
    await device
      .close()
      .catch((error: unknown) => logger.warn({ err: error, device: target.devicePath }, 'closing the target disk failed'));
  }
}
