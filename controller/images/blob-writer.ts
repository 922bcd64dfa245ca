import { AlignedBlocks, DirectWriter } from '../../common/disk-writes/direct-writes.js';
import { BackgroundFlush, WriteQueue } from '../../common/disk-writes/positional-writes.js';
import { dataRuns } from './sparse/data-runs.js';

/*
 * The file a blob is received into: pieces of any size (an upload's 1 MiB
 * messages, a peer controller's ReadImage chunks, an HTTP body's few KiB)
 * are copied into page-aligned blocks of BLOCK_BYTES and each full block is
 * written with O_DIRECT (common/disk-writes/direct-writes.ts), a few at once.
 *
 * Why not write the pieces as they come, as before: through the page cache
 * the kernel copied every byte once more and, with memory full, reclaimed a
 * page for every page it filled. A 1 GiB TLS upload cost the controller 1.8
 * to 3.8 CPU-seconds of kernel time in libuv's threads for that, more than
 * its TLS and both sha256 passes. The copy into the block costs a memcpy.
 *
 * Every block starts at a multiple of BLOCK_BYTES in the file, so every
 * whole file-system block of zeros is found (controller/images/sparse/data-runs.ts)
 * and left a hole whatever the size of the pieces.
 *
 * The blob is not in the page cache afterwards: the first deploy reads it
 * from disk, with the kernel's read-ahead, as it would read any image
 * received long before. A receive does not push the controller's database
 * and its other images out of the cache.
 */

/** Bytes per O_DIRECT write. */
const BLOCK_BYTES = 4 * 1024 * 1024;

/** Blocks being written at once. Memory: this many blocks, one filling, and one of zeros (24 MiB). */
const WRITES_IN_FLIGHT = 4;

/** The blob is flushed to disk in the background every this many bytes (common/disk-writes/positional-writes.ts). */
const FLUSH_EVERY_BYTES = 64 * 1024 * 1024;

export class BlobWriter {
  private block: Buffer;
  private filled = 0;
  /** Where the block being filled starts in the file. */
  private blockAt = 0;
  private readonly writes = new WriteQueue(WRITES_IN_FLIGHT);
  private readonly flush: BackgroundFlush;
  private closed: Promise<void> | undefined;

  private constructor(
    private readonly disk: DirectWriter,
    private readonly blocks: AlignedBlocks,
  ) {
    this.block = blocks.take(BLOCK_BYTES);
    this.flush = new BackgroundFlush(disk.file, FLUSH_EVERY_BYTES);
  }

  /** Creates (or empties) the file at `path`. */
  static async create(path: string): Promise<BlobWriter> {
    const blocks = new AlignedBlocks(WRITES_IN_FLIGHT + 1, BLOCK_BYTES);
    return new BlobWriter(await DirectWriter.open(path, blocks, { create: true }), blocks);
  }

  /** Whether full blocks bypass the page cache (false on a file system without O_DIRECT). */
  get bypassesPageCache(): boolean {
    return this.disk.bypassesPageCache;
  }

  /**
   * Copies `data` to the end of what was appended; full blocks start their writes. The caller may reuse
   * `data` once this returns. Throws the first failed write.
   */
  async append(data: Uint8Array): Promise<void> {
    let at = 0;
    while (at < data.byteLength) {
      const take = Math.min(BLOCK_BYTES - this.filled, data.byteLength - at);
      this.block.set(data.subarray(at, at + take), this.filled);
      this.filled += take;
      at += take;
      if (this.filled === BLOCK_BYTES) await this.writeBlock();
    }
  }

  /** Writes what is left, waits for every write and the flush, sizes the file to what was appended and syncs it. */
  async finish(): Promise<void> {
    if (this.filled > 0) await this.writeBlock();
    await this.writes.all();
    await this.flush.settled();
    // Trailing zeros were never written.
    await this.disk.file.truncate(this.blockAt);
    await this.disk.file.sync();
  }

  /** Waits for the writes still running (nothing may write into a file that is removed), then closes. */
  async close(): Promise<void> {
    this.closed ??= (async () => {
      await this.writes.all().catch(() => {});
      await this.flush.settled().catch(() => {});
      await this.disk.close();
    })();
    await this.closed;
  }

  private async writeBlock(): Promise<void> {
    await this.writes.room();
    const block = this.block;
    const at = this.blockAt;
    const runs = dataRuns(block.subarray(0, this.filled), at);
    const written = settleAll(runs.map(([start, end]) => this.disk.write(block.subarray(start, end), at + start)));
    this.writes.add(written.finally(() => this.blocks.giveBack(block)));
    this.blockAt += this.filled;
    this.flush.wrote(this.blockAt);
    this.block = this.blocks.take(BLOCK_BYTES);
    this.filled = 0;
  }
}

/**
 * Settles once every write has: a block may be filled again only when nothing writes from it any more, so
 * the first failure is reported after the others end, not as soon as it happens (Promise.all).
 */
async function settleAll(writes: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(writes);
  const failed = results.find((result) => result.status === 'rejected');
  if (failed) throw failed.reason;
}
