import { createHash } from 'node:crypto';
import type { FileHandle } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { ClientError, Status } from 'nice-grpc';
import { describeError as describe } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { WriteQueue } from '../../common/disk-writes/positional-writes.js';
import type { ImageSource } from './image-source.js';
import type { FanoutHook } from '../fanout/fanout-hook.js';

/*
 * What both ways of writing an image share (the streaming writer in
 * image-writer.ts and the manifest-driven one in chunked-writer.ts): the
 * target and options, the errors, full and queued writes, hashing, retries.
 * Kept apart so that neither writer imports the other's module back.
 */

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
  /**
   * Connections to fetch a manifest image's chunks over at once, each on its
   * own worker thread (agent/imaging/lanes); 1: one stream on the agent's
   * thread. Used only when the source can open them and there is work for two.
   */
  streams: number;
}

export const DEFAULT_WRITE_OPTIONS: WriteImageOptions = {
  stallTimeoutMs: 30_000,
  maxAttempts: 10,
  timeLimitMs: 0,
  verifyReadback: false,
  diskIsZeroed: false,
  backoffBaseMs: 1000,
  backoffMaxMs: 30_000,
  streams: 1,
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

/** Disk writes of one write_image attempt may run this many at once (each pins its chunk). */
export const WRITES_IN_FLIGHT = 4;

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

/** What a guarded read call gives its body. */
export interface GuardedCall {
  /** The call's signal: pass it to the read. */
  signal: AbortSignal;
  /** Disk writes of this call; a failing one aborts the call at once. */
  writes: WriteQueue;
  /** Data arrived: the stall timer starts again. */
  alive(): void;
}

/**
 * One read call the way every writer runs it (image-writer.ts, chunked-writer.ts,
 * lanes/lane-worker.ts): aborted with `parent`, when no data came for
 * `stallTimeoutMs`, or at once when a queued disk write fails, so that a stalled
 * link cannot hide a full disk and a failing write never goes unhandled (an
 * unhandled rejection ends the agent process). Up to WRITES_IN_FLIGHT writes
 * are queued. Throws a DiskWriteError when a write failed (also when the stream
 * broke meanwhile: the bytes of that write are counted as received, so it is
 * the error that matters), the StallError when the call stalled, else what
 * broke the call.
 */
export async function guardedCall(parent: AbortSignal, stallTimeoutMs: number, body: (call: GuardedCall) => Promise<void>): Promise<void> {
  const call = new AbortController();
  const onAbort = () => call.abort(parent.reason);
  parent.addEventListener('abort', onAbort);
  let stallTimer: NodeJS.Timeout | undefined;
  const alive = () => {
    clearTimeout(stallTimer);
    stallTimer = setTimeout(() => call.abort(new StallError(`no data for ${stallTimeoutMs / 1000}s`)), stallTimeoutMs);
  };
  const writes = new WriteQueue(WRITES_IN_FLIGHT, (failure) => call.abort(new DiskWriteError(failure)));
  try {
    alive();
    await body({ signal: call.signal, writes, alive });
    await writes.all();
  } catch (error) {
    const writeError = await writes.all().then(
      () => undefined,
      (failure: unknown) => failure,
    );
    if (writeError !== undefined) throw new DiskWriteError(writeError);
    throw call.signal.reason instanceof StallError ? call.signal.reason : error;
  } finally {
    clearTimeout(stallTimer);
    parent.removeEventListener('abort', onAbort);
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
