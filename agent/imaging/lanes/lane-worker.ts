/**
 * A lane: one worker thread with its own HTTP/2 connection to the
 * controller, fetching the ranges the agent's thread hands it (fetch-lanes.ts)
 * onto the disk through its own file handle, verifying every chunk as it
 * lands (receive-range.ts). TLS decryption, HTTP/2, hashing and the copies
 * all happen on this thread, so several lanes use several cores: on one
 * connection the agent's single thread was busy for the whole transfer
 * (docs/transfer.md, "Parallel streams").
 *
 * Started by start-lane-worker.ts; speaks lane-protocol.ts.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { ClientError, createChannel, createClient } from 'nice-grpc';
import { Metadata } from 'nice-grpc-common';
import type { ChunkManifest } from '../../../common/chunk-manifest.js';
import { describeError } from '../../../common/errors.js';
import { clientChannelOptions } from '../../../common/grpc-options.js';
import { FastAgentGatewayServiceDefinition } from '../../../common/read-image-codec.js';
import { tlsClient } from '../../../common/tls.js';
import { AlignedBlocks, DirectWriter } from '../../../common/disk-writes/direct-writes.js';
import { DiskWriteError, guardedCall, isDiskError, StallError, WRITES_IN_FLIGHT } from '../disk-io.js';
import type { FromLane, LaneFailure, LaneSetup, ToLane } from './lane-protocol.js';
import { type PartialChunk, receiveRange } from './receive-range.js';

if (!parentPort) throw new Error('lane-worker.ts runs as a worker thread of the agent');
const port = parentPort;
const setup = workerData as LaneSetup;
const say = (message: FromLane) => port.postMessage(message);

const manifest: ChunkManifest = {
  chunkSize: setup.chunkSize,
  sizeBytes: setup.sizeBytes,
  digests: Buffer.from(setup.digests.buffer, setup.digests.byteOffset, setup.digests.byteLength),
  zeroBitmap: Buffer.alloc(0),
  rootSha256: '',
};
const tls = setup.endpoint.caPem === undefined ? undefined : tlsClient(setup.endpoint.address, { caPem: setup.endpoint.caPem });
const channel = createChannel(setup.endpoint.address, tls?.credentials, {
  ...clientChannelOptions(setup.endpoint.keepalive),
  ...tls?.channelOptions,
});
const gateway = createClient(FastAgentGatewayServiceDefinition, channel);
// Buffers for received chunks, used again once written; page-aligned, so that writes can bypass the page cache.
const blocks = new AlignedBlocks(WRITES_IN_FLIGHT + 1, 4 * 1024 * 1024);
let writer: DirectWriter | undefined;
let call: AbortController | undefined;
let closing = false;
let working: Promise<void> = Promise.resolve();

async function fetch(range: { offset: number; end: number }, metadata: Record<string, string>): Promise<void> {
  const stop = new AbortController();
  call = stop;
  // A range starts at a chunk boundary and is fetched whole: nothing of it is carried over from an earlier call.
  const partial = new Map<number, PartialChunk>();
  try {
    writer ??= await DirectWriter.open(setup.devicePath, blocks);
    const disk = writer;
    await guardedCall(stop.signal, setup.stallTimeoutMs, async (guarded) => {
      const messages = gateway.readImage(
        { image: setup.image, offset: range.offset, length: range.end - range.offset },
        { metadata: Metadata(metadata), signal: guarded.signal },
      );
      await receiveRange(messages, range, {
        manifest,
        blocks,
        partial,
        write: (data, position) => disk.write(data, position),
        writes: guarded.writes,
        onMessage: (bytes) => {
          guarded.alive();
          say({ type: 'received', bytes });
        },
        onChunk: (index, ok, digest) =>
          say(ok ? { type: 'chunk', index, ok } : { type: 'chunk', index, ok, digest: digest.toString('hex') }),
      });
    });
    say({ type: 'fetched' });
  } catch (error) {
    say({ type: 'failed', failure: failureOf(error) });
  } finally {
    call = undefined;
  }
}

function failureOf(error: unknown): LaneFailure {
  if (error instanceof StallError) return { kind: 'stall', message: error.message };
  if (error instanceof DiskWriteError) return { kind: 'disk', message: error.message, code: (error.cause as NodeJS.ErrnoException)?.code };
  if (error instanceof ClientError) return { kind: 'grpc', code: error.code, details: error.details, path: error.path };
  if (isDiskError(error)) {
    return { kind: 'disk', message: describeError(error), code: (error as NodeJS.ErrnoException).code };
  }
  return { kind: 'other', message: describeError(error) };
}

async function close(): Promise<void> {
  if (closing) return;
  closing = true;
  await working.catch(() => {});
  channel.close();
  await writer?.close().catch(() => {});
  say({ type: 'closed' });
  port.close();
}

port.on('message', (message: ToLane) => {
  switch (message.type) {
    case 'fetch':
      if (closing) return;
      working = working.then(() => fetch(message.range, message.metadata));
      return;
    case 'abort':
      call?.abort(new Error('the lane was told to stop'));
      void close();
      return;
    case 'close':
      void close();
      return;
  }
});
