import { open } from 'node:fs/promises';
import { Status } from 'nice-grpc-common';
import { type ChunkManifest, ManifestBuilder } from '../../../common/chunk-manifest.js';
import { MetalcastError } from '../../../common/errors.js';
import type { PreparedImage } from '../formats/prepare.js';

const READ_BYTES = 4 * 1024 * 1024;

/**
 * The manifest of a file and its whole sha256, in one pass: both are then
 * known to describe the same bytes (common/chunk-manifest.ts says why that
 * matters to the agent).
 */
export async function manifestOfFile(
  path: string,
  chunkSize: number,
  signal?: AbortSignal,
): Promise<{ manifest: ChunkManifest; sha256: string }> {
  const builder = new ManifestBuilder(chunkSize);
  const file = await open(path, 'r');
  try {
    // Two buffers: the next read runs while this one is hashed.
    const buffers = [Buffer.allocUnsafe(READ_BYTES), Buffer.allocUnsafe(READ_BYTES)];
    let turn = 0;
    let pending = file.read(buffers[0] as Buffer, 0, READ_BYTES, null);
    for (;;) {
      signal?.throwIfAborted();
      const { bytesRead, buffer } = await pending;
      if (bytesRead === 0) break;
      turn ^= 1;
      pending = file.read(buffers[turn] as Buffer, 0, READ_BYTES, null);
      builder.update(buffer.subarray(0, bytesRead));
    }
  } finally {
    await file.close();
  }
  return builder.finish();
}

/**
 * Builds the manifest of prepared content (the raw form: what a node's
 * disk receives) and checks it: against the sha256 the preparation found,
 * so that the manifest and the image's sha256 speak of the same bytes, and
 * against the root digest the operator expects, if any. INVALID_ARGUMENT
 * (the content is refused) on a mismatch with the operator's root.
 */
export async function withManifest(
  prepared: PreparedImage,
  chunkSize: number,
  expectedRoot: string | undefined,
  signal?: AbortSignal,
  /** The file as received and the manifest built while it arrived: reused when the prepared content is that file. */
  received?: { path: string; manifest?: ChunkManifest },
): Promise<PreparedImage & { manifest: ChunkManifest }> {
  // A raw image is kept as received (holes punched, bytes the same): its manifest came with the upload's
  // own hashing pass. A converted qcow2 is new bytes: read once more.
  const reuse = received?.manifest && received.path === prepared.path && received.manifest.chunkSize === chunkSize;
  const { manifest, sha256 } =
    reuse && received.manifest
      ? { manifest: received.manifest, sha256: prepared.sha256 }
      : await manifestOfFile(prepared.path, chunkSize, signal);
  if (sha256 !== prepared.sha256 || manifest.sizeBytes !== prepared.sizeBytes) {
    throw new MetalcastError(
      Status.INTERNAL,
      `the prepared image changed while its chunk manifest was built (sha256 ${sha256}, ${manifest.sizeBytes} bytes; expected ${prepared.sha256}, ${prepared.sizeBytes} bytes)`,
    );
  }
  if (expectedRoot && expectedRoot !== manifest.rootSha256) {
    throw new MetalcastError(
      Status.INVALID_ARGUMENT,
      `chunk manifest mismatch: the image's ${manifest.digests.length / 32} chunks of ${chunkSize} bytes hash to root ${manifest.rootSha256}, but the import expects ${expectedRoot}; check the image and that the manifest was made with the controller's --image-manifest-chunk-size`,
    );
  }
  return { ...prepared, manifest };
}
