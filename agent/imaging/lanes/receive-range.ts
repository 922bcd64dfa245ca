import { createHash, type Hash } from 'node:crypto';
import { type ChunkManifest, chunkDigest, chunkRange } from '../../../common/chunk-manifest.js';
import type { WriteQueue } from '../../../common/disk-writes/positional-writes.js';
import { chunkParts } from '../../../common/read-image-codec.js';
import type { ReadImageResponse } from '../../../gen/metalcast/v1/agent_gateway.js';
import type { AlignedBlocks } from '../../../common/disk-writes/direct-writes.js';

/*
 * One ReadImage call's messages onto the disk, each manifest chunk hashed as
 * it lands and judged when its last byte is in. Shared by the agent's own
 * thread (chunked-writer.ts, one stream) and the lane workers (lane-worker.ts,
 * one stream each), so that both verify exactly the same way.
 */

/** A byte range of the image made of chunks to fetch, [offset, end). */
export interface FetchRange {
  offset: number;
  end: number;
}

/** A chunk being received: the hash of its first `received` bytes, which are on their way to the disk. */
export interface PartialChunk {
  hash: Hash;
  received: number;
}

/** What receiving a range needs; the caller owns every part of it and keeps it across ranges. */
export interface RangeReceiver {
  manifest: ChunkManifest;
  /** Blocks the received pieces are copied into, given back once written; aligned zeros for zero runs. */
  blocks: Pick<AlignedBlocks, 'take' | 'giveBack' | 'zeros'>;
  /** Writes at a position of the target disk, all of it (common/disk-writes/direct-writes.ts). */
  write(data: Buffer, position: number): Promise<void>;
  /** Chunks received in part, by index: a range may resume inside one. */
  partial: Map<number, PartialChunk>;
  writes: WriteQueue;
  /** Every message, once its write is queued (the stall timer, progress). */
  onMessage(bytes: number): void;
  /** A chunk whose last byte arrived: `ok` when its sha256 is the manifest's. */
  onChunk(index: number, ok: boolean, digest: Buffer): void;
}

/**
 * Reads the messages of one call for `range` and writes them at their
 * offsets; resolves when the call ended at the range's end (its writes may
 * still be in flight: `writes.all()`). Throws on a message out of place or
 * a call that ended early.
 */
export async function receiveRange(messages: AsyncIterable<ReadImageResponse>, range: FetchRange, into: RangeReceiver): Promise<void> {
  const { manifest, blocks, partial, writes } = into;
  let offset = range.offset;
  for await (const message of messages) {
    // chunkParts, not message.data: reading `data` of a message received in parts joins them (a copy).
    const parts = message.zero ? [] : chunkParts(message);
    const length = message.zero ? message.length : parts.reduce((sum, part) => sum + part.length, 0);
    if (message.offset !== offset || length === 0 || offset + length > range.end) {
      throw new Error(`the controller sent a chunk at ${message.offset} of ${length} bytes where ${offset} was expected`);
    }
    // The received pieces are copied into a block used again once written: the HTTP/2 buffers they sit in
    // are then garbage at once, not held until the disk write ends (the collector's cheap case), and the
    // disk gets one buffer instead of a writev of ~220 pieces, from aligned memory so that it can bypass the
    // page cache (common/disk-writes/direct-writes.ts).
    const block = message.zero ? undefined : blocks.take(length);
    if (block) {
      let at = 0;
      for (const part of parts) at += part.copy(block, at);
    }
    const data = block ? block.subarray(0, length) : blocks.zeros(length);
    await writes.room();
    const written = into.write(data, offset);
    writes.add(block ? written.finally(() => blocks.giveBack(block)) : written);
    // Hash the message chunk by chunk; a chunk is judged when its last byte arrives.
    let at = 0;
    while (at < length) {
      const index = Math.floor((offset + at) / manifest.chunkSize);
      const chunk = chunkRange(manifest, index);
      const within = offset + at - chunk.offset;
      const take = Math.min(chunk.length - within, length - at);
      let state = partial.get(index);
      if (within === 0) {
        state = { hash: createHash('sha256'), received: 0 };
        partial.set(index, state);
      } else if (!state || state.received !== within) {
        throw new Error(`chunk ${index} resumed at byte ${within} but ${state?.received ?? 0} were received`);
      }
      state.hash.update(data.subarray(at, at + take));
      state.received += take;
      at += take;
      if (state.received < chunk.length) continue;
      partial.delete(index);
      const digest = state.hash.digest();
      into.onChunk(index, digest.equals(chunkDigest(manifest, index)), digest);
    }
    offset += length;
    into.onMessage(length);
  }
  if (offset < range.end) throw new Error(`the controller ended the stream at ${offset} of the range ending at ${range.end}`);
}
