import { createHash, type Hash, randomUUID } from 'node:crypto';
import { type FileHandle, mkdir, open, readdir, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Status } from 'nice-grpc-common';
import { type ChunkManifest, ManifestBuilder } from '../../common/chunk-manifest.js';
import { MetalcastError } from '../../common/errors.js';
import { BlobWriter } from './blob-writer.js';
import type { ImageFormatInfo, PreparedImage } from './formats/prepare.js';

export interface ReceivedContent {
  sha256: string;
  sizeBytes: number;
  /**
   * Lets go of the new blob's hold (idempotent). Until then garbage
   * collection leaves the blob alone, although no image row points at it
   * yet: call it once the row that uses it is committed, or has failed to be.
   */
  release: () => void;
  /** What {@link ReceiveOptions.prepare} found: the format as received, its checksum, the allocated extents. */
  format?: ImageFormatInfo;
  /** The chunk manifest {@link ReceiveOptions.prepare} built, if any. */
  manifest?: ChunkManifest;
}

/** A blob open for reading; garbage collection leaves it alone until close(). */
export interface BlobReader {
  /**
   * The bytes [from, end) in chunks of at most `chunkSize`, each in a buffer
   * from `alloc` (a new one each time, or one the consumer has given back to
   * its pool: a consumer may keep or queue it until then). The next chunk is
   * read while the consumer handles the current one, so that the disk and
   * the network overlap. Throws {@link ShortBlobError} when the file ends early.
   */
  chunks(from: number, end: number, chunkSize: number, alloc?: (length: number) => Buffer): AsyncGenerator<Buffer>;
  close(): Promise<void>;
}

/** A blob is shorter than what was asked of it (its image row says more). */
export class ShortBlobError extends Error {
  override name = 'ShortBlobError';
  constructor(readonly at: number) {
    super(`the blob ends at ${at} bytes`);
  }
}

export interface ReceiveOptions {
  /** Lower-case hex; the content is refused if it differs. */
  expectedSha256?: string;
  /** The content is refused if it is not exactly this long. */
  expectedSize?: number;
  /** A second digest to check ("sha512", hex), for imports that name one. */
  extraDigest?: { algorithm: 'sha512'; hex: string };
  /** Refused when the content grows past this. */
  maxBytes?: number;
  signal?: AbortSignal;
  /**
   * Runs on the verified file before it becomes a blob, and says what to
   * keep instead (controller/images/formats/prepare.ts: detect the format,
   * convert qcow2 to raw); the blob is then addressed by the prepared
   * content's sha256. It may write new files only at {@link ImageFiles.tempPath}.
   */
  prepare?: (path: string, received: ReceivedFile) => Promise<PreparedImage>;
  /**
   * Builds the chunk manifest of the content as it arrives, in the pass that hashes it (given to
   * {@link prepare}, which keeps it when it keeps the bytes as they are, as for a raw image).
   */
  manifestChunkSize?: number;
  /**
   * Told of each chunk of the source once this no longer reads it: hashed and copied for writing (also
   * when that failed). An upload gives its pooled receive buffer back here.
   */
  onConsumed?: (chunk: Uint8Array) => void;
}

/** What arrived, as {@link ReceiveOptions.prepare} sees it. */
export interface ReceivedFile {
  sha256: string;
  sizeBytes: number;
  /** The manifest of the received bytes, when {@link ReceiveOptions.manifestChunkSize} asked for one. */
  manifest?: ChunkManifest;
}

/**
 * Image content on disk, addressed by sha256: <dir>/blobs/<sha256>. Content
 * arrives in a temporary file, is hashed as it is written, flushed, checked,
 * and only then renamed into place, so that a broken or mismatching upload
 * leaves nothing behind and a blob, once present, is always whole.
 *
 * Blobs being read, and new blobs whose image row is not committed yet, are
 * held: {@link removeIfIdle} (the replicator's garbage collection) skips
 * them. An explicit {@link remove} (the last image using a blob deleted on
 * this controller) does not wait: on POSIX a reader keeps reading from its
 * open file after the unlink.
 */
export class ImageFiles {
  readonly blobs: string;
  private readonly incoming: string;
  /** Holds per sha256: readers, and blobs just received. */
  private readonly holds = new Map<string, number>();
  /** Unlinks in flight, so that a blob received with the same content is renamed in only after them. */
  private readonly removing = new Map<string, Promise<void>>();
  private missingHandler: ((sha256: string) => Promise<boolean>) | undefined;

  constructor(readonly dir: string) {
    this.blobs = join(dir, 'blobs');
    this.incoming = join(dir, 'incoming');
  }

  /** Creates the folders and removes what an interrupted upload left. */
  async init(): Promise<void> {
    await mkdir(this.blobs, { recursive: true });
    await rm(this.incoming, { recursive: true, force: true });
    await mkdir(this.incoming, { recursive: true });
  }

  /** A fresh path in the folder of unfinished content (removed at start-up), for work on content being received. */
  tempPath(): string {
    return join(this.incoming, randomUUID());
  }

  blobPath(sha256: string): string {
    if (!/^[0-9a-f]{64}$/.test(sha256)) throw new Error(`not a sha256: ${sha256.slice(0, 80)}`);
    return join(this.blobs, sha256);
  }

  async has(sha256: string): Promise<boolean> {
    return stat(this.blobPath(sha256)).then(
      () => true,
      () => false,
    );
  }

  /**
   * Stores content from a stream of chunks; throws MetalcastError (INVALID_ARGUMENT) on a mismatch.
   * Each chunk is hashed and copied into the blob's write blocks (blob-writer.ts) before the next is
   * asked for, so a source may reuse a chunk's memory then.
   */
  async receive(source: AsyncIterable<Uint8Array> | Iterable<Uint8Array>, options: ReceiveOptions = {}): Promise<ReceivedContent> {
    const temp = this.tempPath();
    const blob = await BlobWriter.create(temp);
    // With a manifest wanted, its builder also yields the sha256: one pass hashes the chunks and the whole.
    const builder = options.manifestChunkSize ? new ManifestBuilder(options.manifestChunkSize) : undefined;
    const sha256 = builder ? undefined : createHash('sha256');
    const extra = options.extraDigest ? createHash(options.extraDigest.algorithm) : undefined;
    let size = 0;
    let committed = false;
    let converted: string | undefined;
    try {
      for await (const chunk of source) {
        options.signal?.throwIfAborted();
        size += chunk.byteLength;
        if (options.maxBytes !== undefined && size > options.maxBytes) {
          throw new MetalcastError(Status.INVALID_ARGUMENT, `the image is larger than the limit of ${options.maxBytes} bytes`);
        }
        if (options.expectedSize !== undefined && options.expectedSize > 0 && size > options.expectedSize) {
          throw new MetalcastError(Status.INVALID_ARGUMENT, `more data than the announced size of ${options.expectedSize} bytes`);
        }
        if (builder) builder.update(chunk);
        else sha256?.update(chunk);
        extra?.update(chunk);
        // Copied into the blob's aligned blocks (blob-writer.ts), whose writes run while the next chunks arrive.
        try {
          await blob.append(chunk);
        } finally {
          options.onConsumed?.(chunk);
        }
      }
      await blob.finish();
      await blob.close();
      const built = builder?.finish();
      const digest = built ? built.sha256 : (sha256 as Hash).digest('hex');
      if (options.expectedSize !== undefined && options.expectedSize > 0 && size !== options.expectedSize) {
        throw new MetalcastError(Status.INVALID_ARGUMENT, `received ${size} bytes, but ${options.expectedSize} were announced`);
      }
      if (options.expectedSha256 && options.expectedSha256 !== digest) {
        throw new MetalcastError(
          Status.INVALID_ARGUMENT,
          `sha256 mismatch: expected ${options.expectedSha256}, received content has ${digest}`,
        );
      }
      if (extra && options.extraDigest) {
        const extraDigest = extra.digest('hex');
        if (extraDigest !== options.extraDigest.hex) {
          throw new MetalcastError(
            Status.INVALID_ARGUMENT,
            `${options.extraDigest.algorithm} mismatch: expected ${options.extraDigest.hex}, received content has ${extraDigest}`,
          );
        }
      }
      let keep = { path: temp, sha256: digest, sizeBytes: size };
      let format: ImageFormatInfo | undefined;
      let manifest: ChunkManifest | undefined;
      if (options.prepare) {
        const prepared = await options.prepare(temp, { sha256: digest, sizeBytes: size, manifest: built?.manifest });
        if (prepared.path !== temp) {
          converted = prepared.path;
          await rm(temp, { force: true });
        }
        keep = prepared;
        format = prepared.info;
        manifest = prepared.manifest;
      }
      // Held before it is visible: garbage collection must not take a blob whose row is being written.
      const release = this.hold(keep.sha256);
      try {
        await this.removing.get(keep.sha256);
        // The same content is here already (an image uploaded again under another name): a blob is always whole,
        // so keep that one, which readers may hold open and the page cache may hold, and drop the new copy.
        if (await this.has(keep.sha256)) await rm(keep.path, { force: true });
        else await rename(keep.path, this.blobPath(keep.sha256));
      } catch (error) {
        release();
        throw error;
      }
      committed = true;
      return { sha256: keep.sha256, sizeBytes: keep.sizeBytes, release, format, manifest };
    } finally {
      if (!committed) {
        await blob.close().catch(() => {}); // waits for the writes still running: nothing may write into the file removed below
        await rm(temp, { force: true });
        if (converted) await rm(converted, { force: true });
      }
    }
  }

  /** Removes a blob whatever holds it (its last image was deleted here). */
  async remove(sha256: string): Promise<void> {
    await this.unlink(sha256);
  }

  /** Removes a blob unless something holds it; true when it was removed (or already gone). */
  async removeIfIdle(sha256: string): Promise<boolean> {
    if (this.isHeld(sha256)) return false;
    await this.unlink(sha256);
    return true;
  }

  /** Keeps a blob from {@link removeIfIdle}; returns the release function, which is idempotent. */
  hold(sha256: string): () => void {
    this.holds.set(sha256, (this.holds.get(sha256) ?? 0) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const left = (this.holds.get(sha256) ?? 1) - 1;
      if (left > 0) this.holds.set(sha256, left);
      else this.holds.delete(sha256);
    };
  }

  isHeld(sha256: string): boolean {
    return this.holds.has(sha256);
  }

  /** Opens a blob for reading, held until closed; undefined when this controller does not have it. */
  async openBlob(sha256: string): Promise<BlobReader | undefined> {
    const path = this.blobPath(sha256);
    const release = this.hold(sha256);
    let file: FileHandle;
    try {
      file = await open(path, 'r');
    } catch (error) {
      release();
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw error;
    }
    return {
      chunks: (from, end, chunkSize, alloc = Buffer.allocUnsafe) => readChunks(file, from, end, chunkSize, alloc),
      close: async () => {
        release();
        await file.close();
      },
    };
  }

  /**
   * Tells whoever fills this store from elsewhere (the replicator) that a
   * reader wants a blob that is not here. True when it expects to bring it
   * (a reader should retry), false when nothing will (the content is lost).
   */
  async requestMissing(sha256: string): Promise<boolean> {
    return (await this.missingHandler?.(sha256)) ?? false;
  }

  /** Installs the answer to {@link requestMissing} (undefined removes it). */
  setMissingHandler(handler: ((sha256: string) => Promise<boolean>) | undefined): void {
    this.missingHandler = handler;
  }

  private async unlink(sha256: string): Promise<void> {
    const path = this.blobPath(sha256);
    const done = rm(path, { force: true }).finally(() => {
      if (this.removing.get(sha256) === done) this.removing.delete(sha256);
    });
    this.removing.set(sha256, done);
    await done;
  }

  /** Blobs on disk, for consistency checks. */
  async list(): Promise<string[]> {
    return (await readdir(this.blobs)).filter((name) => /^[0-9a-f]{64}$/.test(name));
  }
}

async function* readChunks(
  file: FileHandle,
  from: number,
  end: number,
  chunkSize: number,
  alloc: (length: number) => Buffer,
): AsyncGenerator<Buffer> {
  const readAt = async (at: number): Promise<Buffer> => {
    const want = Math.min(chunkSize, end - at);
    const buffer = alloc(want);
    let got = 0;
    while (got < want) {
      const { bytesRead } = await file.read(buffer, got, want - got, at + got);
      if (bytesRead === 0) throw new ShortBlobError(at + got);
      got += bytesRead;
    }
    return buffer;
  };
  // The read ahead runs while the consumer holds the current chunk, when
  // nothing awaits it: a failure then would be an unhandled rejection, which
  // ends the process. Mark it handled here; it is still thrown where it is awaited.
  const readAhead = (at: number): Promise<Buffer> => {
    const read = readAt(at);
    read.catch(() => {});
    return read;
  };
  let offset = from;
  let pending = offset < end ? readAhead(offset) : undefined;
  try {
    while (pending) {
      const chunk = await pending;
      offset += chunk.length;
      pending = offset < end ? readAhead(offset) : undefined;
      yield chunk;
    }
  } finally {
    // A consumer that stops early must not close the file under a read still running.
    await pending?.catch(() => {});
  }
}
