import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { BlobWriter } from '../../controller/images/blob-writer.js';
import { tempDir } from '../helpers/controller.js';

/*
 * controller/images/blob-writer.ts against real files on the test machine's
 * disk: pieces of any size land byte-exact, whole zero blocks stay holes,
 * and the blob does not end up in the page cache (fincore, util-linux).
 */

const MIB = 1024 * 1024;

/** Bytes of `path` in the page cache. */
function cachedBytes(path: string): number {
  return Number(execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', path], { encoding: 'utf8' }).trim());
}

describe('the file a blob is received into (controller/images/blob-writer.ts)', () => {
  const dirs = tempDir('metalcast-blob-writer-');
  after(() => dirs.remove());

  // 13 MiB + 1000: data, then 5 MiB of zeros (a whole 4 MiB block among them), data, and an odd tail.
  const content = Buffer.concat([randomBytes(3 * MIB + 4096), Buffer.alloc(5 * MIB), randomBytes(5 * MIB - 4096 + 1000)]);

  it('writes pieces of any size byte-exact, leaves the zero blocks holes, and keeps the blob out of the page cache', async () => {
    const path = join(dirs.path, 'odd-pieces');
    const blob = await BlobWriter.create(path);
    // os.tmpdir() is on ext4 here, which takes O_DIRECT; a file system that does not gets ordinary writes.
    if (process.env.CI) assert.ok(blob.bypassesPageCache, `${path} takes O_DIRECT`);
    try {
      for (let at = 0; at < content.length; at += 100_001) await blob.append(content.subarray(at, at + 100_001));
      await blob.finish();
    } finally {
      await blob.close();
    }
    if (blob.bypassesPageCache) {
      // Only the odd tail (less than a page of the last block) went through the cache.
      assert.ok(cachedBytes(path) <= 8192, `${cachedBytes(path)} bytes of the blob are in the page cache`);
    }
    const onDisk = statSync(path).blocks * 512;
    assert.ok(onDisk <= content.length - 5 * MIB + 64 * 1024, `the zeros take no disk: ${onDisk} bytes allocated`);
    assert.ok(readFileSync(path).equals(content), 'the file holds the content');
  });

  it('copies each piece before append returns: a receiver may fill the same buffer again (an upload gives it back to its pool)', async () => {
    const path = join(dirs.path, 'reused-buffer');
    const blob = await BlobWriter.create(path);
    const reused = Buffer.alloc(MIB);
    try {
      for (let at = 0; at < content.length; at += MIB) {
        const piece = content.subarray(at, at + MIB);
        piece.copy(reused);
        await blob.append(reused.subarray(0, piece.length));
        reused.fill(0xee); // what the pool's next user would do while the writes still run
      }
      await blob.finish();
    } finally {
      await blob.close();
    }
    assert.ok(readFileSync(path).equals(content), 'the file holds the content, not the refilled buffer');
  });

  it('an empty blob is an empty file', async () => {
    const path = join(dirs.path, 'empty');
    const blob = await BlobWriter.create(path);
    await blob.finish();
    await blob.close();
    assert.equal(statSync(path).size, 0);
  });
});
