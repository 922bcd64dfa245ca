import { setTimeout as sleep } from 'node:timers/promises';

/**
 * A token bucket of bytes: `take(n)` resolves once n bytes may pass at the
 * given rate, with a burst of a fraction of a second. Callers share it in
 * arrival order, so that one stream cannot starve the others. A rate of 0
 * lets everything through at once.
 */
export class TokenBucket {
  private tokens: number;
  private last: number;
  private queue: Promise<void> = Promise.resolve();

  constructor(
    private readonly bytesPerSecond: number,
    private readonly burstBytes = Math.max(64 * 1024, bytesPerSecond / 10),
  ) {
    this.tokens = this.burstBytes;
    this.last = performance.now();
  }

  get rate(): number {
    return this.bytesPerSecond;
  }

  take(bytes: number, signal?: AbortSignal): Promise<void> {
    if (this.bytesPerSecond <= 0) return Promise.resolve();
    const turn = this.queue.then(() => this.wait(bytes, signal));
    this.queue = turn.catch(() => {});
    return turn;
  }

  private async wait(bytes: number, signal?: AbortSignal): Promise<void> {
    for (;;) {
      const now = performance.now();
      this.tokens = Math.min(this.burstBytes, this.tokens + ((now - this.last) * this.bytesPerSecond) / 1000);
      this.last = now;
      // A piece larger than the burst goes through once the bucket is full, leaving it in debt.
      if (this.tokens >= Math.min(bytes, this.burstBytes)) {
        this.tokens -= bytes;
        return;
      }
      const needed = Math.min(bytes, this.burstBytes) - this.tokens;
      await sleep(Math.max(1, (needed * 1000) / this.bytesPerSecond), undefined, { signal });
    }
  }
}
