import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';
import { ChunkHashers } from '../../agent/imaging/chunk-hashers.js';

function shared(bytes: Buffer): Buffer {
  const view = Buffer.from(new SharedArrayBuffer(bytes.length));
  bytes.copy(view);
  return view;
}

describe('ChunkHashers (agent/imaging/chunk-hashers.ts)', () => {
  it('hashes chunks given in pieces, interleaved, on two workers, to the sha256 of each chunk', async () => {
    const hashers = new ChunkHashers(2);
    try {
      const chunks = [0, 1, 2].map(() => shared(randomBytes(300_000)));
      const cut = [0, 1, 70_000, 150_001, 300_000];
      const digests: Promise<Buffer | undefined>[][] = [[], [], []];
      // Piece by piece, the chunks taking turns, as messages that straddle chunk boundaries deliver them.
      for (let p = 0; p + 1 < cut.length; p++) {
        for (const [index, chunk] of chunks.entries()) {
          digests[index]?.push(hashers.update(index, chunk.subarray(cut[p], cut[p + 1]), p === 0, p + 2 === cut.length));
        }
      }
      for (const [index, chunk] of chunks.entries()) {
        const results = await Promise.all(digests[index] ?? []);
        assert.deepEqual(results.slice(0, -1), [undefined, undefined, undefined], 'no digest before the last piece');
        assert.equal(results.at(-1)?.toString('hex'), createHash('sha256').update(chunk).digest('hex'), `chunk ${index}`);
      }
      // `first` starts a chunk again: a chunk fetched anew after a broken piece hashes only what follows.
      const again = shared(randomBytes(1000));
      await hashers.update(7, again.subarray(0, 400), true, false);
      const restarted = await hashers.update(7, again, true, true);
      assert.equal(restarted?.toString('hex'), createHash('sha256').update(again).digest('hex'));
    } finally {
      await hashers.close();
    }
  });

  it('refuses a piece that continues a chunk never started, and memory a worker cannot share', async () => {
    const hashers = new ChunkHashers(1);
    try {
      await assert.rejects(hashers.update(3, shared(Buffer.from('abc')), false, true), /chunk 3 failed: .*never started/);
      assert.throws(() => hashers.update(0, Buffer.from('abc'), true, true), /SharedArrayBuffer/);
    } finally {
      await hashers.close();
    }
  });

  it('fails what is still waiting when closed, and everything after', async () => {
    const hashers = new ChunkHashers(1);
    const waiting = hashers.update(0, shared(randomBytes(64 * 1024 * 1024)), true, true);
    const refused = assert.rejects(waiting, /closed/);
    await hashers.close();
    await refused;
    await assert.rejects(hashers.update(1, shared(Buffer.from('x')), true, true), /closed/);
  });
});
