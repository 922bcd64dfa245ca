/**
 * Buffers for bulk data, used again once their bytes are written out.
 *
 * A fresh buffer per megabyte received costs little to allocate, but it is
 * memory outside the JavaScript heap, and V8 answers every few dozen MiB of
 * it with a full garbage collection that walks the whole heap (on the
 * controller, 2–2.6 CPU-s of collector threads per GiB uploaded). Taking
 * the buffer from here and giving it back when its disk write settles keeps
 * that memory constant.
 *
 * `take` hands out a buffer of at least the length asked for (callers use a
 * `subarray`); at most `keep` wait for reuse, and they are dropped after
 * `idleMs` without a `take`, so that an idle process does not hold them.
 * A buffer that is never given back is simply left to the garbage collector.
 */
export class BufferPool {
  private readonly free: Buffer[] = [];
  /** Buffers allocated since start: reuse shows as fewer allocations than takes. */
  allocated = 0;
  private lastUsed = 0;
  private trimTimer: NodeJS.Timeout | undefined;

  constructor(
    private readonly options: {
      /** Buffers kept for reuse. */
      keep: number;
      /** The smallest buffer allocated, so that one size serves a stream of similar requests. */
      minBytes: number;
      /** Drop the kept buffers after this long without a take. */
      idleMs?: number;
    },
  ) {}

  take(length: number): Buffer {
    this.used();
    const block = this.free.pop();
    if (block && block.length >= length) return block;
    this.allocated++;
    return Buffer.allocUnsafeSlow(Math.max(length, this.options.minBytes));
  }

  giveBack(block: Buffer): void {
    if (this.free.length < this.options.keep) this.free.push(block);
  }

  /** Buffers waiting for reuse (tests). */
  get kept(): number {
    return this.free.length;
  }

  private used(): void {
    this.lastUsed = Date.now();
    const idleMs = this.options.idleMs;
    if (idleMs !== undefined) this.trimTimer ??= setTimeout(() => this.trim(idleMs), idleMs).unref();
  }

  private trim(idleMs: number): void {
    this.trimTimer = undefined;
    const idleFor = Date.now() - this.lastUsed;
    if (idleFor >= idleMs) this.free.length = 0;
    else this.trimTimer = setTimeout(() => this.trim(idleMs), idleMs - idleFor).unref();
  }
}
