import { BufferPool } from './buffer-pool.js';

/**
 * Large requests received into pooled buffers (uploads).
 *
 * grpc-js's server joins each request message from its HTTP/2 data chunks
 * with Buffer.concat into a fresh buffer. For UploadImage that is a new
 * MiB per MiB uploaded, and the full collections it sets off cost the
 * controller more than its two sha256 passes (docs/transfer.md). This
 * decoder does the same one copy, into a buffer from a pool; the handler
 * gives it back with `releaseRequestBuffer` once nothing refers to it any
 * more (the upload: when the chunk's disk write has settled).
 *
 * Same limit check and error text as grpc-js's StreamDecoder, which the
 * server reports as RESOURCE_EXHAUSTED (common/receive-limits.ts names the
 * method in it).
 */

/** Below this a message is allocated alone, as grpc-js would: small requests are not worth pooling. */
const POOLED_MIN_BYTES = 64 * 1024;

/**
 * Enough for what one upload holds at once (the message being handled, four
 * disk writes in flight, a few decoded ahead) and a second upload beside it.
 * 1 MiB + 64 KiB fits the CLI's 1 MiB data messages with their framing.
 */
const pool = new BufferPool({ keep: 16, minBytes: 1024 * 1024 + 64 * 1024, idleMs: 10_000 });

/** The pool's allocations since start (tests: reuse shows as fewer allocations than messages). */
export function requestPoolAllocations(): number {
  return pool.allocated;
}

/** Buffers out on loan, by the memory they view, to the whole pooled buffer. */
const lent = new WeakMap<ArrayBufferLike, Buffer>();

/**
 * Gives back the pooled buffer that `view` (a request message, or a part of
 * one such as its decoded data) lies in. The caller promises that nothing
 * reads any view of it afterwards. A view of anything else, or a second
 * release, does nothing.
 */
export function releaseRequestBuffer(view: Uint8Array): void {
  const block = lent.get(view.buffer);
  if (!block) return;
  lent.delete(view.buffer);
  pool.giveBack(block);
}

export class PooledRequestDecoder {
  private readonly header = Buffer.alloc(5);
  private headerBytes = 0;
  private message: Buffer | undefined;
  private filled = 0;

  /** Public and mutable as grpc-js's: common/receive-limits.ts lowers it per method. */
  constructor(public maxReadMessageLength: number) {}

  /** The complete messages (5-byte frame header included, as grpc-js returns them) that `data` finishes. */
  write(data: Buffer): Buffer[] {
    const messages: Buffer[] = [];
    let at = 0;
    while (at < data.length) {
      if (this.message === undefined) {
        const n = Math.min(5 - this.headerBytes, data.length - at);
        data.copy(this.header, this.headerBytes, at, at + n);
        this.headerBytes += n;
        at += n;
        if (this.headerBytes < 5) break;
        const size = this.header.readUInt32BE(1);
        if (this.maxReadMessageLength !== -1 && size > this.maxReadMessageLength) {
          throw new Error(`Received message larger than max (${size} vs ${this.maxReadMessageLength})`);
        }
        this.message = this.allocate(size + 5);
        this.header.copy(this.message, 0);
        this.filled = 5;
      }
      const n = Math.min(this.message.length - this.filled, data.length - at);
      data.copy(this.message, this.filled, at, at + n);
      this.filled += n;
      at += n;
      if (this.filled === this.message.length) messages.push(this.finish());
    }
    return messages;
  }

  private finish(): Buffer {
    const message = this.message as Buffer;
    this.message = undefined;
    this.headerBytes = 0;
    return message;
  }

  private allocate(length: number): Buffer {
    if (length < POOLED_MIN_BYTES) return Buffer.allocUnsafe(length);
    const block = pool.take(length);
    lent.set(block.buffer, block);
    return block.subarray(0, length);
  }
}
