import { constants } from 'node:fs';
import { type FileHandle, open } from 'node:fs/promises';
import { writeFully } from './positional-writes.js';

/*
 * Image writes that bypass the page cache (O_DIRECT): the agent's writes to
 * the target disk, and the controller's writes of a blob it receives.
 *
 * A deploy writes each byte of the image once and never reads it back, and
 * a controller receives a blob once, so a buffered write only costs: the kernel copies every byte into the page
 * cache, and once memory is full (a ramdisk machine's soon is), it must
 * reclaim a page for every page it fills. Measured here (1 GiB in 4 MiB
 * writes, four in flight, then fsync, Node 24 on ext4): buffered, 0.35 to
 * 3.3 CPU-seconds and 0.46 to 2.5 s, depending on how full the page cache
 * was; O_DIRECT, 0.06 CPU-seconds and 0.33 s every time. The disk's DMA does
 * the copying instead. `dd oflag=direct` and qemu-img's `-t none` do the same.
 *
 * O_DIRECT needs the memory, the offset and the length aligned to the
 * device's block (512 bytes for most, 4096 for some): the blocks come from a
 * WebAssembly.Memory, which V8 maps page-aligned, and a piece that is not
 * aligned to 4096 (an image's last bytes, a message from a controller
 * with an odd chunk size) goes through an ordinary descriptor to the same
 * file. A file system without O_DIRECT (tmpfs) gets ordinary writes only.
 */

/** Alignment asked of O_DIRECT writes: a page, which covers every logical block size in use. */
export const DIRECT_ALIGNMENT = 4096;
const WASM_PAGE = 64 * 1024;
/** WebAssembly.Memory, which this project's TypeScript libraries do not declare. */
const WasmMemory = (globalThis as unknown as { WebAssembly: { Memory: new (size: { initial: number }) => { buffer: ArrayBuffer } } })
  .WebAssembly.Memory;

/**
 * `count` blocks of `blockBytes` (a multiple of 64 KiB) in page-aligned
 * memory, plus as many zeros: taken for a write and given back once it
 * settled. A request larger than a block gets an ordinary buffer, which the
 * writer then writes without O_DIRECT.
 */
export class AlignedBlocks {
  readonly memory: ArrayBuffer;
  /** False when no WebAssembly memory could be had: nothing is then written with O_DIRECT. */
  readonly pageAligned: boolean = true;
  private readonly free: Buffer[] = [];
  private readonly zeroRegion: Buffer;

  constructor(
    count: number,
    readonly blockBytes: number,
  ) {
    if (blockBytes % WASM_PAGE !== 0) throw new Error(`aligned blocks are multiples of 64 KiB, not ${blockBytes} bytes`);
    // One more block's worth at the end stays zero (WebAssembly memory starts zeroed): aligned zeros to write.
    const bytes = (count + 1) * blockBytes;
    try {
      this.memory = new WasmMemory({ initial: bytes / WASM_PAGE }).buffer;
    } catch {
      // V8 caps the address space that WebAssembly memories reserve: past it, ordinary memory and writes.
      this.memory = new ArrayBuffer(bytes);
      this.pageAligned = false;
    }
    for (let n = 0; n < count; n++) this.free.push(Buffer.from(this.memory, n * blockBytes, blockBytes));
    this.zeroRegion = Buffer.from(this.memory, count * blockBytes, blockBytes);
  }

  take(length: number): Buffer {
    if (length > this.blockBytes) return Buffer.allocUnsafeSlow(length);
    // More takes than blocks would mean a caller kept more writes in flight than it said: an ordinary buffer then.
    return this.free.pop() ?? Buffer.allocUnsafeSlow(this.blockBytes);
  }

  giveBack(block: Buffer): void {
    if (block.buffer === this.memory) this.free.push(block);
  }

  /** `length` zero bytes, aligned when they fit a block. Never written into. */
  zeros(length: number): Buffer {
    return length <= this.blockBytes ? this.zeroRegion.subarray(0, length) : Buffer.alloc(length);
  }

  /** True when `data` lies in this memory on an aligned address with an aligned length. */
  aligned(data: Uint8Array): boolean {
    return (
      this.pageAligned &&
      data.buffer === this.memory &&
      data.byteOffset % DIRECT_ALIGNMENT === 0 &&
      data.byteLength % DIRECT_ALIGNMENT === 0
    );
  }
}

/**
 * The target disk opened twice: an ordinary descriptor (reads, unaligned
 * pieces, fsync) and, where the file system allows it, an O_DIRECT one for
 * aligned pieces. If the O_DIRECT descriptor refuses a write (EINVAL: a
 * device with a larger block than assumed), the rest goes the ordinary way.
 */
export class DirectWriter {
  /** The O_DIRECT descriptor after it refused a write: closed with the rest. */
  private refused: FileHandle | undefined;

  private constructor(
    /** The ordinary descriptor: read the disk through this, and sync it. */
    readonly file: FileHandle,
    private direct: FileHandle | undefined,
    private readonly blocks: AlignedBlocks,
  ) {}

  /** Opens an existing file (a disk); `create` makes a new empty one, or empties it (a blob being received). */
  static async open(path: string, blocks: AlignedBlocks, options: { create?: boolean } = {}): Promise<DirectWriter> {
    const file = await open(path, options.create ? 'w' : 'r+');
    const direct = await open(path, constants.O_RDWR | constants.O_DIRECT).catch(() => undefined);
    return new DirectWriter(file, direct, blocks);
  }

  /** Whether aligned pieces bypass the page cache (false on a file system without O_DIRECT, or without aligned memory). */
  get bypassesPageCache(): boolean {
    return this.direct !== undefined && this.blocks.pageAligned;
  }

  async write(data: Buffer, position: number): Promise<void> {
    const direct = this.direct;
    if (direct && position % DIRECT_ALIGNMENT === 0 && this.blocks.aligned(data)) {
      try {
        await writeFully(direct, data, position);
        return;
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EINVAL') throw error;
        // Not this device's alignment after all: ordinary writes from now on (the write below redoes this one).
        // The descriptor stays open until close(): other writes may still be in flight on it.
        this.refused = direct;
        this.direct = undefined;
      }
    }
    await writeFully(this.file, data, position);
  }

  async close(): Promise<void> {
    const direct = this.direct ?? this.refused;
    this.direct = undefined;
    this.refused = undefined;
    await direct?.close().catch(() => {});
    await this.file.close();
  }
}
