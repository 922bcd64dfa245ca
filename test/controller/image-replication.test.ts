import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { after, before, describe, it } from 'node:test';
import { createClient } from 'nice-grpc';
import { Status } from 'nice-grpc-common';
import { agentMetadata } from '../../common/agent-metadata.js';
import { hashAgentToken } from '../../controller/agents/agent-tokens.js';
import { ImageServiceDefinition, ImageState, type UploadImageRequest } from '../../gen/metalcast/v1/image.js';
import { eventually, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { freePort } from '../helpers/controller-process.js';
import { assertClientError, assertRejectsWith } from '../helpers/grpc-assert.js';
import { makeImageContent, sha256 } from '../helpers/images.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';

const MIB = 1024 * 1024;
const BIN = fileURLToPath(new URL('../../bin/metalcast.js', import.meta.url));
const run = promisify(execFile);

type ImageClient = ReturnType<typeof createClient<typeof ImageServiceDefinition>>;

async function* uploadRequests(name: string, data: Buffer): AsyncGenerator<UploadImageRequest> {
  yield { part: { $case: 'header', value: { name, sha256: '', sizeBytes: data.byteLength } } };
  for (let at = 0; at < data.byteLength; at += MIB) yield { part: { $case: 'data', value: data.subarray(at, at + MIB) } };
}

/** The whole image through DownloadImage: the header's sha256 and size, and the bytes. */
async function download(images: ImageClient, name: string): Promise<{ sha256: string; sizeBytes: number; data: Buffer }> {
  const chunks: Buffer[] = [];
  let header: { sha256: string; sizeBytes: number } | undefined;
  for await (const message of images.downloadImage({ name, offset: 0 }, { signal: AbortSignal.timeout(20_000) })) {
    if (message.part?.$case === 'header') header = message.part.value;
    else if (message.part?.$case === 'chunk') chunks.push(message.part.value.data);
  }
  assert.ok(header, 'the download began with a header');
  return { ...header, data: Buffer.concat(chunks) };
}

/**
 * Polls DownloadImage until it succeeds. Each UNAVAILABLE answer also tells
 * the controller's replicator that a reader waits, so it looks at once
 * rather than at its next interval.
 */
async function downloadEventually(images: ImageClient, name: string, timeoutMs = 30_000) {
  return eventually(() => download(images, name), { timeoutMs, intervalMs: 200, what: `image ${name} to be downloadable` });
}

/** A real HTTP server that serves one body per path and counts the requests. */
async function startHttp(): Promise<{
  server: Server;
  base: string;
  serve: (path: string, body: Buffer) => void;
  hits: Map<string, number>;
}> {
  const bodies = new Map<string, Buffer>();
  const hits = new Map<string, number>();
  const server = createServer((request, response) => {
    const path = request.url ?? '/';
    hits.set(path, (hits.get(path) ?? 0) + 1);
    const body = bodies.get(path);
    if (!body) return void response.writeHead(404).end();
    response.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': body.byteLength });
    response.end(body);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    server,
    base: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    serve: (path, body) => bodies.set(path, body),
    hits,
  };
}

describe('image replication: two controllers sharing one SQLite database', () => {
  const shared = tempDir('metalcast-replication-');
  const database = `sqlite:${join(shared.path, 'shared.db')}`;
  let a: TestController;
  let b: TestController;
  let imagesA: ImageClient;
  let imagesB: ImageClient;
  /** A's gRPC API as the other controllers see it: through a proxy, so that a test can break the copy. */
  let proxyToA: TcpProxy;
  let http: Awaited<ReturnType<typeof startHttp>>;

  before(async () => {
    http = await startHttp();
    const portA = await freePort();
    proxyToA = await TcpProxy.start(`127.0.0.1:${portA}`);
    // --image-sync-interval makes the periodic look (which is what finds deletions) quick; the
    // copies themselves are prompted by the readers below. Small chunks make a broken copy visible.
    const common = { database, imageSyncInterval: '500ms', imageChunkSize: '256K' };
    a = await startTestController({ ...common, controllerId: 'a', listen: `127.0.0.1:${portA}`, advertiseAddress: proxyToA.address });
    b = await startTestController({ ...common, controllerId: 'b' });
    imagesA = createClient(ImageServiceDefinition, a.channel, a.operatorOptions);
    imagesB = createClient(ImageServiceDefinition, b.channel, b.operatorOptions);
    await eventually(async () => (await b.controller.store.listControllers()).length === 2, { what: 'both controllers registered' });
  });

  after(async () => {
    await b?.destroy();
    await a?.destroy();
    await proxyToA?.close();
    http?.server.closeAllConnections();
    await new Promise((resolve) => http?.server.close(resolve));
    shared.remove();
  });

  it('copies an image uploaded to A to B, which serves the same content (DownloadImage and the CLI)', async () => {
    const content = makeImageContent(6 * MIB + 123, 1);
    const { image } = await imagesA.uploadImage(uploadRequests('uploaded', content));
    assert.equal(image?.sha256, sha256(content));

    const fromB = await downloadEventually(imagesB, 'uploaded');
    assert.equal(fromB.sha256, sha256(content));
    assert.equal(fromB.sizeBytes, content.byteLength);
    assert.ok(fromB.data.equals(content), 'B serves exactly the uploaded bytes');
    assert.ok(existsSync(b.controller.imageFiles.blobPath(sha256(content))), 'B keeps its own copy');

    const dir = tempDir('metalcast-download-');
    try {
      const output = join(dir.path, 'out.img');
      const env = {
        ...process.env,
        METALCAST_CONTROLLER: b.controller.grpcAddress,
        METALCAST_TOKEN: b.adminToken,
        METALCAST_INSECURE: 'true',
      };
      const { stdout } = await run(process.execPath, [BIN, 'image', 'download', 'uploaded', '--output', output], { env });
      assert.match(stdout, new RegExp(`downloaded image uploaded to .*sha256 ${sha256(content)} verified`));
      assert.ok(readFileSync(output).equals(content));
      assert.ok(!existsSync(`${output}.part`), 'no partial file is left');
      await assert.rejects(
        run(process.execPath, [BIN, 'image', 'download', 'uploaded', '--output', output], { env }),
        /already exists; choose another --output, or add --force/,
      );
    } finally {
      dir.remove();
    }
  });

  it('copies an image imported on A to B, which fetches it from the URL itself', async () => {
    const content = makeImageContent(3 * MIB + 7, 2);
    http.serve('/imported.img', content);
    await imagesA.importImage({ name: 'imported', url: `${http.base}/imported.img`, checksum: `sha256:${sha256(content)}` });
    await eventually(async () => (await imagesA.getImage({ name: 'imported' })).image?.state === ImageState.IMAGE_STATE_READY, {
      what: 'the import on A',
    });

    const fromB = await downloadEventually(imagesB, 'imported');
    assert.equal(fromB.sha256, sha256(content));
    assert.ok(fromB.data.equals(content));
    assert.equal(http.hits.get('/imported.img'), 2, 'A imported it, and B copied it from the same URL');
  });

  it('answers ReadImage on B with UNAVAILABLE while the content is on its way, then serves it', async () => {
    // A ready row whose content no controller has yet: B cannot copy it until it lands on A.
    const content = makeImageContent(2 * MIB + 5, 3);
    const digest = sha256(content);
    await a.controller.store.createImage({
      name: 'late',
      state: 'ready',
      sha256: digest,
      sizeBytes: content.byteLength,
      sourceUrl: '',
      expectedChecksum: '',
      error: '',
    });
    // A node being deployed with it, with an agent token, as an agent would read it.
    const store = a.controller.store;
    const node = await store.createNode(
      { name: 'late-node', macAddresses: ['aa:bb:cc:00:10:01'], properties: {} },
      { kind: 'created', message: 'test', actor: 'test', fromState: null, toState: 'enroll' },
    );
    const deploying = await store.transition(node.uuid, {
      from: ['enroll'],
      to: 'deploy_wait',
      target: 'active',
      keepAgentToken: false,
      deployJson: JSON.stringify({ image: 'late' }),
      event: { kind: 'provision', message: 'deploy (test)', actor: 'test', fromState: 'enroll', toState: 'deploy_wait' },
    });
    assert.ok(deploying);
    const token = 'replication-test-token';
    await store.setAgentToken(node.uuid, hashAgentToken(token), 'api-token');
    const metadata = agentMetadata(node.uuid, token);
    const readAll = async () => {
      const chunks: Buffer[] = [];
      for await (const chunk of b.gateway.readImage({ image: 'late', offset: 0, length: 0 }, { metadata })) {
        chunks.push(chunk.zero ? Buffer.alloc(chunk.length) : chunk.data);
      }
      return Buffer.concat(chunks);
    };

    // StatImage announces the chunk manifest, which is built from the content: it waits for the content too.
    await assertRejectsWith(
      b.gateway.statImage({ image: 'late' }, { metadata }),
      Status.UNAVAILABLE,
      /still being copied to this controller from another controller; retry/,
    );
    try {
      await readAll();
      assert.fail('ReadImage on B succeeded without the content');
    } catch (error) {
      assertClientError(error, Status.UNAVAILABLE, /still being copied to this controller from another controller; retry/);
    }
    await assertRejectsWith(download(imagesB, 'late'), Status.UNAVAILABLE, /not on this controller yet/);

    const stored = await a.controller.imageFiles.receive([content]);
    stored.release();
    const read = await eventually(readAll, { timeoutMs: 30_000, intervalMs: 250, what: 'ReadImage on B to serve the content' });
    assert.equal(sha256(read), digest);
    const stat = await b.gateway.statImage({ image: 'late' }, { metadata });
    assert.equal(stat.sha256, digest, 'StatImage answers once the content is here');
    assert.ok(stat.manifestChunkCount > 0, 'with the manifest built from it');
  });

  it('resumes a copy broken mid-stream from the bytes already received', async () => {
    const content = makeImageContent(32 * MIB, 4);
    // Slow enough to cut in the middle; only B's copy goes through the proxy.
    proxyToA.throttle(16 * MIB);
    try {
      await imagesA.uploadImage(uploadRequests('broken', content));
      const before = proxyToA.stats.bytesFromTarget;
      // Prompt B (UNAVAILABLE until the copy is done), then cut every connection half-way.
      await assertRejectsWith(download(imagesB, 'broken'), Status.UNAVAILABLE);
      await eventually(() => proxyToA.stats.bytesFromTarget - before >= 20 * MIB, { intervalMs: 10, what: '20 MiB copied' });
      const atCut = proxyToA.stats.bytesFromTarget - before;
      proxyToA.resetAll();
      proxyToA.throttle(0);

      const fromB = await downloadEventually(imagesB, 'broken');
      assert.equal(sha256(fromB.data), sha256(content));
      const afterCut = proxyToA.stats.bytesFromTarget - before - atCut;
      // What B had not written yet when the link broke is at most the HTTP/2 window (4 MiB) and grpc-js's
      // buffers (about 34 chunks of 256 KiB) on the way: a resume asks for much less than the whole image.
      assert.ok(
        afterCut < content.byteLength - atCut + 10 * MIB,
        `after the cut at ${atCut} bytes, ${afterCut} more went through: the copy started over`,
      );
      assert.ok(proxyToA.stats.acceptedConnections >= 2, 'B connected again');
    } finally {
      proxyToA.throttle(0);
    }
  });

  it('resumes a broken CLI download and verifies it', async () => {
    const content = makeImageContent(24 * MIB, 6);
    await imagesA.uploadImage(uploadRequests('cli-broken', content));
    const dir = tempDir('metalcast-download-');
    proxyToA.throttle(16 * MIB);
    try {
      const output = join(dir.path, 'out.img');
      const env = { ...process.env, METALCAST_CONTROLLER: proxyToA.address, METALCAST_TOKEN: a.adminToken, METALCAST_INSECURE: 'true' };
      const cli = run(process.execPath, [BIN, 'image', 'download', 'cli-broken', '--output', output], { env });
      // Cut once the CLI itself has written a good part (B may be copying through the same proxy).
      await eventually(() => (existsSync(`${output}.part`) ? statSync(`${output}.part`).size >= 6 * MIB : false), {
        intervalMs: 10,
        what: '6 MiB downloaded',
      });
      proxyToA.resetAll();
      proxyToA.throttle(0);
      const { stdout, stderr } = await cli;
      assert.match(stderr, /download interrupted at \d+ bytes .*; resuming in/);
      assert.match(stdout, /sha256 [0-9a-f]{64} verified, 1 resumes/);
      assert.ok(readFileSync(output).equals(content));
    } finally {
      proxyToA.throttle(0);
      dir.remove();
    }
  });

  it('removes B’s copy once the image is deleted on A', async () => {
    // Other images remain: a controller never collects when the database lists no image at all.
    const content = makeImageContent(MIB + 1, 5);
    const digest = sha256(content);
    await imagesA.uploadImage(uploadRequests('doomed', content));
    await downloadEventually(imagesB, 'doomed');
    assert.ok(existsSync(b.controller.imageFiles.blobPath(digest)));

    await imagesA.deleteImage({ name: 'doomed' });
    assert.ok(!existsSync(a.controller.imageFiles.blobPath(digest)), 'A removes its blob at once');
    await assertRejectsWith(imagesB.getImage({ name: 'doomed' }), Status.NOT_FOUND);
    await eventually(() => !existsSync(b.controller.imageFiles.blobPath(digest)), {
      // Two looks of B's (--image-sync-interval) after the delete; 35 s where that option is missing (30 s default).
      timeoutMs: 35_000,
      intervalMs: 100,
      what: "B's blob of the deleted image to be removed",
    });
  });
});
