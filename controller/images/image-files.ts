import { createHash, randomUUID } from 'node:crypto';
import { mkdir, open, readdir, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Status } from 'nice-grpc-common';
import { MetalcastError } from '../../common/errors.js';

export interface ReceivedContent {
  sha256: string;
  sizeBytes: number;
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
}

/**
 * Image content on disk, addressed by sha256: <dir>/blobs/<sha256>. Content
 * arrives in a temporary file, is hashed as it is written, flushed, checked,
 * and only then renamed into place, so that a broken or mismatching upload
 * leaves nothing behind and a blob, once present, is always whole.
 */
export class ImageFiles {
  readonly blobs: string;
  private readonly incoming: string;

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

  /** Stores content from a stream of chunks; throws MetalcastError (INVALID_ARGUMENT) on a mismatch. */
  async receive(source: AsyncIterable<Uint8Array> | Iterable<Uint8Array>, options: ReceiveOptions = {}): Promise<ReceivedContent> {
    const temp = join(this.incoming, randomUUID());
    const file = await open(temp, 'w');
    const sha256 = createHash('sha256');
    const extra = options.extraDigest ? createHash(options.extraDigest.algorithm) : undefined;
    let size = 0;
    let committed = false;
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
        sha256.update(chunk);
        extra?.update(chunk);
        let written = 0;
        while (written < chunk.byteLength) {
          const { bytesWritten } = await file.write(chunk, written, chunk.byteLength - written);
          written += bytesWritten;
        }
      }
      const digest = sha256.digest('hex');
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
      await file.sync();
      await file.close();
      await rename(temp, this.blobPath(digest));
      committed = true;
      return { sha256: digest, sizeBytes: size };
    } finally {
      if (!committed) {
        await file.close().catch(() => {});
        await rm(temp, { force: true });
      }
    }
  }

  async remove(sha256: string): Promise<void> {
    await rm(this.blobPath(sha256), { force: true });
  }

  /** Blobs on disk, for consistency checks. */
  async list(): Promise<string[]> {
    return (await readdir(this.blobs)).filter((name) => /^[0-9a-f]{64}$/.test(name));
  }
}
