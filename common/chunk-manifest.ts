import { createHash, type Hash } from 'node:crypto';

/**
 * The chunk manifest of an image (docs/chunk-manifest.md): the image cut
 * into fixed-size chunks (the last one shorter), the sha256 of each, which
 * ones are all zeros, and a root digest that binds the list to its chunk
 * size and image size. Both programs need it: the controller builds it, the
 * agent checks what it receives and what its disk holds against it.
 */
export interface ChunkManifest {
  chunkSize: number;
  sizeBytes: number;
  /** 32 bytes per chunk, in order. */
  digests: Buffer;
  /** One bit per chunk (bit i % 8 of byte i / 8): set when the chunk is all zeros. */
  zeroBitmap: Buffer;
  /** sha256 over chunk size, image size (u64 big-endian each) and the digests: see {@link rootDigest}. */
  rootSha256: string;
}

export const DIGEST_BYTES = 32;

export function chunkCount(sizeBytes: number, chunkSize: number): number {
  return Math.ceil(sizeBytes / chunkSize);
}

/** The byte range of chunk `index`. */
export function chunkRange(manifest: Pick<ChunkManifest, 'chunkSize' | 'sizeBytes'>, index: number): { offset: number; length: number } {
  const offset = index * manifest.chunkSize;
  return { offset, length: Math.min(manifest.chunkSize, manifest.sizeBytes - offset) };
}

export function chunkDigest(manifest: ChunkManifest, index: number): Buffer {
  return manifest.digests.subarray(index * DIGEST_BYTES, (index + 1) * DIGEST_BYTES);
}

export function isZeroChunk(manifest: Pick<ChunkManifest, 'zeroBitmap'>, index: number): boolean {
  return ((manifest.zeroBitmap[index >> 3] ?? 0) & (1 << (index & 7))) !== 0;
}

/**
 * The root digest. The sizes go in first so that the same digests under a
 * different chunk size or a truncated image cannot hash to the same root.
 */
export function rootDigest(chunkSize: number, sizeBytes: number, digests: Uint8Array): string {
  const header = Buffer.alloc(16);
  header.writeBigUInt64BE(BigInt(chunkSize), 0);
  header.writeBigUInt64BE(BigInt(sizeBytes), 8);
  return createHash('sha256').update(header).update(digests).digest('hex');
}

/**
 * Builds a manifest from the image's bytes in order, fed in pieces of any
 * size, and the whole image's sha256 in the same pass: the two then speak of
 * the same bytes, which is what lets an agent that verified every chunk
 * trust the whole-image sha256 without reading its disk again.
 */
export class ManifestBuilder {
  private readonly whole = createHash('sha256');
  private readonly digests: Buffer[] = [];
  private readonly zeros: number[] = [];
  private chunk: Hash = createHash('sha256');
  private inChunk = 0;
  private chunkIsZero = true;
  private size = 0;

  constructor(readonly chunkSize: number) {
    if (!Number.isInteger(chunkSize) || chunkSize < 4096) throw new Error(`manifest chunk size ${chunkSize} is below 4096 bytes`);
  }

  update(data: Uint8Array): void {
    this.whole.update(data);
    let at = 0;
    while (at < data.byteLength) {
      const take = Math.min(this.chunkSize - this.inChunk, data.byteLength - at);
      const piece = data.subarray(at, at + take);
      this.chunk.update(piece);
      if (this.chunkIsZero && !allZero(piece)) this.chunkIsZero = false;
      this.inChunk += take;
      at += take;
      if (this.inChunk === this.chunkSize) this.endChunk();
    }
    this.size += data.byteLength;
  }

  finish(): { manifest: ChunkManifest; sha256: string } {
    if (this.inChunk > 0) this.endChunk();
    const digests = Buffer.concat(this.digests);
    const zeroBitmap = Buffer.alloc(Math.ceil(this.digests.length / 8));
    for (const index of this.zeros) zeroBitmap[index >> 3] = (zeroBitmap[index >> 3] ?? 0) | (1 << (index & 7));
    return {
      manifest: {
        chunkSize: this.chunkSize,
        sizeBytes: this.size,
        digests,
        zeroBitmap,
        rootSha256: rootDigest(this.chunkSize, this.size, digests),
      },
      sha256: this.whole.digest('hex'),
    };
  }

  private endChunk(): void {
    if (this.chunkIsZero) this.zeros.push(this.digests.length);
    this.digests.push(this.chunk.digest());
    this.chunk = createHash('sha256');
    this.inChunk = 0;
    this.chunkIsZero = true;
  }
}

const ZERO_PAGE = Buffer.alloc(64 * 1024);

/** True when every byte is zero (compared a page at a time, which is memcmp-fast). */
export function allZero(data: Uint8Array): boolean {
  const view = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  for (let at = 0; at < view.length; at += ZERO_PAGE.length) {
    const end = Math.min(view.length, at + ZERO_PAGE.length);
    if (!view.subarray(at, end).equals(ZERO_PAGE.subarray(0, end - at))) return false;
  }
  return true;
}

/** Checks a manifest's shape against its sizes and root: what an agent does with one it received. */
export function checkManifest(manifest: ChunkManifest, expectedRoot: string): void {
  const count = chunkCount(manifest.sizeBytes, manifest.chunkSize);
  if (manifest.digests.length !== count * DIGEST_BYTES) {
    throw new Error(`the chunk manifest has ${manifest.digests.length / DIGEST_BYTES} digests where ${count} chunks were announced`);
  }
  const root = rootDigest(manifest.chunkSize, manifest.sizeBytes, manifest.digests);
  if (root !== expectedRoot) throw new Error(`the chunk manifest hashes to root ${root}, but the controller announced ${expectedRoot}`);
}
