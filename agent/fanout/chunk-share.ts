import { timingSafeEqual } from 'node:crypto';
import { open } from 'node:fs/promises';
import type { CallContext } from 'nice-grpc';
import { bearerToken } from '../../common/agent-metadata.js';
import { type ChunkManifest, chunkCount, chunkRange } from '../../common/chunk-manifest.js';
import { failedPrecondition, invalidArgument, resourceExhausted, unauthenticated } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type { PeerChunkServiceImplementation, ReadChunkRequest, ReadChunkResponse } from '../../gen/metalcast/v1/fanout.js';
import { TokenBucket } from './token-bucket.js';

/** Bytes per ReadChunk message: well under the 4 MiB default receive limit of any peer. */
export const PEER_PIECE_BYTES = 1024 * 1024;

interface Shared {
  image: string;
  devicePath: string;
  manifest: ChunkManifest;
  /** Bit per chunk: written, flushed to the page cache and verified, so safe to serve. */
  servable: Uint8Array;
  /** The wave credentials the controller gave this agent (the latest two: a controller restart makes a new one). */
  credentials: string[];
  maxUploads: number;
  bucket: TokenBucket;
}

/**
 * What this agent serves to the peers of its deploy wave (docs/fanout.md):
 * chunks of the one image it is deploying, read back from its target disk,
 * and only those it wrote and verified itself. Serving starts when the write
 * begins and ends when the agent's next command starts (the final power-off
 * or reboot, an erase, another deploy), when the write failed, or a linger
 * time after the write ended: never after the deploy, never another image.
 */
export class ChunkShare {
  private shared: Shared | undefined;
  private uploads = 0;
  private lingerTimer: NodeJS.Timeout | undefined;
  /** Bytes served to peers, for the log. */
  servedBytes = 0;

  constructor(private readonly logger: Logger) {}

  begin(image: string, devicePath: string, manifest: ChunkManifest): Uint8Array {
    this.end('a new write started');
    const servable = new Uint8Array(Math.ceil(chunkCount(manifest.sizeBytes, manifest.chunkSize) / 8));
    this.shared = { image, devicePath, manifest, servable, credentials: [], maxUploads: 1, bucket: new TokenBucket(0) };
    return servable;
  }

  /** The wave's credential and the upload limits, as the controller's last exchange said. */
  setPolicy(credential: string, maxUploads: number, maxUploadBytesPerSecond: number): void {
    const shared = this.shared;
    if (!shared) return;
    if (shared.credentials[0] !== credential) shared.credentials = [credential, ...shared.credentials].slice(0, 2);
    shared.maxUploads = Math.max(1, maxUploads);
    if (shared.bucket.rate !== maxUploadBytesPerSecond) shared.bucket = new TokenBucket(maxUploadBytesPerSecond);
  }

  markServable(index: number): void {
    const bitmap = this.shared?.servable;
    if (bitmap) bitmap[index >> 3] = (bitmap[index >> 3] ?? 0) | (1 << (index & 7));
  }

  /** The write ended well: every chunk is on the disk; serve them all for at most `lingerMs` more. */
  writeFinished(lingerMs: number): void {
    const shared = this.shared;
    if (!shared) return;
    shared.servable.fill(0xff);
    clearTimeout(this.lingerTimer);
    this.lingerTimer = setTimeout(() => this.end('the linger time after the write ended'), lingerMs);
    this.lingerTimer.unref();
  }

  end(reason: string): void {
    clearTimeout(this.lingerTimer);
    if (!this.shared) return;
    this.logger.info({ image: this.shared.image, reason, servedBytes: this.servedBytes }, 'no longer serving chunks to peers');
    this.shared = undefined;
    this.servedBytes = 0;
  }

  get serving(): boolean {
    return this.shared !== undefined;
  }

  service(): PeerChunkServiceImplementation {
    return { readChunk: (request, context) => this.readChunk(request, context) };
  }

  private async *readChunk(request: ReadChunkRequest, context: CallContext): AsyncGenerator<ReadChunkResponse> {
    const shared = this.shared;
    const presented = bearerToken(context.metadata);
    if (!shared || shared.credentials.length === 0) {
      throw failedPrecondition('this agent serves no deploy wave now');
    }
    if (presented === '' || !shared.credentials.some((c) => equal(c, presented))) {
      this.logger.warn({ peer: context.peer }, 'chunk read refused: wrong or missing wave credential');
      throw unauthenticated("this call needs the deploy wave's credential ('authorization: Bearer <credential>') from ExchangeChunks");
    }
    if (request.image !== shared.image) throw failedPrecondition(`this agent serves image '${shared.image}' only`);
    const count = chunkCount(shared.manifest.sizeBytes, shared.manifest.chunkSize);
    if (request.chunk >= count) throw invalidArgument(`chunk: ${request.chunk} is past the last chunk (${count - 1})`);
    if (((shared.servable[request.chunk >> 3] ?? 0) & (1 << (request.chunk & 7))) === 0) {
      throw failedPrecondition(`this agent does not hold chunk ${request.chunk} yet`);
    }
    if (this.uploads >= shared.maxUploads) {
      throw resourceExhausted(`this agent serves ${this.uploads} chunk reads, its limit; ask another peer`);
    }
    this.uploads++;
    const device = await open(shared.devicePath, 'r');
    try {
      const { offset, length } = chunkRange(shared.manifest, request.chunk);
      for (let at = 0; at < length; ) {
        if (context.signal.aborted || this.shared !== shared) return;
        // A fresh buffer per piece: grpc-js may queue a yielded message unserialised.
        const piece = Buffer.allocUnsafe(Math.min(PEER_PIECE_BYTES, length - at));
        const { bytesRead } = await device.read(piece, 0, piece.length, offset + at);
        if (bytesRead !== piece.length) throw failedPrecondition(`the disk ended inside chunk ${request.chunk}`);
        await shared.bucket.take(bytesRead, context.signal);
        at += bytesRead;
        this.servedBytes += bytesRead;
        yield { data: piece };
      }
    } finally {
      this.uploads--;
      await device.close();
    }
  }
}

function equal(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}
