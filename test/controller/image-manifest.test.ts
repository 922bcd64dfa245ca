import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readdirSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ManifestBuilder } from '../../common/chunk-manifest.js';
import { ImageState } from '../../gen/metalcast/v1/image.js';
import { eventually, startTestController, type TestController } from '../helpers/controller.js';

/*
 * The chunk manifest at import (docs/chunk-manifest.md): built over the raw
 * bytes as they are stored, shown with the image, and checked against the
 * root digest the operator expects. An image whose manifest does not match
 * is refused and nothing of it is kept.
 */

const KIB = 1024;
const CHUNK = 64 * KIB;

describe('chunk manifests at import', () => {
  let t: TestController;
  let server: Server;
  let base = '';
  const content = randomBytes(10 * CHUNK + 123);
  content.fill(0, 2 * CHUNK, 4 * CHUNK);
  const sha256 = createHash('sha256').update(content).digest('hex');
  const builder = new ManifestBuilder(CHUNK);
  builder.update(content);
  const { manifest } = builder.finish();

  before(async () => {
    t = await startTestController({ imageManifestChunkSize: '64K' });
    server = createServer((_request, response) => {
      response.writeHead(200, { 'content-length': String(content.length) }).end(content);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(async () => {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
    await t.destroy();
  });

  async function imported(name: string) {
    return eventually(
      async () => {
        const { image } = await t.images.getImage({ name });
        return image && image.state !== ImageState.IMAGE_STATE_IMPORTING ? image : undefined;
      },
      { timeoutMs: 30_000, what: `import of ${name} to end` },
    );
  }

  it('refuses an image whose manifest root is not the one expected, with a clear error, and keeps nothing', async () => {
    const wrong = createHash('sha256').update('another image').digest('hex');
    await t.images.importImage({ name: 'wrong-root', url: `${base}/os.img`, checksum: `sha256:${sha256}`, manifestRootSha256: wrong });
    const image = await imported('wrong-root');
    assert.equal(image.state, ImageState.IMAGE_STATE_FAILED);
    assert.equal(
      image.error,
      `${base}/os.img: chunk manifest mismatch: the image's 11 chunks of 65536 bytes hash to root ${manifest.rootSha256}, but the import expects ${wrong}; check the image and that the manifest was made with the controller's --image-manifest-chunk-size`,
    );
    assert.deepEqual(
      readdirSync(join(t.dataDir, 'images', 'blobs')).filter((f) => f === sha256),
      [],
      'no blob kept',
    );
    assert.equal(await t.controller.store.getImageManifest(sha256), undefined, 'no manifest kept');
  });

  it('accepts the expected root and shows the manifest: chunk size, count and root, zero chunks marked', async () => {
    await t.images.importImage({
      name: 'right-root',
      url: `${base}/os.img`,
      checksum: `sha256:${sha256}`,
      manifestRootSha256: manifest.rootSha256,
    });
    const image = await imported('right-root');
    assert.equal(image.state, ImageState.IMAGE_STATE_READY, image.error);
    assert.equal(image.sha256, sha256, 'the whole-image sha256 is checked and kept as well');
    assert.equal(image.manifestChunkSizeBytes, CHUNK);
    assert.equal(image.manifestChunkCount, 11);
    assert.equal(image.manifestRootSha256, manifest.rootSha256);
    const stored = await t.controller.store.getImageManifest(sha256);
    assert.deepEqual(stored?.digests, manifest.digests);
    assert.deepEqual(stored?.zeroBitmap, Buffer.from([0b1100, 0]), 'chunks 2 and 3 are all zeros');
  });

  it('refuses a malformed expected root at once', async () => {
    await assert.rejects(
      t.images.importImage({ name: 'bad-root', url: `${base}/os.img`, checksum: `sha256:${sha256}`, manifestRootSha256: 'xyz' }),
      /manifest_root_sha256/,
    );
  });
});
