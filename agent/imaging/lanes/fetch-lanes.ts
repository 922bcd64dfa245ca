import { ClientError } from 'nice-grpc';
import type { ChunkManifest } from '../../../common/chunk-manifest.js';
import type { Logger } from '../../../common/logging.js';
import { DiskWriteError, StallError } from '../disk-io.js';
import type { FromLane, LaneEndpoint, LaneFailure, ToLane } from './lane-protocol.js';
import type { FetchRange } from './receive-range.js';
import { startLaneWorker } from './start-lane-worker.js';

/**
 * Chunks per segment: the unit a lane fetches with one ReadImage call and
 * then asks for the next. Small enough that lanes finish together (a lane
 * that is done takes the next segment instead of waiting on a fixed half),
 * large enough that a call's start costs nothing beside its data: 64 MiB
 * at the default 1 MiB chunk.
 */
export const LANE_SEGMENT_CHUNKS = 64;

/** A lane that was told to stop and has not ended after this long is terminated. */
const LANE_STOP_TIMEOUT_MS = 10_000;

/** One pass of a deploy in lanes: the ranges still to fetch, spread over `lanes` worker threads. */
export interface LanePass {
  endpoint: LaneEndpoint;
  /** The call metadata of the moment (the token may change between lookups). */
  metadata: () => Record<string, string>;
  lanes: number;
  image: string;
  devicePath: string;
  manifest: ChunkManifest;
  stallTimeoutMs: number;
  /** Ranges starting and ending at chunk boundaries. */
  ranges: FetchRange[];
  /** The deploy's: aborting it stops every lane. */
  signal: AbortSignal;
  logger: Logger;
  onReceived(bytes: number): void;
  /** A chunk's verdict; throwing (too many failures of one chunk) stops every lane and rejects the pass with it. */
  onChunk(index: number, ok: boolean, digest: Buffer): void;
}

/** How many segments the ranges make: a pass in lanes needs two at least. */
export function segmentCount(ranges: readonly FetchRange[], chunkSize: number): number {
  return splitIntoSegments(ranges, chunkSize).length;
}

/** The ranges cut at chunk boundaries into pieces of at most LANE_SEGMENT_CHUNKS chunks, in order. */
export function splitIntoSegments(ranges: readonly FetchRange[], chunkSize: number): FetchRange[] {
  const most = LANE_SEGMENT_CHUNKS * chunkSize;
  const segments: FetchRange[] = [];
  for (const range of ranges) {
    for (let offset = range.offset; offset < range.end; offset += most) {
      segments.push({ offset, end: Math.min(range.end, offset + most) });
    }
  }
  return segments;
}

/**
 * Fetches the pass's ranges over `lanes` connections at once, each in its
 * own worker thread (lane-worker.ts), a segment at a time from one shared
 * queue. Resolves with undefined when every segment was fetched, or with the
 * first lane failure as the error the agent's own thread would have caught
 * (a ClientError, a StallError, a DiskWriteError); the other lanes go on with
 * the queue, so a failure costs its segment's rest, not the pass. Rejects
 * with what `onChunk` threw, after every lane stopped.
 */
export async function fetchInLanes(pass: LanePass): Promise<unknown> {
  const queue = splitIntoSegments(pass.ranges, pass.manifest.chunkSize);
  const count = Math.max(1, Math.min(pass.lanes, queue.length));
  let firstFailure: unknown;
  let fatal: { error: unknown } | undefined;
  /** Each lane's way to be told to stop at once (and terminated if it does not end). */
  const stops: (() => void)[] = [];
  const stopAll = () => {
    for (const stop of stops) stop();
  };
  const onAbort = () => stopAll();
  pass.signal.addEventListener('abort', onAbort);
  const ended: Promise<void>[] = [];
  for (let lane = 0; lane < count; lane++) {
    const worker = startLaneWorker({
      endpoint: pass.endpoint,
      lane,
      image: pass.image,
      devicePath: pass.devicePath,
      chunkSize: pass.manifest.chunkSize,
      sizeBytes: pass.manifest.sizeBytes,
      digests: pass.manifest.digests,
      stallTimeoutMs: pass.stallTimeoutMs,
    });
    let closed = false;
    let exited = false;
    let stopTimer: NodeJS.Timeout | undefined;
    const tell = (message: ToLane) => {
      if (exited) return;
      if (message.type !== 'fetch') stopTimer ??= setTimeout(() => void worker.terminate(), LANE_STOP_TIMEOUT_MS);
      worker.postMessage(message);
    };
    stops.push(() => tell({ type: 'abort' }));
    const fail = (error: unknown) => {
      firstFailure ??= error;
      pass.logger.warn({ lane, reason: describeFailure(error) }, 'an image lane failed; the other lanes go on, its rest is fetched again');
    };
    const next = () => {
      const segment = fatal || pass.signal.aborted ? undefined : queue.shift();
      if (!segment) return tell({ type: 'close' });
      let metadata: Record<string, string>;
      try {
        metadata = pass.metadata();
      } catch (error) {
        // No token (a re-lookup under way): this pass ends here, the next one asks again.
        queue.unshift(segment);
        fail(error);
        return tell({ type: 'close' });
      }
      tell({ type: 'fetch', range: segment, metadata });
    };
    worker.on('message', (message: FromLane) => {
      switch (message.type) {
        case 'received':
          pass.onReceived(message.bytes);
          return;
        case 'chunk':
          if (fatal) return;
          try {
            pass.onChunk(message.index, message.ok, message.digest ? Buffer.from(message.digest, 'hex') : Buffer.alloc(0));
          } catch (error) {
            fatal = { error };
            stopAll();
          }
          return;
        case 'fetched':
          next();
          return;
        case 'failed':
          if (!fatal && !pass.signal.aborted) fail(failureError(message.failure));
          tell({ type: 'close' });
          return;
        case 'closed':
          closed = true;
          return;
      }
    });
    worker.on('error', (error) => fail(new Error(`image lane ${lane} crashed: ${error.message}`)));
    ended.push(
      new Promise<void>((resolve) =>
        worker.once('exit', () => {
          exited = true;
          clearTimeout(stopTimer);
          if (!closed && !fatal && !pass.signal.aborted) fail(new Error(`image lane ${lane} ended before it was told to`));
          resolve();
        }),
      ),
    );
    next();
  }
  try {
    await Promise.all(ended);
  } finally {
    pass.signal.removeEventListener('abort', onAbort);
  }
  if (fatal) throw fatal.error;
  if (pass.signal.aborted) return pass.signal.reason ?? new Error('aborted');
  return firstFailure;
}

/** A lane's failure as the error the single-stream writer would have caught for it. */
function failureError(failure: LaneFailure): Error {
  switch (failure.kind) {
    case 'grpc':
      return new ClientError(failure.path, failure.code, failure.details);
    case 'stall':
      return new StallError(failure.message);
    case 'disk':
      return new DiskWriteError(failure.message);
    case 'other':
      return new Error(failure.message);
  }
}

function describeFailure(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
