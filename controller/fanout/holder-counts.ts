/**
 * How many agents of a fan-out wave hold each chunk, kept up to date one
 * bitmap change at a time. The tracker picks the rarest chunks an agent
 * lacks on every exchange; counting holders afresh each time costs a pass
 * over every member for every chunk (15 ms an exchange for a 100 GiB image
 * in 4 MiB chunks and 40 agents), kept here it costs one pass over the
 * counts (see bench/fanout-tracker.ts).
 */
export class HolderCounts {
  private readonly counts: Int32Array;

  constructor(readonly chunkCount: number) {
    this.counts = new Int32Array(chunkCount);
  }

  count(chunk: number): number {
    return this.counts[chunk] ?? 0;
  }

  /**
   * One member's bitmap went from `previous` to `next` (bit i of byte i / 8
   * per chunk; an empty array for a member that joins or leaves the count).
   * Only the bytes that differ are looked at.
   */
  change(previous: Uint8Array, next: Uint8Array): void {
    const bytes = Math.ceil(this.chunkCount / 8);
    for (let i = 0; i < bytes; i++) {
      const before = previous[i] ?? 0;
      const after = next[i] ?? 0;
      if (before === after) continue;
      for (let bit = 0; bit < 8; bit++) {
        const chunk = i * 8 + bit;
        if (chunk >= this.chunkCount) break;
        const mask = 1 << bit;
        if ((before & mask) !== 0 && (after & mask) === 0) this.counts[chunk] = (this.counts[chunk] ?? 0) - 1;
        else if ((before & mask) === 0 && (after & mask) !== 0) this.counts[chunk] = (this.counts[chunk] ?? 0) + 1;
      }
    }
  }

  /**
   * The chunks `wanted` accepts, fewest holders first and in random order
   * among chunks with as many holders (so that agents asking at the same
   * time spread over different chunks). Lazy: the caller stops when it has
   * enough, and pays for the shuffle only of what it took.
   */
  *rarestFirst(wanted: (chunk: number) => boolean): Generator<number> {
    const buckets: number[][] = [];
    for (let chunk = 0; chunk < this.chunkCount; chunk++) {
      if (!wanted(chunk)) continue;
      const holders = Math.max(0, this.counts[chunk] ?? 0);
      let bucket = buckets[holders];
      if (!bucket) {
        bucket = [];
        buckets[holders] = bucket;
      }
      bucket.push(chunk);
    }
    for (const bucket of buckets) {
      if (!bucket) continue;
      for (let i = 0; i < bucket.length; i++) {
        const j = i + Math.floor(Math.random() * (bucket.length - i));
        const picked = bucket[j] as number;
        bucket[j] = bucket[i] as number;
        bucket[i] = picked;
        yield picked;
      }
    }
  }
}
