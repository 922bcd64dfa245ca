import type { FileHandle } from 'node:fs/promises';

/*
 * Positional writes to a file, a few at a time: what the agent's image writers
 * (agent/imaging/) and the controller's image store (ImageFiles.receive) both
 * do with the chunks they receive.
 */

/** Writes all of `data` at `position`, continuing after a short write. */
export async function writeFully(file: FileHandle, data: Uint8Array, position: number): Promise<void> {
  let written = 0;
  while (written < data.byteLength) {
    const { bytesWritten } = await file.write(data, written, data.byteLength - written, position + written);
    written += bytesWritten;
  }
}

/** Positional writes in flight, at most `limit`; every failure is kept for all() and told to `onFailure`, never left unhandled. */
export class WriteQueue {
  private readonly pending = new Set<Promise<void>>();
  private failure: { error: unknown } | undefined;

  constructor(
    private readonly limit: number,
    private readonly onFailure: (error: unknown) => void = () => {},
  ) {}

  add(write: Promise<void>): void {
    const tracked = write.then(
      () => {
        this.pending.delete(tracked);
      },
      (error: unknown) => {
        this.pending.delete(tracked);
        this.failure ??= { error };
        this.onFailure(error);
      },
    );
    this.pending.add(tracked);
  }

  /** Waits until another write may start; throws the first write error. */
  async room(): Promise<void> {
    while (this.pending.size >= this.limit) await Promise.race(this.pending);
    if (this.failure) throw this.failure.error;
  }

  /** Waits for every write; throws the first write error. */
  async all(): Promise<void> {
    await Promise.all(this.pending);
    if (this.failure) throw this.failure.error;
  }
}

/**
 * fdatasync in the background once every `everyBytes` written, one at a
 * time, so that the disk writes while data still arrives and the final sync
 * finds little left to do. Without it, nothing reached the disk before the
 * end (the kernel starts writing back only at 10 % of memory dirty), and the
 * final fsync of a GiB upload took 0.8 s in which nothing else happened.
 * A failure is kept and thrown by settled(): an image whose flush failed is
 * not committed.
 */
export class BackgroundFlush {
  private flushing: Promise<void> | undefined;
  private failure: { error: unknown } | undefined;
  private flushedAt = 0;

  constructor(
    private readonly file: FileHandle,
    private readonly everyBytes: number,
  ) {}

  /** Tells how many bytes have been handed to writes so far; starts a flush when enough are new. */
  wrote(total: number): void {
    if (this.flushing || this.failure || total - this.flushedAt < this.everyBytes) return;
    this.flushedAt = total;
    this.flushing = this.file.datasync().then(
      () => {
        this.flushing = undefined;
      },
      (error: unknown) => {
        this.flushing = undefined;
        this.failure ??= { error };
      },
    );
  }

  /** Waits for the flush in flight, if any; throws the first failure. */
  async settled(): Promise<void> {
    await this.flushing;
    if (this.failure) throw this.failure.error;
  }
}
