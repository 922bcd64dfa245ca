import assert from 'node:assert/strict';
import type { FileHandle } from 'node:fs/promises';
import { describe, it } from 'node:test';
import { BackgroundFlush } from '../../common/disk-writes/positional-writes.js';

/** A file whose datasync the test settles by hand (a real one cannot be made to fail on demand). */
function fileWithManualSync() {
  const syncs: { resolve: () => void; reject: (error: Error) => void }[] = [];
  const file = {
    datasync: () => new Promise<void>((resolve, reject) => syncs.push({ resolve, reject })),
  } as unknown as FileHandle;
  return { file, syncs };
}

const tick = () => new Promise((resolve) => setImmediate(resolve));

describe('BackgroundFlush (common/disk-writes/positional-writes.ts)', () => {
  it('syncs once every so many bytes, one sync at a time, skipping what arrived while one ran', async () => {
    const { file, syncs } = fileWithManualSync();
    const flush = new BackgroundFlush(file, 100);
    flush.wrote(99);
    assert.equal(syncs.length, 0, 'not enough new bytes yet');
    flush.wrote(100);
    assert.equal(syncs.length, 1);
    flush.wrote(250);
    assert.equal(syncs.length, 1, 'one at a time');
    syncs[0]?.resolve();
    await tick();
    flush.wrote(260);
    assert.equal(syncs.length, 2, 'the bytes that came during the first sync count towards the next');
    flush.wrote(400);
    syncs[1]?.resolve();
    await flush.settled();
    flush.wrote(359);
    assert.equal(syncs.length, 2, 'counted from where the last sync started (260)');
    flush.wrote(360);
    assert.equal(syncs.length, 3);
    syncs[2]?.resolve();
    await flush.settled();
  });

  it('keeps a failed sync for settled(), and starts no more after it', async () => {
    const { file, syncs } = fileWithManualSync();
    const flush = new BackgroundFlush(file, 10);
    flush.wrote(10);
    syncs[0]?.reject(new Error('EIO: i/o error, fdatasync'));
    await tick();
    flush.wrote(100);
    assert.equal(syncs.length, 1, 'no sync after a failure');
    await assert.rejects(flush.settled(), /EIO/);
  });
});
