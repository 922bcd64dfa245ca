import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readdirSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createClient } from 'nice-grpc';
import { Status } from 'nice-grpc-common';
import { IMPORT_STOPPED } from '../../controller/images/importer.js';
import { SqliteStore } from '../../controller/store/sqlite.js';
import { type Image, ImageServiceDefinition, ImageState } from '../../gen/metalcast/v1/image.js';
import { eventually, startTestController, type TestController } from '../helpers/controller.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';

type Handler = (request: IncomingMessage, response: ServerResponse, attempt: number) => void;

/** A real HTTP server on 127.0.0.1:0 whose paths answer as each test says, counting requests. */
class ImageHttpServer {
  private readonly handlers = new Map<string, Handler>();
  private readonly counts = new Map<string, number>();
  private readonly arrivals = new Map<string, (() => void)[]>();
  private server: Server | undefined;
  base = '';

  async start(): Promise<void> {
    this.server = createServer((request, response) => {
      const path = request.url ?? '/';
      const attempt = (this.counts.get(path) ?? 0) + 1;
      this.counts.set(path, attempt);
      for (const resolve of this.arrivals.get(path) ?? []) resolve();
      this.arrivals.delete(path);
      const handler = this.handlers.get(path);
      if (handler) handler(request, response, attempt);
      else response.writeHead(404).end();
    });
    await new Promise<void>((resolve) => this.server?.listen(0, '127.0.0.1', resolve));
    this.base = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  /** Registers a path; returns its full URL. */
  route(path: string, handler: Handler): string {
    this.handlers.set(path, handler);
    return `${this.base}${path}`;
  }

  requests(path: string): number {
    return this.counts.get(path) ?? 0;
  }

  /** Resolves when the next request for `path` arrives. */
  nextRequest(path: string): Promise<void> {
    return new Promise((resolve) => this.arrivals.set(path, [...(this.arrivals.get(path) ?? []), resolve]));
  }

  async stop(): Promise<void> {
    this.server?.closeAllConnections();
    await new Promise((resolve) => this.server?.close(resolve));
  }
}

const sha256 = (data: Uint8Array) => createHash('sha256').update(data).digest('hex');
const sha512 = (data: Uint8Array) => createHash('sha512').update(data).digest('hex');

function serve(data: Uint8Array): Handler {
  return (_request, response) => {
    response.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': data.byteLength });
    response.end(data);
  };
}

describe('image service: imports from URLs', () => {
  let t: TestController;
  let images: ReturnType<typeof createClient<typeof ImageServiceDefinition>>;
  const http = new ImageHttpServer();

  before(async () => {
    await http.start();
    t = await startTestController({ importAttempts: '4', importStallTimeout: '400ms' });
    images = createClient(ImageServiceDefinition, t.channel, t.operatorOptions);
  });
  after(async () => {
    await t.destroy();
    await http.stop();
  });

  const blobExists = (hex: string) => existsSync(join(t.dataDir, 'images', 'blobs', hex));
  const incomingFiles = () => readdirSync(join(t.dataDir, 'images', 'incoming'));

  async function settled(name: string, client = images): Promise<Image> {
    return eventually<Image | undefined>(
      async () => {
        const { image } = await client.getImage({ name });
        return image && image.state !== ImageState.IMAGE_STATE_IMPORTING ? image : undefined;
      },
      { timeoutMs: 30_000, what: `import of ${name} to finish` },
    ) as Promise<Image>;
  }

  it('imports with a sha256, answering at once with an importing image', async () => {
    const data = randomBytes(3 * 1024 * 1024 + 3);
    const url = http.route('/ok-sha256.img', serve(data));
    const { image } = await images.importImage({ name: 'imp-sha256', url, checksum: `sha256:${sha256(data)}` });
    assert.equal(image?.state, ImageState.IMAGE_STATE_IMPORTING);
    assert.equal(image?.sourceUrl, url);
    const done = await settled('imp-sha256');
    assert.equal(done.state, ImageState.IMAGE_STATE_READY, done.error);
    assert.equal(done.sha256, sha256(data));
    assert.equal(done.sizeBytes, data.byteLength);
    assert.equal(done.error, '');
    assert.ok(blobExists(sha256(data)));
    assert.equal(http.requests('/ok-sha256.img'), 1);
  });

  it('imports with a sha512 (upper-case hex accepted)', async () => {
    const data = randomBytes(1024 * 1024);
    const url = http.route('/ok-sha512.img', serve(data));
    await images.importImage({ name: 'imp-sha512', url, checksum: `sha512:${sha512(data).toUpperCase()}` });
    const done = await settled('imp-sha512');
    assert.equal(done.state, ImageState.IMAGE_STATE_READY, done.error);
    assert.equal(done.sha256, sha256(data));
    assert.ok(blobExists(sha256(data)));
  });

  it('fails at once on a 404, naming the status and the URL', async () => {
    const url = http.route('/missing.img', (_request, response) => response.writeHead(404, 'Not Found').end('no such file'));
    await images.importImage({ name: 'imp-404', url, checksum: `sha256:${'a'.repeat(64)}` });
    const done = await settled('imp-404');
    assert.equal(done.state, ImageState.IMAGE_STATE_FAILED);
    assert.match(done.error, /HTTP 404/);
    assert.ok(done.error.includes(url), done.error);
    assert.equal(http.requests('/missing.img'), 1);
  });

  it('retries 503 answers and then succeeds', async () => {
    const data = randomBytes(200_000);
    const url = http.route('/flaky.img', (request, response, attempt) => {
      if (attempt <= 2) response.writeHead(503, 'Service Unavailable').end();
      else serve(data)(request, response, attempt);
    });
    await images.importImage({ name: 'imp-flaky', url, checksum: `sha256:${sha256(data)}` });
    const done = await settled('imp-flaky');
    assert.equal(done.state, ImageState.IMAGE_STATE_READY, done.error);
    assert.equal(done.sha256, sha256(data));
    assert.equal(http.requests('/flaky.img'), 3);
  });

  it('fails on a checksum mismatch without retrying, and keeps nothing', async () => {
    const data = randomBytes(300_000);
    const url = http.route('/corrupt.img', serve(data));
    const expected = sha256(Buffer.from('the real image'));
    await images.importImage({ name: 'imp-corrupt', url, checksum: `sha256:${expected}` });
    const done = await settled('imp-corrupt');
    assert.equal(done.state, ImageState.IMAGE_STATE_FAILED);
    assert.match(done.error, /sha256 mismatch/);
    assert.equal(done.sha256, '');
    assert.equal(blobExists(sha256(data)), false);
    assert.equal(blobExists(expected), false);
    assert.deepEqual(incomingFiles(), []);
    assert.equal(http.requests('/corrupt.img'), 1);
  });

  it('retries a download that stalls halfway', async () => {
    const data = randomBytes(1024 * 1024);
    const url = http.route('/stall.img', (request, response, attempt) => {
      if (attempt === 1) {
        response.writeHead(200, { 'content-length': data.byteLength });
        response.write(data.subarray(0, data.byteLength / 2)); // and then nothing
      } else serve(data)(request, response, attempt);
    });
    await images.importImage({ name: 'imp-stall', url, checksum: `sha256:${sha256(data)}` });
    const done = await settled('imp-stall');
    assert.equal(done.state, ImageState.IMAGE_STATE_READY, done.error);
    assert.equal(done.sizeBytes, data.byteLength);
    assert.equal(http.requests('/stall.img'), 2);
    assert.deepEqual(incomingFiles(), []);
  });

  it('validates the request and refuses a taken name', async () => {
    const url = `${http.base}/whatever.img`;
    const checksum = `sha256:${'b'.repeat(64)}`;
    await assertRejectsWith(
      images.importImage({ name: 'x', url: 'file:///etc/passwd', checksum }),
      Status.INVALID_ARGUMENT,
      /use http or https/,
    );
    await assertRejectsWith(images.importImage({ name: 'x', url: 'not a url', checksum }), Status.INVALID_ARGUMENT, /url:.*not a URL/);
    await assertRejectsWith(
      images.importImage({ name: 'x', url: `${url}?${'q'.repeat(2100)}`, checksum }),
      Status.INVALID_ARGUMENT,
      /2048/,
    );
    await assertRejectsWith(images.importImage({ name: 'x', url, checksum: 'md5:abc' }), Status.INVALID_ARGUMENT, /sha256:<64 hex digits>/);
    await assertRejectsWith(images.importImage({ name: 'x', url, checksum: 'sha256:abc' }), Status.INVALID_ARGUMENT, /64 hex digits/);
    await assertRejectsWith(images.importImage({ name: 'x', url, checksum: '' }), Status.INVALID_ARGUMENT, /checksum: required/);
    await assertRejectsWith(images.importImage({ name: '', url, checksum }), Status.INVALID_ARGUMENT, /name/);
    await assertRejectsWith(images.importImage({ name: 'imp-sha256', url, checksum }), Status.ALREADY_EXISTS, /already exists/);
    await assertRejectsWith(images.getImage({ name: 'x' }), Status.NOT_FOUND);
  });

  it('stops an import when its image is deleted', async () => {
    const path = '/hang-delete.img';
    const url = http.route(path, (_request, response) => {
      response.writeHead(200, { 'content-length': 1000 });
      response.write(Buffer.alloc(10));
    });
    const arrived = http.nextRequest(path);
    await images.importImage({ name: 'imp-deleted', url, checksum: `sha256:${'c'.repeat(64)}` });
    await arrived;
    await images.deleteImage({ name: 'imp-deleted' });
    await assertRejectsWith(images.getImage({ name: 'imp-deleted' }), Status.NOT_FOUND);
    await eventually(() => incomingFiles().length === 0, { what: 'the temporary file to go' });
    assert.equal(http.requests(path), 1);
  });

  it('hides credentials in the URL it stores and reports', async () => {
    const data = randomBytes(1000);
    let authorization: string | undefined;
    const url = http.route('/private.img', (request, response, attempt) => {
      authorization = request.headers.authorization;
      serve(data)(request, response, attempt);
    });
    const withCredentials = url.replace('http://', 'http://alice:s3cret@');
    const { image } = await images.importImage({ name: 'imp-private', url: withCredentials, checksum: `sha256:${sha256(data)}` });
    assert.equal(image?.sourceUrl, url.replace('http://', 'http://***@'));
    const done = await settled('imp-private');
    assert.equal(done.state, ImageState.IMAGE_STATE_READY, done.error);
    assert.equal(authorization, `Basic ${Buffer.from('alice:s3cret').toString('base64')}`);
  });
});

describe('image service: imports across stops and attempts', () => {
  const http = new ImageHttpServer();
  before(async () => http.start());
  after(async () => http.stop());

  it('gives up after the configured attempts on connection errors, with the last reason', async () => {
    const t = await startTestController({ importAttempts: '2' });
    try {
      const images = createClient(ImageServiceDefinition, t.channel, t.operatorOptions);
      // A port nobody listens on: take one from a server and close it.
      const closed = new ImageHttpServer();
      await closed.start();
      await closed.stop();
      await images.importImage({ name: 'refused', url: `${closed.base}/x.img`, checksum: `sha256:${'d'.repeat(64)}` });
      const done = await eventually(
        async () => {
          const { image } = await images.getImage({ name: 'refused' });
          return image?.state === ImageState.IMAGE_STATE_FAILED ? image : undefined;
        },
        { timeoutMs: 30_000, what: 'the import to fail' },
      );
      assert.match(done?.error ?? '', /gave up after 2 attempts: cannot download .*ECONNREFUSED/);
    } finally {
      await t.destroy();
    }
  });

  it('marks an import failed when the controller stops, and cleans up unfinished uploads at start', async () => {
    let t = await startTestController({ importStallTimeout: '60s' });
    try {
      const path = '/hang-stop.img';
      const url = http.route(path, (_request, response) => {
        response.writeHead(200, { 'content-length': 1000 });
        response.write(Buffer.alloc(10));
      });
      const arrived = http.nextRequest(path);
      await t.images.importImage({ name: 'interrupted', url, checksum: `sha256:${'e'.repeat(64)}` });
      await arrived;
      // Rows a crashed controller would leave: an import and an upload still 'importing'.
      await t.controller.store.createImage({
        name: 'crashed-import',
        state: 'importing',
        sha256: '',
        sizeBytes: 0,
        sourceUrl: `${http.base}/gone.img`,
        expectedChecksum: `sha256:${'f'.repeat(64)}`,
        error: '',
      });
      await t.controller.store.createImage({
        name: 'crashed-upload',
        state: 'importing',
        sha256: '',
        sizeBytes: 0,
        sourceUrl: '',
        expectedChecksum: '',
        error: '',
      });

      // stop() aborts the import and records why, before the store closes.
      await t.stop();
      const store = SqliteStore.open(join(t.dataDir, 'metalcast.db'));
      const afterStop = await store.getImage('interrupted');
      await store.close();
      assert.equal(afterStop?.state, 'failed');
      assert.equal(afterStop?.error, IMPORT_STOPPED);

      t = await startTestController({}, t.dataDir);
      const images = createClient(ImageServiceDefinition, t.channel, t.operatorOptions);
      const { image: stopped } = await images.getImage({ name: 'interrupted' });
      assert.equal(stopped?.state, ImageState.IMAGE_STATE_FAILED);
      assert.equal(stopped?.error, IMPORT_STOPPED);
      const { image: crashed } = await images.getImage({ name: 'crashed-import' });
      assert.equal(crashed?.state, ImageState.IMAGE_STATE_FAILED);
      assert.equal(crashed?.error, IMPORT_STOPPED);
      await assertRejectsWith(images.getImage({ name: 'crashed-upload' }), Status.NOT_FOUND);
      assert.deepEqual(readdirSync(join(t.dataDir, 'images', 'incoming')), []);
    } finally {
      await t.destroy();
    }
  });
});
