/**
 * Where a received piece of an image holds data, at file-system block
 * granularity, so that blocks of zeros are never written and stay holes.
 *
 * The image store keeps blobs sparse: a hole costs no disk and `qemu-img
 * map` reports only the data, which is what deploys send. This used to be
 * done after the content had arrived, with `fallocate --dig-holes` reading
 * the whole file again (0.7 s of a 6 s GiB upload, in another process).
 * Finding the zero blocks while the piece is still in memory costs one
 * memcmp per block that stops at its first non-zero byte.
 *
 * Only whole blocks, aligned to their offset in the file, can be holes; a
 * piece that starts or ends inside a block writes that partial block as it
 * is. The image store hands this the aligned 4 MiB blocks it writes
 * (controller/images/blob-writer.ts), whatever the size of the pieces
 * received, so every received blob is as sparse as dig-holes would leave it.
 */

/** The file-system block: what a hole is made of (ext4, xfs and btrfs default to 4 KiB). */
export const HOLE_BLOCK_BYTES = 4096;

const ZERO_BLOCK = Buffer.alloc(HOLE_BLOCK_BYTES);

/**
 * The ranges [start, end) of `piece`, which lies at `fileOffset` in the file,
 * that must be written: everything but the whole aligned blocks of zeros.
 */
export function dataRuns(piece: Uint8Array, fileOffset: number): [number, number][] {
  const runs: [number, number][] = [];
  const length = piece.byteLength;
  const source = Buffer.isBuffer(piece) ? piece : Buffer.from(piece.buffer, piece.byteOffset, length);
  // Blocks start at file offsets that are multiples of the block size.
  let at = Math.min(length, (HOLE_BLOCK_BYTES - (fileOffset % HOLE_BLOCK_BYTES)) % HOLE_BLOCK_BYTES);
  let runStart = 0;
  while (at + HOLE_BLOCK_BYTES <= length) {
    if (ZERO_BLOCK.compare(source, at, at + HOLE_BLOCK_BYTES) === 0) {
      if (at > runStart) runs.push([runStart, at]);
      runStart = at + HOLE_BLOCK_BYTES;
    }
    at += HOLE_BLOCK_BYTES;
  }
  if (length > runStart) runs.push([runStart, length]);
  return runs;
}
