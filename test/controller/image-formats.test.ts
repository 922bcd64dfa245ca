import assert from 'node:assert/strict';
import { ManifestBuilder } from '../../common/chunk-manifest.js';
import { execFile, execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { chmodSync, createReadStream, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { after, before, describe, it } from 'node:test';
import { Status } from 'nice-grpc-common';
import { detectFormat, UnsupportedFormatError } from '../../controller/images/formats/detect.js';
import { INFO_LIMITS, QemuImgError, runQemuImg } from '../../controller/images/formats/qemu-img.js';
import { limitExtents } from '../../controller/images/formats/prepare.js';
import { type Image, ImageFormat, ImageState, type UploadImageRequest } from '../../gen/metalcast/v1/image.js';
import { eventually, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';

/*
 * Image formats at import: raw and qcow2 are told apart by content, qcow2 is
 * checked (backing file, external data file, virtual size, corrupt header)
 * before qemu-img converts it to raw, and everything else is refused by
 * name. Every qcow2 here is made by Debian's qemu-img, as an attacker or a
 * careless operator would make it.
 */

const MIB = 1024 * 1024;
const run = promisify(execFile);
const sha256 = (data: Uint8Array) => createHash('sha256').update(data).digest('hex');
const fileSha256 = (path: string) => sha256(readFileSync(path));
/**
 * Runs qemu-img for a fixture. Creating a LUKS image times PBKDF2 on the
 * thread's CPU clock first, and qemu-img gives up ("Unable to get accurate
 * CPU usage") when a round measured 0 ms, which a coarse CPU clock does now
 * and then (seen once on CI): that one error is tried again, twice at most.
 */
function qemuImg(...args: string[]): string {
  for (let attempt = 1; ; attempt++) {
    try {
      return execFileSync('qemu-img', args, { stdio: ['ignore', 'pipe', 'pipe'] }).toString();
    } catch (error) {
      const stderr = String((error as { stderr?: Buffer }).stderr ?? '');
      if (attempt >= 3 || !stderr.includes('Unable to get accurate CPU usage')) throw error;
    }
  }
}

async function* uploadRequests(
  name: string,
  data: Buffer,
  header: { sha256?: string } = {},
  pieceBytes = MIB,
): AsyncGenerator<UploadImageRequest> {
  yield { part: { $case: 'header', value: { name, sha256: header.sha256 ?? '', sizeBytes: data.byteLength } } };
  for (let at = 0; at < data.byteLength; at += pieceBytes) yield { part: { $case: 'data', value: data.subarray(at, at + pieceBytes) } };
}

/** A raw disk image of `size` bytes with random data in the given [offset, length] ranges and zeros elsewhere. */
function rawWithData(size: number, ranges: [number, number][]): Buffer {
  const raw = Buffer.alloc(size);
  for (const [offset, length] of ranges) randomBytes(length).copy(raw, offset);
  return raw;
}

describe('image formats: detection, qcow2 safety and conversion at import', () => {
  let t: TestController;
  const work = tempDir();
  const path = (name: string) => join(work.path, name);
  let http: Server;
  let base = '';

  before(async () => {
    // 64 MiB of virtual size at most, so that "oversize" is cheap to make.
    t = await startTestController({ maxImageVirtualSize: '64M', importStallTimeout: '5s' });
    http = createServer((request, response) => {
      const file = path((request.url ?? '/').slice(1));
      try {
        const data = readFileSync(file);
        response.writeHead(200, { 'content-length': data.length }).end(data);
      } catch {
        response.writeHead(404).end();
      }
    });
    await new Promise<void>((resolve) => http.listen(0, '127.0.0.1', resolve));
    base = `http://127.0.0.1:${(http.address() as AddressInfo).port}`;
  });
  after(async () => {
    http.closeAllConnections();
    await new Promise((resolve) => http.close(resolve));
    await t.destroy();
    work.remove();
  });

  const upload = (name: string, data: Buffer, header: { sha256?: string } = {}, pieceBytes = MIB) =>
    t.images.uploadImage(uploadRequests(name, data, header, pieceBytes));
  /** Bytes the stored blob of an image takes on disk (its holes take none). */
  const blobDiskBytes = (sha: string) => statSync(join(t.dataDir, 'images', 'blobs', sha)).blocks * 512;
  const incoming = () => readdirSync(join(t.dataDir, 'images', 'incoming'));
  async function download(name: string): Promise<Buffer> {
    const parts: Buffer[] = [];
    for await (const message of t.images.downloadImage({ name, offset: 0 })) {
      if (message.part?.$case === 'chunk') parts.push(Buffer.from(message.part.value.data));
    }
    return Buffer.concat(parts);
  }

  it('converts a qcow2 upload to raw, keeping both checksums and the allocated extents', async () => {
    const raw = rawWithData(32 * MIB, [
      [0, 2 * MIB],
      [10 * MIB, MIB],
    ]);
    writeFileSync(path('good.raw'), raw);
    // Compressed, as distributions ship their cloud images.
    qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', path('good.raw'), path('good.qcow2'));
    const qcow2 = readFileSync(path('good.qcow2'));
    assert.notEqual(qcow2.length, raw.length);

    const { image } = await upload('good-qcow2', qcow2, { sha256: sha256(qcow2) });
    assert.ok(image);
    assert.equal(image.state, ImageState.IMAGE_STATE_READY);
    assert.equal(image.format, ImageFormat.IMAGE_FORMAT_QCOW2);
    assert.equal(image.sizeBytes, 32 * MIB, 'the image is its virtual size');
    assert.equal(image.sha256, sha256(raw), 'sha256 is the raw content');
    assert.equal(image.sourceSha256, sha256(qcow2), 'source_sha256 is the qcow2 file');
    assert.equal(image.sourceSizeBytes, qcow2.length);
    assert.equal(image.allocatedBytes, 3 * MIB);
    assert.equal(image.allocatedExtentCount, 2);
    assert.deepEqual(await t.controller.store.getImageExtents('good-qcow2'), [
      [0, 2 * MIB],
      [10 * MIB, MIB],
    ]);
    const served = await download('good-qcow2');
    assert.equal(sha256(served), sha256(raw), 'what a node receives is the raw image');
    assert.deepEqual(incoming(), [], 'no temporary file is left behind');
  });

  it('metalcast image upload sends a qcow2 as it is, and image show says what it became', async () => {
    const bin = fileURLToPath(new URL('../../bin/metalcast.js', import.meta.url));
    const env = {
      ...process.env,
      METALCAST_CONTROLLER: t.controller.grpcAddress,
      METALCAST_TOKEN: t.adminToken,
      METALCAST_INSECURE: 'true',
    };
    const raw = rawWithData(16 * MIB, [[4 * MIB, MIB]]);
    writeFileSync(path('cli.raw'), raw);
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', path('cli.raw'), path('cli.qcow2'));
    // Asynchronously: the controller runs in this process.
    const cli = async (...args: string[]) => (await run(process.execPath, [bin, ...args], { env })).stdout;
    const uploaded = await cli('image', 'upload', path('cli.qcow2'), '--name', 'from-cli');
    assert.match(uploaded, new RegExp(`uploaded cli\\.qcow2 as image from-cli: .*sha256 ${fileSha256(path('cli.qcow2'))}`));
    assert.match(uploaded, new RegExp(`qcow2, stored as raw: 16\\.0 MiB, sha256 ${sha256(raw)}`));
    const shown = await cli('image', 'show', 'from-cli');
    assert.match(shown, /format\s+qcow2 as sent \(.*\), stored as raw; 1\.0 MiB of data in 1 extents \(6\.3%\), the rest zeros/);
    // The chunk manifest is over the raw bytes a node receives, not over the qcow2 as sent.
    const builder = new ManifestBuilder(MIB);
    builder.update(raw);
    assert.match(shown, new RegExp(`manifest\\s+16 chunks of 1\\.0 MiB, root ${builder.finish().manifest.rootSha256}`));
    const listed = JSON.parse(await cli('image', 'list', '--json')) as Image[];
    assert.equal(listed.find((image) => image.name === 'from-cli')?.format, 'qcow2' as unknown as ImageFormat);
  });

  it('keeps a raw upload as it is and records where its data lies', async () => {
    const raw = rawWithData(8 * MIB, [
      [MIB, MIB],
      [5 * MIB, 512 * 1024],
    ]);
    const { image } = await upload('plain-raw', raw);
    assert.equal(image?.format, ImageFormat.IMAGE_FORMAT_RAW);
    assert.equal(image?.sha256, sha256(raw));
    assert.equal(image?.sourceSha256, sha256(raw));
    assert.equal(image?.sizeBytes, raw.length);
    assert.equal(image?.allocatedBytes, MIB + 512 * 1024);
    assert.deepEqual(await t.controller.store.getImageExtents('plain-raw'), [
      [MIB, MIB],
      [5 * MIB, 512 * 1024],
    ]);
  });

  it('stores a raw upload sparse whatever its pieces: zero blocks are left holes as they arrive, in pieces of any size', async () => {
    // Data that ends inside a block, and a zero block inside a data block's neighbourhood.
    const raw = rawWithData(6 * MIB + 1000, [
      [4096, 8192],
      [3 * MIB + 100, 5000],
      [6 * MIB, 1000],
    ]);
    const extents = [
      [4096, 8192],
      [3 * MIB, 8192],
      [6 * MIB, 1000],
    ];
    for (const [name, pieceBytes] of [
      ['sparse-aligned', MIB],
      ['sparse-unaligned', 100_001],
    ] as const) {
      const { image } = await upload(name, raw, {}, pieceBytes);
      assert.equal(image?.sha256, sha256(raw), name);
      assert.equal(image?.sizeBytes, raw.length, name);
      assert.deepEqual(await t.controller.store.getImageExtents(name), extents, `${name}: where the data lies`);
      assert.equal(image?.allocatedBytes, 8192 + 8192 + 1000, name);
      // Holes take no disk: the blob holds its three data ranges (whole blocks), not 6 MiB.
      assert.ok(blobDiskBytes(sha256(raw)) <= 5 * 4096, `${name}: the blob takes ${blobDiskBytes(sha256(raw))} bytes on disk`);
      assert.equal(sha256(await download(name)), sha256(raw), `${name}: what a node receives`);
      await t.images.deleteImage({ name });
    }
  });

  it('refuses a qcow2 with a backing file', async () => {
    writeFileSync(path('base.raw'), Buffer.alloc(MIB, 1));
    qemuImg('create', '-f', 'qcow2', '-b', path('base.raw'), '-F', 'raw', path('overlay.qcow2'));
    await assertRejectsWith(
      upload('overlay', readFileSync(path('overlay.qcow2'))),
      Status.INVALID_ARGUMENT,
      /backing file.*flatten it first/,
    );
    assert.equal((await t.controller.store.getImage('overlay')) === undefined, true, 'a refused upload leaves no image');
    assert.deepEqual(incoming(), []);
  });

  it('refuses a qcow2 with an external data file (the CVE-2024-32498 shape)', async () => {
    // The data file is a host file the image would expose: /etc/passwd in the attack.
    qemuImg('create', '-f', 'qcow2', '-o', `data_file=${path('data.raw')}`, path('with-data-file.qcow2'), '1M');
    await assertRejectsWith(
      upload('data-file', readFileSync(path('with-data-file.qcow2'))),
      Status.INVALID_ARGUMENT,
      /external data file.*refused/,
    );
  });

  it('refuses a qcow2 whose virtual size is above --max-image-virtual-size', async () => {
    qemuImg('create', '-f', 'qcow2', path('huge.qcow2'), '1G');
    const error = await assertRejectsWith(
      upload('huge', readFileSync(path('huge.qcow2'))),
      Status.INVALID_ARGUMENT,
      /virtual size is 1073741824 bytes, more than this controller accepts \(--max-image-virtual-size, 67108864 bytes\)/,
    );
    assert.match(error.details, /^qcow2 image refused/);
  });

  it('refuses a qcow2 whose header is marked corrupt', async () => {
    qemuImg('create', '-f', 'qcow2', path('corrupt-flag.qcow2'), '1M');
    const data = readFileSync(path('corrupt-flag.qcow2'));
    // Incompatible feature bit 1, "corrupt", as QEMU sets it when it finds the metadata inconsistent.
    data.writeBigUInt64BE(data.readBigUInt64BE(72) | 2n, 72);
    await assertRejectsWith(upload('corrupt-flag', data), Status.INVALID_ARGUMENT, /header marks the image corrupt/);
  });

  it('refuses a qcow2 whose header qemu-img cannot read, with qemu-img’s reason', async () => {
    qemuImg('create', '-f', 'qcow2', path('bad-l1.qcow2'), '1M');
    const data = readFileSync(path('bad-l1.qcow2'));
    // An L1 table offset that is not cluster-aligned: only QEMU's own parser knows this is wrong.
    data.writeBigUInt64BE(0x10001n, 40);
    await assertRejectsWith(
      upload('bad-l1', data),
      Status.INVALID_ARGUMENT,
      /qcow2 image refused: qemu-img cannot read the qcow2 header: .*L1/i,
    );
    // Truncated to less than a header.
    await assertRejectsWith(upload('truncated', data.subarray(0, 48)), Status.INVALID_ARGUMENT, /header is truncated/);
  });

  it('refuses other formats by name, with what to do instead', async () => {
    const made: [string, string[], RegExp][] = [
      ['vmdk', ['create', '-f', 'vmdk'], /the image is VMDK, which metalcast does not deploy; convert it/],
      ['vhdx', ['create', '-f', 'vhdx'], /the image is VHDX/],
      ['vdi', ['create', '-f', 'vdi'], /the image is VDI/],
      ['vpc', ['create', '-f', 'vpc'], /the image is VHD \(dynamic\)/],
      ['vpc-fixed', ['create', '-f', 'vpc', '-o', 'subformat=fixed'], /the image is VHD \(fixed\)/],
      ['qed', ['create', '-f', 'qed'], /the image is QED/],
      [
        'luks',
        ['create', '--object', 'secret,id=s0,data=metalcast', '-f', 'luks', '-o', 'key-secret=s0,iter-time=10'],
        /the image is LUKS-encrypted/,
      ],
    ];
    for (const [name, args, expected] of made) {
      qemuImg(...args, path(`x.${name}`), '2M');
      await assertRejectsWith(upload(`other-${name}`, readFileSync(path(`x.${name}`))), Status.INVALID_ARGUMENT, expected);
    }
    writeFileSync(path('disk.raw.gz'), execFileSync('gzip', ['-c'], { input: Buffer.alloc(MIB, 7) }));
    await assertRejectsWith(
      upload('gz', readFileSync(path('disk.raw.gz'))),
      Status.INVALID_ARGUMENT,
      /gzip-compressed.*decompress it first/,
    );
    assert.deepEqual(incoming(), []);
  });

  it('does the same for URL imports: converts qcow2, fails a backing-file qcow2 with the reason', async () => {
    const raw = rawWithData(4 * MIB, [[MIB, MIB]]);
    writeFileSync(path('served.raw'), raw);
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', path('served.raw'), path('served.qcow2'));
    await t.images.importImage({ name: 'imported', url: `${base}/served.qcow2`, checksum: `sha256:${fileSha256(path('served.qcow2'))}` });
    const ready = await eventually(async () => {
      const { image } = await t.images.getImage({ name: 'imported' });
      return image?.state === ImageState.IMAGE_STATE_READY ? image : undefined;
    });
    assert.equal(ready.format, ImageFormat.IMAGE_FORMAT_QCOW2);
    assert.equal(ready.sha256, sha256(raw));
    assert.equal(ready.sourceSha256, fileSha256(path('served.qcow2')));
    assert.equal(ready.allocatedBytes, MIB);

    qemuImg('create', '-f', 'qcow2', '-b', path('served.raw'), '-F', 'raw', path('served-overlay.qcow2'));
    await t.images.importImage({
      name: 'imported-overlay',
      url: `${base}/served-overlay.qcow2`,
      checksum: `sha256:${fileSha256(path('served-overlay.qcow2'))}`,
    });
    const failed: Image = await eventually(async () => {
      const { image } = await t.images.getImage({ name: 'imported-overlay' });
      return image?.state === ImageState.IMAGE_STATE_FAILED ? image : undefined;
    });
    assert.match(failed.error, /qcow2 image refused: the qcow2 image has a backing file/);
  });

  it('a 2 GiB-virtual qcow2 with 600 MiB written records 600 MiB allocated (what the wire needs to carry)', async () => {
    const big = await startTestController({});
    try {
      qemuImg('create', '-q', '-f', 'qcow2', path('sparse.qcow2'), '2G');
      execFileSync('qemu-io', ['-c', 'write -P 0x5a 0 300M', '-c', 'write -P 0xa5 1G 300M', path('sparse.qcow2')], { stdio: 'ignore' });
      const { image } = await big.images.uploadImage(
        (async function* () {
          yield { part: { $case: 'header' as const, value: { name: 'sparse', sha256: '', sizeBytes: 0 } } };
          for await (const chunk of createReadStream(path('sparse.qcow2'), { highWaterMark: MIB })) {
            yield { part: { $case: 'data' as const, value: chunk as Buffer } };
          }
        })(),
      );
      assert.equal(image?.sizeBytes, 2 * 1024 * MIB);
      assert.equal(image?.allocatedBytes, 600 * MIB);
      assert.deepEqual(await big.controller.store.getImageExtents('sparse'), [
        [0, 300 * MIB],
        [1024 * MIB, 300 * MIB],
      ]);
    } finally {
      await big.destroy();
    }
  });
});

describe('image formats: pieces', () => {
  it('detects by content, not by name', () => {
    assert.equal(detectFormat(Buffer.from('QFI\xfb\0\0\0\x03', 'latin1')), 'qcow2');
    assert.equal(detectFormat(Buffer.alloc(4096)), 'raw');
    assert.throws(() => detectFormat(Buffer.from('QFI\xfb\0\0\0\x01', 'latin1')), UnsupportedFormatError);
    assert.throws(() => detectFormat(Buffer.from('BZh9')), /bzip2-compressed/);
    // "BZh" without a block size digit is not bzip2: raw.
    assert.equal(detectFormat(Buffer.from('BZhx')), 'raw');
  });

  it('runs qemu-img under a CPU-time limit: a qemu-img that spins is stopped and named', async () => {
    const dir = tempDir();
    try {
      const spinner = join(dir.path, 'qemu-img');
      writeFileSync(spinner, '#!/bin/sh\nwhile :; do :; done\n');
      chmodSync(spinner, 0o755);
      await assert.rejects(
        runQemuImg(['info', 'x'], { ...INFO_LIMITS, cpuSeconds: 1 }, { binary: spinner, timeoutMs: 60_000 }),
        (error: unknown) => error instanceof QemuImgError && /stopped at its limit of 1 s of CPU time/.test(error.message),
      );
    } finally {
      dir.remove();
    }
  });

  it('caps the number of extents by filling the smallest gaps', () => {
    const many: [number, number][] = Array.from({ length: 1000 }, (_, i) => [i * 8192, 4096]);
    const capped = limitExtents(many, 100);
    assert.ok(capped.length <= 100);
    assert.equal(capped[0]?.[0], 0);
    const last = capped.at(-1) as [number, number];
    assert.equal(last[0] + last[1], 999 * 8192 + 4096, 'the end of the data is kept');
  });
});
