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
