import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { after, before, describe, it } from 'node:test';
import { isAbortError } from 'abort-controller-x';
import { createClient } from 'nice-grpc';
import { Status } from 'nice-grpc-common';
import { ImageServiceDefinition, ImageState, type UploadImageRequest } from '../../gen/metalcast/v1/image.js';
import { ProvisionAction } from '../../gen/metalcast/v1/node.js';
import { AsyncQueue } from '../../common/async-queue.js';
import { eventually, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';

const BIN = fileURLToPath(new URL('../../bin/metalcast.js', import.meta.url));
const run = promisify(execFile);

const sha256 = (data: Uint8Array) => createHash('sha256').update(data).digest('hex');

function* chunksOf(data: Buffer, size = 256 * 1024): Generator<Buffer> {
  for (let offset = 0; offset < data.byteLength; offset += size) yield data.subarray(offset, offset + size);
}

/** An upload: the header, then the data in chunks. */
async function* uploadRequests(
  name: string,
  data: Buffer,
  header: { sha256?: string; sizeBytes?: number } = {},
): AsyncGenerator<UploadImageRequest> {
  yield { part: { $case: 'header', value: { name, sha256: header.sha256 ?? '', sizeBytes: header.sizeBytes ?? data.byteLength } } };
  for (const chunk of chunksOf(data)) yield { part: { $case: 'data', value: chunk } };
}

describe('image service: uploads, list, get, delete', () => {
  let t: TestController;
  let images: ReturnType<typeof createClient<typeof ImageServiceDefinition>>;
  let blobs: string;
  let incoming: string;

  before(async () => {
    t = await startTestController();
    images = createClient(ImageServiceDefinition, t.channel, t.operatorOptions);
    blobs = join(t.dataDir, 'images', 'blobs');
    incoming = join(t.dataDir, 'images', 'incoming');
  });
  after(async () => t.destroy());

  const incomingFiles = () => readdirSync(incoming);
  const blobExists = (hex: string) => existsSync(join(blobs, hex));

  it('stores an upload under its sha256 and reports it ready', async () => {
    const data = randomBytes(3 * 1024 * 1024 + 17);
    const { image } = await images.uploadImage(uploadRequests('round-trip', data));
    assert.equal(image?.state, ImageState.IMAGE_STATE_READY);
    assert.equal(image?.sizeBytes, data.byteLength);
    assert.equal(image?.sha256, sha256(data));
    assert.equal(image?.sourceUrl, '');
    assert.equal(sha256(readFileSync(join(blobs, sha256(data)))), sha256(data));

    const { image: got } = await images.getImage({ name: 'round-trip' });
    assert.deepEqual(got, image);
    const { images: all } = await images.listImages({});
    assert.ok(all.some((i) => i.name === 'round-trip'));
    assert.deepEqual(incomingFiles(), []);
  });

  it('keeps the blob it has when the same content is uploaded again under another name, and drops the new copy', async () => {
    const data = randomBytes(5 * 1024 * 1024 + 3);
    await images.uploadImage(uploadRequests('first-name', data));
    const before = statSync(join(blobs, sha256(data))).ino;
    const { image } = await images.uploadImage(uploadRequests('second-name', data));
    assert.equal(image?.sha256, sha256(data));
    assert.equal(statSync(join(blobs, sha256(data))).ino, before, 'the same file: readers and the page cache keep it');
    assert.deepEqual(incomingFiles(), [], 'the new copy is gone');
    await images.deleteImage({ name: 'first-name' });
    assert.ok(blobExists(sha256(data)), 'still used by second-name');
    assert.equal(sha256(readFileSync(join(blobs, sha256(data)))), sha256(data));
    await images.deleteImage({ name: 'second-name' });
    assert.ok(!blobExists(sha256(data)), 'gone with its last image');
  });

  it('accepts an upload whose expected sha256 matches', async () => {
    const data = randomBytes(100_000);
    const { image } = await images.uploadImage(uploadRequests('with-sha', data, { sha256: sha256(data) }));
    assert.equal(image?.sha256, sha256(data));
  });

  it('refuses an upload whose sha256 differs and keeps nothing of it', async () => {
    const data = randomBytes(1024 * 1024);
    const wrong = sha256(Buffer.from('something else'));
    await assertRejectsWith(
      images.uploadImage(uploadRequests('wrong-sha', data, { sha256: wrong })),
      Status.INVALID_ARGUMENT,
      /sha256 mismatch/,
    );
    await assertRejectsWith(images.getImage({ name: 'wrong-sha' }), Status.NOT_FOUND);
    assert.equal(blobExists(sha256(data)), false);
    assert.equal(blobExists(wrong), false);
    assert.deepEqual(incomingFiles(), []);
  });

  it('refuses an upload that sends more or less than its announced size', async () => {
    const data = randomBytes(10_000);
    await assertRejectsWith(images.uploadImage(uploadRequests('short', data, { sizeBytes: 20_000 })), Status.INVALID_ARGUMENT, /announced/);
    await assertRejectsWith(images.uploadImage(uploadRequests('long', data, { sizeBytes: 5_000 })), Status.INVALID_ARGUMENT, /announced/);
    await assertRejectsWith(images.getImage({ name: 'short' }), Status.NOT_FOUND);
    await assertRejectsWith(images.getImage({ name: 'long' }), Status.NOT_FOUND);
    assert.equal(blobExists(sha256(data)), false);
  });

  it('keeps nothing of an upload the client cancels midway', async () => {
    const queue = new AsyncQueue<UploadImageRequest>();
    const cancel = new AbortController();
    const data = randomBytes(512 * 1024);
    queue.push({ part: { $case: 'header', value: { name: 'cancelled', sha256: '', sizeBytes: 0 } } });
    queue.push({ part: { $case: 'data', value: data } });
    const call = images.uploadImage(queue, { signal: cancel.signal });
    const outcome = call.then(
      () => assert.fail('the upload should not succeed'),
      (error: unknown) => error,
    );
    await eventually(async () => (await images.getImage({ name: 'cancelled' })).image?.state === ImageState.IMAGE_STATE_IMPORTING, {
      what: 'the reserved row',
    });
    await eventually(() => incomingFiles().length === 1, { what: 'the temporary file' });
    cancel.abort();
    assert.ok(isAbortError(await outcome));
    await eventually(
      async () => {
        const left = await t.controller.store.getImage('cancelled');
        if (left) throw new Error(`the row is still there: ${JSON.stringify(left)}; incoming: ${incomingFiles().join(', ') || 'empty'}`);
        return incomingFiles().length === 0;
      },
      { what: 'the cancelled upload to be cleaned up' },
    );
    assert.equal(blobExists(sha256(data)), false);
  });

  it('refuses a taken name before storing anything', async () => {
    const first = randomBytes(1000);
    await images.uploadImage(uploadRequests('taken', first));
    const second = randomBytes(2000);
    await assertRejectsWith(images.uploadImage(uploadRequests('taken', second)), Status.ALREADY_EXISTS, /already exists.*delete/);
    const { image } = await images.getImage({ name: 'taken' });
    assert.equal(image?.sha256, sha256(first));
    assert.equal(blobExists(sha256(second)), false);
  });

  it('refuses uploads without a header, with two headers, or without data', async () => {
    async function* dataFirst(): AsyncGenerator<UploadImageRequest> {
      yield { part: { $case: 'data', value: Buffer.from('abc') } };
    }
    await assertRejectsWith(images.uploadImage(dataFirst()), Status.INVALID_ARGUMENT, /first message.*header/);

    async function* nothing(): AsyncGenerator<UploadImageRequest> {}
    await assertRejectsWith(images.uploadImage(nothing()), Status.INVALID_ARGUMENT, /first message.*header/);

    async function* twoHeaders(): AsyncGenerator<UploadImageRequest> {
      yield { part: { $case: 'header', value: { name: 'two-headers', sha256: '', sizeBytes: 0 } } };
      yield { part: { $case: 'data', value: Buffer.from('abc') } };
      yield { part: { $case: 'header', value: { name: 'two-headers', sha256: '', sizeBytes: 0 } } };
    }
    await assertRejectsWith(images.uploadImage(twoHeaders()), Status.INVALID_ARGUMENT, /only the first message/);
    await assertRejectsWith(images.getImage({ name: 'two-headers' }), Status.NOT_FOUND);

    await assertRejectsWith(images.uploadImage(uploadRequests('empty', Buffer.alloc(0))), Status.INVALID_ARGUMENT, /empty/);
    await assertRejectsWith(images.getImage({ name: 'empty' }), Status.NOT_FOUND);
    assert.deepEqual(incomingFiles(), []);
  });

  it('validates the header', async () => {
    const data = Buffer.from('x');
    await assertRejectsWith(
      images.uploadImage(uploadRequests('-bad', data)),
      Status.INVALID_ARGUMENT,
      /header\.name.*not a valid image name/,
    );
    await assertRejectsWith(images.uploadImage(uploadRequests('', data)), Status.INVALID_ARGUMENT, /header\.name/);
    await assertRejectsWith(
      images.uploadImage(uploadRequests('bad-sha', data, { sha256: 'ABC' })),
      Status.INVALID_ARGUMENT,
      /header\.sha256.*64 lower-case hex/,
    );
    await assertRejectsWith(
      images.uploadImage(uploadRequests('too-big', data, { sizeBytes: 2 ** 52 })),
      Status.INVALID_ARGUMENT,
      /--max-image-size/,
    );
  });

  it('deletes an image and its blob; NOT_FOUND for unknown names', async () => {
    const data = randomBytes(4096);
    await images.uploadImage(uploadRequests('to-delete', data));
    assert.ok(blobExists(sha256(data)));
    await images.deleteImage({ name: 'to-delete' });
    await assertRejectsWith(images.getImage({ name: 'to-delete' }), Status.NOT_FOUND);
    assert.equal(blobExists(sha256(data)), false);
    await assertRejectsWith(images.deleteImage({ name: 'to-delete' }), Status.NOT_FOUND, /not found/);
  });

  it('keeps a blob that another image still uses', async () => {
    const data = randomBytes(4096);
    const { image: a } = await images.uploadImage(uploadRequests('shared-a', data));
    const { image: b } = await images.uploadImage(uploadRequests('shared-b', data));
    assert.equal(a?.sha256, b?.sha256);
    await images.deleteImage({ name: 'shared-a' });
    assert.ok(blobExists(sha256(data)), 'the blob is still used by shared-b');
    assert.equal((await images.getImage({ name: 'shared-b' })).image?.state, ImageState.IMAGE_STATE_READY);
    await images.deleteImage({ name: 'shared-b' });
    assert.equal(blobExists(sha256(data)), false);
  });

  it('refuses to delete an image while a node is being deployed with it', async () => {
    const data = randomBytes(4096);
    await images.uploadImage(uploadRequests('in-use', data));
    const { node } = await t.nodes.createNode({ name: 'deploy-target', macAddresses: ['aa:bb:cc:dd:ee:91'] });
    assert.ok(node);
    await t.nodes.setProvisionState({ node: node.uuid, action: ProvisionAction.PROVISION_ACTION_MANAGE });
    const moved = await t.controller.store.transition(node.uuid, {
      from: ['manageable'],
      to: 'deploy_wait',
      target: 'active',
      keepAgentToken: false,
      deployJson: JSON.stringify({ image: 'in-use' }),
      event: { kind: 'provision', message: 'deploy (test)', actor: 'test', fromState: 'manageable', toState: 'deploy_wait' },
    });
    assert.ok(moved);
    await assertRejectsWith(images.deleteImage({ name: 'in-use' }), Status.FAILED_PRECONDITION, /deploy-target/);
    assert.ok(blobExists(sha256(data)));
    assert.equal((await images.getImage({ name: 'in-use' })).image?.state, ImageState.IMAGE_STATE_READY);
  });

  it('uploads through the CLI and lists the image', async () => {
    const dir = tempDir('metalcast-cli-');
    try {
      const file = join(dir.path, 'tiny.img');
      const data = randomBytes(2 * 1024 * 1024 + 5);
      writeFileSync(file, data);
      const env = {
        ...process.env,
        METALCAST_CONTROLLER: t.controller.grpcAddress,
        METALCAST_TOKEN: t.adminToken,
        METALCAST_INSECURE: 'true',
      };
      const upload = await run(process.execPath, [BIN, 'image', 'upload', file, '--name', 'from-cli'], { env });
      assert.match(upload.stdout, /uploaded tiny\.img as image from-cli/);
      assert.match(upload.stdout, new RegExp(sha256(data)));

      const list = await run(process.execPath, [BIN, 'image', 'list', '--json'], { env });
      const listed = JSON.parse(list.stdout) as { name: string; state: string; sizeBytes: number; sha256: string }[];
      const mine = listed.find((i) => i.name === 'from-cli');
      assert.deepEqual(
        { state: mine?.state, sizeBytes: mine?.sizeBytes, sha256: mine?.sha256 },
        { state: 'ready', sizeBytes: data.byteLength, sha256: sha256(data) },
      );

      const refused = await run(process.execPath, [BIN, 'image', 'upload', file, '--name', 'from-cli'], { env }).then(
        () => assert.fail('a second upload under the same name should fail'),
        (error: { code: number; stderr: string }) => error,
      );
      assert.equal(refused.code, 1);
      assert.match(refused.stderr, /ALREADY_EXISTS/);

      // With --sha256 the controller's check against it is the end-to-end one (the CLI does not hash again).
      const named = await run(process.execPath, [BIN, 'image', 'upload', file, '--name', 'cli-with-sha', '--sha256', sha256(data)], {
        env,
      });
      assert.match(named.stdout, new RegExp(`as image cli-with-sha: .*sha256 ${sha256(data)}`));
      const wrong = sha256(Buffer.from('another file'));
      const mismatch = await run(process.execPath, [BIN, 'image', 'upload', file, '--name', 'cli-wrong-sha', '--sha256', wrong], {
        env,
      }).then(
        () => assert.fail('an upload whose content differs from --sha256 should fail'),
        (error: { code: number; stderr: string }) => error,
      );
      assert.notEqual(mismatch.code, 0);
      assert.match(mismatch.stderr, new RegExp(`sha256 mismatch: expected ${wrong}, received content has ${sha256(data)}`));
      await assertRejectsWith(images.getImage({ name: 'cli-wrong-sha' }), Status.NOT_FOUND);
    } finally {
      dir.remove();
    }
  });
});

describe('image service: stalled uploads', () => {
  it('abandons an upload that sends nothing for the stall timeout, keeping nothing', async () => {
    const t = await startTestController({ importStallTimeout: '300ms' });
    const queue = new AsyncQueue<UploadImageRequest>();
    try {
      const images = createClient(ImageServiceDefinition, t.channel, t.operatorOptions);
      queue.push({ part: { $case: 'header', value: { name: 'stalled', sha256: '', sizeBytes: 0 } } });
      queue.push({ part: { $case: 'data', value: randomBytes(1000) } });
      await assertRejectsWith(images.uploadImage(queue), Status.DEADLINE_EXCEEDED, /no data for 300 ms/);
      await assertRejectsWith(images.getImage({ name: 'stalled' }), Status.NOT_FOUND);
      assert.deepEqual(readdirSync(join(t.dataDir, 'images', 'incoming')), []);
    } finally {
      queue.end();
      await t.destroy();
    }
  });
});
