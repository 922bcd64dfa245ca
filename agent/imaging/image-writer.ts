import { createHash } from 'node:crypto';
import { type FileHandle, open } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { ClientError, Status } from 'nice-grpc';
import type { Logger } from '../../common/logging.js';
import type { CommandProgress, WriteImageResult } from '../../gen/metalcast/v1/command.js';
import { chunkParts } from '../../common/read-image-codec.js';
import { writeImageByChunks } from './chunked-writer.js';
import type { ImageSource } from './image-source.js';
import type { FanoutHook } from '../fanout/fanout-hook.js';
import { describeError as describe } from '../../common/errors.js';

export interface WriteImageTarget {
  image: string;
  devicePath: string;
  /** Capacity of the target; the image must fit. */
  deviceSizeBytes: number;
  /** What the controller said to expect; '' and 0 mean "whatever StatImage says". */
  expectedSha256: string;
  expectedSizeBytes: number;
}

export interface WriteImageOptions {
  /** Abort and resume when no chunk arrived for this long. */
  stallTimeoutMs: number;
  /**
   * Consecutive attempts that deliver no data before giving up. An attempt
   * that made progress resets the count and the backoff: a long transfer on
   * a flaky link goes on as long as it advances.
   */
  maxAttempts: number;
  /** Wall-clock limit for the whole write; 0 for none. */
  timeLimitMs: number;
  /** Re-read the disk at the end and compare its sha256. */
  verifyReadback: boolean;
  /** The disk holds only zeros, so all-zero chunks need not be written. */
  diskIsZeroed: boolean;
  /** Backoff between attempts: base × 2^n, capped, times U(0.5, 1.5). */
  backoffBaseMs: number;
  backoffMaxMs: number;
  /** Fan-out (docs/fanout.md): fetch chunks from the peers of the deploy wave first; undefined: from the controller only. */
  fanout?: FanoutHook;
}

export const DEFAULT_WRITE_OPTIONS: WriteImageOptions = {
  stallTimeoutMs: 30_000,
  maxAttempts: 10,
  timeLimitMs: 0,
  verifyReadback: false,
  diskIsZeroed: false,
  backoffBaseMs: 1000,
  backoffMaxMs: 30_000,
};

/** Answers that no retry can fix: the image is gone or not ours to read. */
export const FATAL_CODES = new Set([
  Status.NOT_FOUND,
  Status.PERMISSION_DENIED,
  Status.INVALID_ARGUMENT,
  Status.FAILED_PRECONDITION,
  Status.DATA_LOSS,
]);

export class StallError extends Error {
  override name = 'StallError';
}

/** Why a read was aborted: the disk refused a write; `cause` is the errno error. */
export class DiskWriteError extends Error {
  override name = 'DiskWriteError';
  constructor(cause: unknown) {
    super(describe(cause), { cause });
  }
}

const MIB = 1024 * 1024;

/**
 * Streams an image onto a disk: chunks are written at their offsets and
 * hashed in order; a stall or a broken call resumes from the last written
 * offset with jittered backoff; success needs every byte, the right sha256
 * and a flush to the device. Nothing reports success on a short or corrupt
 * write.
 */
export async function writeImage(
  source: ImageSource,
  target: WriteImageTarget,
  options: WriteImageOptions,
  report: (progress: Partial<CommandProgress>) => void,
  signal: AbortSignal,
  logger: Logger,
): Promise<WriteImageResult> {
  const started = Date.now();
  const stat = await withRetries(() => source.stat(target.image, signal), source, options, signal, logger, 'StatImage');
  if (target.expectedSha256 !== '' && stat.sha256 !== target.expectedSha256) {
    throw new Error(`the controller's image '${target.image}' has sha256 ${stat.sha256}, but the deploy expects ${target.expectedSha256}`);
  }
  if (target.expectedSizeBytes !== 0 && stat.sizeBytes !== target.expectedSizeBytes) {
    throw new Error(
      `the controller's image '${target.image}' is ${stat.sizeBytes} bytes, but the deploy expects ${target.expectedSizeBytes}`,
    );
  }
  const size = stat.sizeBytes;
  if (size > target.deviceSizeBytes) {
    throw new Error(`image '${target.image}' (${size} bytes) does not fit on ${target.devicePath} (${target.deviceSizeBytes} bytes)`);
  }
  logger.info(
    { image: target.image, device: target.devicePath, size, chunk: stat.chunkSizeBytes },
    options.diskIsZeroed
      ? 'writing image; all-zero chunks are skipped because the disk was erased to zeros'
      : 'writing image; all-zero chunks are written as zeros because the disk may hold old data',
  );

  if (stat.manifestChunkCount > 0 && source.manifest) {
    // Chunk by chunk against the manifest: verified on arrival, only what the disk lacks is fetched.
    return writeImageByChunks(source, target, options, report, signal, logger, stat);
  }

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
      const call = new AbortController();
      const onAbort = () => call.abort(signal.reason);
      signal.addEventListener('abort', onAbort);
      let stallTimer: NodeJS.Timeout | undefined;
      const armStallTimer = () => {
        clearTimeout(stallTimer);
        stallTimer = setTimeout(() => call.abort(new StallError(`no data for ${options.stallTimeoutMs / 1000}s`)), options.stallTimeoutMs);
      };
      // Up to WRITES_IN_FLIGHT writes queued while the next chunks are received and hashed, so that one slow
      // write does not stop the stream (memory: that many chunks). A write that fails while the loop waits
      // for the next chunk must neither go unhandled (an unhandled rejection ends the agent process) nor
      // wait for that chunk (a stalled link would hide a full disk for the whole stall timeout): the
      // failure aborts the read at once, and the catch below reports the write error, not the abort.
      const writes = new WriteQueue(WRITES_IN_FLIGHT, (failure) => call.abort(new DiskWriteError(failure)));
      try {
        armStallTimer();
        for await (const chunk of source.read(target.image, offset, call.signal)) {
          armStallTimer();
          // chunkParts, not chunk.data: reading `data` of a chunk received in parts joins them (a copy).
          const parts = chunk.zero ? [] : chunkParts(chunk);
          const length = chunk.zero ? chunk.length : parts.reduce((sum, part) => sum + part.length, 0);
          if (chunk.offset !== offset || length === 0 || offset + length > size || (chunk.zero && length > zeros.length)) {
            throw new Error(`the controller sent a chunk at ${chunk.offset} of ${length} bytes where ${offset} was expected`);
          }
          await writes.room();
          if (chunk.zero) {
            hash.update(zeros.subarray(0, length));
            if (!options.diskIsZeroed) writes.add(writeFully(device, zeros.subarray(0, length), offset));
          } else {
            // The chunk as received (common/grpc-wire.ts): hashed and written without joining it into one buffer.
            for (const part of parts) hash.update(part);
            writes.add(parts.length === 1 ? writeFully(device, parts[0]!, offset) : writeAllAt(device, parts, offset));
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
        await writes.all();
        if (offset < size) throw new Error(`the controller ended the stream at ${offset} of ${size} bytes`);
      } catch (error) {
        // A write still in flight when the stream broke may have failed too: its bytes are already
        // counted in offset, so resuming past them would leave a hole that the hash cannot see.
        const writeError = await writes.all().then(
          () => undefined,
          (failure: unknown) => failure,
        );
        if (signal.aborted) throw new Error(`write_image cancelled at ${offset} of ${size} bytes: the agent is stopping`);
        if (writeError !== undefined) {
          throw new Error(`writing ${target.devicePath} failed at ${offset} of ${size} bytes: ${describe(writeError)}`);
        }
        const reason = call.signal.reason instanceof StallError ? call.signal.reason : error;
        if (reason instanceof ClientError && FATAL_CODES.has(reason.code)) {
          throw new Error(
            `the controller refused the image read (${Status[reason.code]}: ${reason.details}) at ${offset} of ${size} bytes`,
          );
        }
        if (isDiskError(reason))
          throw new Error(`writing ${target.devicePath} failed at ${offset} of ${size} bytes: ${(reason as Error).message}`);
        source.failed(reason);
        lastError = describe(reason);
      } finally {
        clearTimeout(stallTimer);
        signal.removeEventListener('abort', onAbort);
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

export async function writeFully(file: FileHandle, data: Uint8Array, position: number): Promise<void> {
  let written = 0;
  while (written < data.byteLength) {
    const { bytesWritten } = await file.write(data, written, data.byteLength - written, position + written);
    written += bytesWritten;
  }
}

/** Disk writes of one write_image attempt may run this many at once (each pins its chunk). */
export const WRITES_IN_FLIGHT = 4;

/** Positional writes in flight, at most `limit`; every failure is kept for all() and told to `onFailure`, never left unhandled. */
export class WriteQueue {
  private readonly pending = new Set<Promise<void>>();
  private failure: { error: unknown } | undefined;

  constructor(
    private readonly limit: number,
    private readonly onFailure: (error: unknown) => void,
  ) {}

  add(write: Promise<void>): void {
    const tracked = write.then(
      () => {
        this.pending.delete(tracked);
      },
      (error: unknown) => {
        this.pending.delete(tracked);
        this.failure ??= { error };
        this.onFailure(error);
      },
    );
    this.pending.add(tracked);
  }

  /** Waits until another write may start; throws the first write error. */
  async room(): Promise<void> {
    while (this.pending.size >= this.limit) await Promise.race(this.pending);
    if (this.failure) throw this.failure.error;
  }

  /** Waits for every write; throws the first write error. */
  async all(): Promise<void> {
    await Promise.all(this.pending);
    if (this.failure) throw this.failure.error;
  }
}

/** Writes every part, in order, from `position`: one writev per call, continuing after a short write. */
export async function writeAllAt(file: FileHandle, parts: readonly Buffer[], position: number): Promise<void> {
  let list = parts;
  let at = position;
  while (list.length > 0) {
    const { bytesWritten } = await file.writev(list as Buffer[], at);
    at += bytesWritten;
    let skip = bytesWritten;
    let first = 0;
    while (first < list.length && skip >= list[first]!.length) skip -= list[first++]!.length;
    list = list.slice(first);
    if (skip > 0) list = [list[0]!.subarray(skip), ...list.slice(1)];
  }
}

export async function hashRange(file: FileHandle, size: number, onProgress: (done: number) => void): Promise<string> {
  const hash = createHash('sha256');
  const buffer = Buffer.allocUnsafe(4 * MIB);
  let done = 0;
  while (done < size) {
    const { bytesRead } = await file.read(buffer, 0, Math.min(buffer.length, size - done), done);
    if (bytesRead === 0) throw new Error(`the device ended at ${done} bytes while reading back ${size}`);
    hash.update(buffer.subarray(0, bytesRead));
    done += bytesRead;
    onProgress(done);
  }
  return hash.digest('hex');
}

export async function withRetries<T>(
  fn: () => Promise<T>,
  source: ImageSource,
  options: WriteImageOptions,
  signal: AbortSignal,
  logger: Logger,
  what: string,
): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn();
    } catch (error) {
      if (signal.aborted) throw error;
      if (error instanceof ClientError && FATAL_CODES.has(error.code)) {
        throw new Error(`the controller refused ${what} (${Status[error.code]}: ${error.details})`);
      }
      if (attempt >= options.maxAttempts) throw new Error(`${what} failed ${attempt} times; last error: ${describe(error)}`);
      source.failed(error);
      const delay = Math.min(options.backoffMaxMs, options.backoffBaseMs * 2 ** (attempt - 1)) * (0.5 + Math.random());
      logger.warn({ attempt, delayMs: Math.round(delay), reason: describe(error) }, `${what} failed; retrying`);
      await sleep(delay, undefined, { signal }).catch(() => {});
    }
  }
}

export function isDiskError(error: unknown): boolean {
  return typeof (error as NodeJS.ErrnoException)?.code === 'string' && typeof (error as NodeJS.ErrnoException).syscall === 'string';
}

/** Bytes per second over the last few seconds, for progress and ETA. */
export class RateMeter {
  private readonly samples: { at: number; bytes: number }[] = [];

  add(bytes: number): void {
    const now = Date.now();
    this.samples.push({ at: now, bytes });
    while (this.samples.length > 1 && now - (this.samples[0] as { at: number }).at > 3000) this.samples.shift();
  }

  perSecond(): number {
    const first = this.samples[0];
    const last = this.samples.at(-1);
    if (!first || !last || last.at === first.at) return 0;
    const bytes = this.samples.reduce((sum, s) => sum + s.bytes, 0) - first.bytes;
    return (bytes * 1000) / (last.at - first.at);
  }

  eta(remaining: number): number {
    const rate = this.perSecond();
    return rate > 0 ? Math.ceil(remaining / rate) : 0;
  }
}
