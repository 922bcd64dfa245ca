import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { AlignedBlocks, DIRECT_ALIGNMENT, DirectWriter } from '../../common/disk-writes/direct-writes.js';
import { tempDir } from '../helpers/controller.js';

/*
 * common/disk-writes/direct-writes.ts against real files: the blocks are aligned
 * for O_DIRECT, aligned pieces bypass the page cache where the file system
 * allows it, unaligned ones go the ordinary way, and every byte lands.
 */

const MIB = 1024 * 1024;

describe('image writes that bypass the page cache', () => {
  const dirs = tempDir('metalcast-direct-');
  after(() => dirs.remove());

  it('hands out page-aligned blocks of one memory, aligned zeros, and an ordinary buffer beyond a block', () => {
    const blocks = new AlignedBlocks(3, MIB);
    const taken = [blocks.take(MIB), blocks.take(4096), blocks.take(1000)];
    for (const block of taken) {
      assert.equal(block.buffer, blocks.memory);
      assert.equal(block.byteOffset % DIRECT_ALIGNMENT, 0);
    }
    assert.equal(new Set(taken.map((b) => b.byteOffset)).size, 3, 'three different blocks');
    assert.ok(blocks.aligned(taken[0]!.subarray(0, 8192)));
    assert.ok(!blocks.aligned(taken[0]!.subarray(0, 1000)), 'an odd length is not for O_DIRECT');
    assert.ok(!blocks.aligned(taken[0]!.subarray(512, 4608)), 'nor an odd start');
    assert.ok(!blocks.aligned(Buffer.alloc(8192)), 'nor memory from elsewhere');
    const zeros = blocks.zeros(MIB);
    assert.ok(blocks.aligned(zeros) && zeros.every((b) => b === 0));
    assert.notEqual(blocks.take(2 * MIB).buffer, blocks.memory, 'a piece larger than a block gets its own buffer');
    assert.notEqual(blocks.take(MIB).buffer, blocks.memory, 'more takes than blocks get their own buffers');
    blocks.giveBack(taken[1]!);
    assert.equal(blocks.take(MIB), taken[1], 'a block given back is used again');
  });

  it('writes aligned pieces with O_DIRECT on a disk file and unaligned ones the ordinary way; the file ends byte-exact', async () => {
    const path = join(dirs.path, 'disk');
    const size = 6 * MIB + 1000;
    writeFileSync(path, Buffer.alloc(size + MIB, 0x5a));
    const image = randomBytes(size);
    const blocks = new AlignedBlocks(2, 4 * MIB);
    const writer = await DirectWriter.open(path, blocks);
    // os.tmpdir() is on ext4 here, which takes O_DIRECT; a file system that does not gets ordinary writes.
    if (process.env.CI) assert.ok(writer.bypassesPageCache, `${path} takes O_DIRECT`);
    try {
      const first = blocks.take(4 * MIB);
      image.copy(first, 0, 0, 4 * MIB);
      const second = blocks.take(4 * MIB);
      image.copy(second, 0, 4 * MIB, 6 * MIB);
      await Promise.all([
        writer.write(first.subarray(0, 4 * MIB), 0), // aligned
        writer.write(second.subarray(0, 2 * MIB), 4 * MIB), // aligned
        writer.write(Buffer.from(image.subarray(6 * MIB)), 6 * MIB), // the last 1000 bytes: ordinary
      ]);
      await writer.write(blocks.zeros(8192), 6 * MIB + 4096); // aligned zeros past the image
      await writer.file.sync();
    } finally {
      await writer.close();
    }
    const disk = readFileSync(path);
    assert.ok(disk.subarray(0, size).equals(image), 'the image is on the disk');
    assert.ok(
      disk.subarray(size, 6 * MIB + 4096).every((b) => b === 0x5a),
      'nothing written between',
    );
    assert.ok(
      disk.subarray(6 * MIB + 4096, 6 * MIB + 12_288).every((b) => b === 0),
      'the zeros',
    );
    assert.ok(
      disk.subarray(6 * MIB + 12_288).every((b) => b === 0x5a),
      'nothing written after',
    );
    assert.equal(disk.length, size + MIB, 'the file kept its size');
  });
});
