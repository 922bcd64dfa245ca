import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';
import { dataRuns, HOLE_BLOCK_BYTES as B } from '../../controller/images/sparse/data-runs.js';

/** A piece of `blocks` blocks with random data in the listed ones and zeros elsewhere. */
function piece(blocks: number, data: number[]): Buffer {
  const buffer = Buffer.alloc(blocks * B);
  for (const block of data) randomBytes(B).copy(buffer, block * B);
  return buffer;
}

describe('sparse receive: where a piece holds data (controller/images/sparse/data-runs.ts)', () => {
  it('leaves out whole aligned zero blocks and joins the data blocks between them into runs', () => {
    assert.deepEqual(dataRuns(piece(8, [1, 2, 5]), 0), [
      [B, 3 * B],
      [5 * B, 6 * B],
    ]);
    assert.deepEqual(dataRuns(piece(4, []), 16 * B), [], 'all zeros: nothing to write');
    assert.deepEqual(dataRuns(piece(4, [0, 1, 2, 3]), 0), [[0, 4 * B]], 'all data: one write');
  });

  it('writes partial blocks at either end as they are, zeros or not: only whole blocks of the file can be holes', () => {
    // The piece starts 100 bytes into a block of the file: its first B - 100 bytes are a partial block.
    const zeros = Buffer.alloc(3 * B);
    assert.deepEqual(dataRuns(zeros, 100), [
      [0, B - 100],
      [3 * B - 100, 3 * B],
    ]);
    // A single byte of data in the middle of a block keeps the whole block.
    const one = Buffer.alloc(2 * B);
    one[B + 7] = 1;
    assert.deepEqual(dataRuns(one, 0), [[B, 2 * B]]);
  });

  it('takes a Uint8Array view into a larger buffer', () => {
    const whole = piece(4, [2]);
    const view = new Uint8Array(whole.buffer, whole.byteOffset + B, 3 * B);
    assert.deepEqual(dataRuns(view, B), [[B, 2 * B]]);
  });
});
