import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { open, stat, truncate, writeFile } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createChannel, createClient } from 'nice-grpc';
import { agentMetadata, agentMetadataFields } from '../../common/agent-metadata.js';
import { ManifestBuilder } from '../../common/chunk-manifest.js';
import { FastAgentGatewayServiceDefinition } from '../../common/read-image-codec.js';
import { loadAgentConfig } from '../../agent/config/config.js';
import type { ImageSource } from '../../agent/imaging/image-source.js';
import { DEFAULT_WRITE_OPTIONS } from '../../agent/imaging/image-writer.js';
import { writeImage } from '../../agent/imaging/write-image.js';
import type { NodeRecord } from '../../controller/store/store.js';
import type { CommandProgress, WriteImageResult } from '../../gen/metalcast/v1/command.js';
import { lookup } from '../helpers/agent-client.js';
import { eventually, startTestController, type TestController, tempDir, testLogger } from '../helpers/controller.js';
import { addImage, sha256 } from '../helpers/images.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';

/*
 * The agent's image writer against the chunk manifest (docs/chunk-manifest.md),
 * in process against a real controller: its gRPC server on a real port,
 * reached through a TcpProxy that counts every byte the controller sends,
 * and a disk file. The node is put in deploy_wait through the store (no agent
 * process: the writer under test is the agent's), so that the controller
 * authorises the reads exactly as for a deploying agent.
 */

const KIB = 1024;
const MIB = 1024 * KIB;
const MANIFEST_CHUNK = 256 * KIB;

const FLAGS: Record<string, string> = {
  heartbeatTimeout: '120s',
  sweepInterval: '500ms',
  startupGrace: '0s',
  imageChunkSize: '64K',
  imageManifestChunkSize: '256K',
};

const OPTIONS = { ...DEFAULT_WRITE_OPTIONS, stallTimeoutMs: 5000, backoffBaseMs: 50, backoffMaxMs: 200 };
const KEEPALIVE = { timeMs: 10_000, timeoutMs: 10_000 };

describe('image transfer against the chunk manifest', () => {
  let t: TestController;
  let proxy: TcpProxy;
  const dirs = tempDir('metalcast-chunks-');
  let node: NodeRecord;
  let source: ImageSource;
  let channel: ReturnType<typeof createChannel>;
  /** The call metadata as fields, for lane workers. */
  let laneMetadata: Record<string, string> = {};

  /** Points the node's deploy at `image` (deploy_wait, as the conductor leaves it while the agent writes). */
  async function deploying(image: string): Promise<void> {
    const moved = await t.controller.store.transition(node.uuid, {
      from: ['enroll', 'deploy_wait'],
      to: 'deploy_wait',
      target: 'active',
      keepAgentToken: true,
      deployJson: JSON.stringify({ image }),
      event: { kind: 'transition', message: `test: deploying ${image}`, actor: 'test', fromState: 'enroll', toState: 'deploy_wait' },
    });
    assert.ok(moved);
  }

  before(async () => {
    t = await startTestController(FLAGS);
    proxy = await TcpProxy.start(t.controller.grpcAddress);
    const mac = '52:54:00:c4:00:01';
    node = await t.controller.store.createNode({ name: 'chunks', macAddresses: [mac], properties: {} }, {
      kind: 'created',
      message: 'test',
      actor: 'test',
      fromState: null,
      toState: 'enroll',
    } as never);
    await deploying('none-yet');
    const { nodeUuid, agentToken } = await lookup(t.gateway, [mac]);
    channel = createChannel(proxy.address);
    const gateway = createClient(FastAgentGatewayServiceDefinition, channel);
    const metadata = agentMetadata(nodeUuid, agentToken);
    laneMetadata = agentMetadataFields(nodeUuid, agentToken);
    source = {
      stat: (image, signal) => gateway.statImage({ image }, { metadata, signal }),
      read: (image, offset, signal, length = 0) => gateway.readImage({ image, offset, length }, { metadata, signal }),
      manifest: (image, firstChunk, signal) => gateway.getImageManifest({ image, firstChunk }, { metadata, signal }),
      failed: () => {},
    };
  });
  after(async () => {
    channel?.close();
    await proxy?.close();
    await t?.destroy();
    dirs.remove();
  });

  /**
   * Writes `image` onto `disk` through the proxy, over `how.streams` connections at once (1 by default), with
   * `how.signal` and `how.report` when given; returns the result and the bytes the controller sent.
   */
  async function deploy(
    image: string,
    disk: string,
    from: ImageSource = source,
    how: { streams?: number; signal?: AbortSignal; report?: (progress: Partial<CommandProgress>) => void } = {},
  ): Promise<{ result: WriteImageResult; sent: number }> {
    await deploying(image);
    const before = proxy.stats.bytesFromTarget;
    const { size } = await stat(disk);
    const result = await writeImage(
      from,
      { image, devicePath: disk, deviceSizeBytes: size, expectedSha256: '', expectedSizeBytes: 0 },
      { ...OPTIONS, streams: how.streams ?? OPTIONS.streams },
      how.report ?? (() => {}),
      how.signal ?? new AbortController().signal,
      testLogger(),
    );
    return { result, sent: proxy.stats.bytesFromTarget - before };
  }

  /** The test's source, offering lanes (agent/imaging/lanes): each worker connects through the proxy itself. */
  function inLanesSource(): ImageSource {
    return {
      ...source,
      lanes: () => ({ endpoint: { address: proxy.address, caPem: undefined, keepalive: KEEPALIVE }, metadata: () => laneMetadata }),
    };
  }

  async function diskStart(disk: string, length: number): Promise<Buffer> {
    const file = await open(disk, 'r');
    try {
      const buffer = Buffer.alloc(length);
      await file.read(buffer, 0, length, 0);
      return buffer;
    } finally {
      await file.close();
    }
  }

  it('announces the manifest the image has: chunk size, count and the root over its bytes', async () => {
    const content = randomBytes(MANIFEST_CHUNK * 3 + 1000);
    content.fill(0, MANIFEST_CHUNK, 2 * MANIFEST_CHUNK);
    // Through the operator API: the manifest is built at upload.
    await t.images.uploadImage(
      (async function* () {
        yield { part: { $case: 'header' as const, value: { name: 'shown', sha256: '', sizeBytes: 0 } } };
        yield { part: { $case: 'data' as const, value: content } };
      })(),
    );
    const builder = new ManifestBuilder(MANIFEST_CHUNK);
    builder.update(content);
    const { manifest } = builder.finish();
    const { image } = await t.images.getImage({ name: 'shown' });
    assert.equal(image?.manifestChunkSizeBytes, MANIFEST_CHUNK);
    assert.equal(image?.manifestChunkCount, 4);
    assert.equal(image?.manifestRootSha256, manifest.rootSha256);
    await deploying('shown');
    const pages = [];
    for await (const page of source.manifest?.('shown', 0, new AbortController().signal) ?? []) pages.push(page);
    assert.equal(pages.length, 1);
    assert.deepEqual(Buffer.from(pages[0]?.chunkSha256s ?? []), manifest.digests);
    assert.deepEqual(pages[0]?.zeroChunks, [1], 'the all-zero chunk is marked');
  });

  it('a chunk corrupted in flight is detected, only it is fetched again, and the disk ends bit-exact', async () => {
    const content = randomBytes(8 * MIB);
    const { sha256: digest } = await addImage(t.controller, 'corrupt', content);
    const disk = join(dirs.path, 'corrupt.disk');
    await writeFile(disk, Buffer.alloc(10 * MIB));
    const bad = 13; // the chunk whose first delivery is corrupted
    const reads: { offset: number; length: number }[] = [];
    let corrupted = false;
    // The hook sits where a flipped bit on the path would land: in the bytes the agent receives.
    const corrupting: ImageSource = {
      ...source,
      async *read(image, offset, signal, length = 0) {
        reads.push({ offset, length });
        for await (const message of source.read(image, offset, signal, length)) {
          const at = bad * MANIFEST_CHUNK + 5000;
          if (!corrupted && !message.zero && message.offset <= at && at < message.offset + message.data.length) {
            corrupted = true;
            const data = Buffer.from(message.data);
            data.writeUInt8(data.readUInt8(at - message.offset) ^ 0x01, at - message.offset);
            yield { ...message, data };
          } else yield message;
        }
      },
    };
    const { result, sent } = await deploy('corrupt', disk, corrupting);
    assert.ok(corrupted, 'the hook corrupted a chunk');
    assert.equal(result.chunksRefetched, 1);
    assert.equal(result.chunksFetched, 32);
    assert.equal(result.sha256, digest);
    assert.deepEqual(reads, [
      { offset: 0, length: 8 * MIB },
      { offset: bad * MANIFEST_CHUNK, length: MANIFEST_CHUNK },
    ]);
    assert.ok(sent < content.length + 2 * MANIFEST_CHUNK, `${sent} bytes sent for an ${content.length}-byte image with one bad chunk`);
    assert.ok((await diskStart(disk, content.length)).equals(content), 'the disk holds the image');
  });

  it('over several connections at once (--image-streams 3), each on its own thread: the disk ends bit-exact, one connection per lane', async () => {
    // 40 MiB of 256 KiB chunks: three segments of 64 chunks (16 MiB) and a rest, spread over three lanes.
    const content = randomBytes(40 * MIB);
    content.fill(0, 20 * MIB, 21 * MIB); // a zero run: written locally, not fetched
    const { sha256: digest } = await addImage(t.controller, 'lanes', content);
    const disk = join(dirs.path, 'lanes.disk');
    await writeFile(disk, Buffer.alloc(42 * MIB, 0xaa)); // old data, so that the zero run must be written too
    const accepted = proxy.stats.acceptedConnections;
    const inLanes: ImageSource = {
      ...inLanesSource(),
      read: () => {
        throw new Error('a lane pass must not read on the agent thread');
      },
    };
    const { result } = await deploy('lanes', disk, inLanes, { streams: 3 });
    assert.equal(result.sha256, digest);
    assert.equal(result.chunksFetched, 160);
    assert.equal(result.bytesFromController, 39 * MIB, 'every chunk but the zero run came over the lanes');
    assert.equal(proxy.stats.acceptedConnections - accepted, 3, 'each lane opened its own connection');
    assert.ok((await diskStart(disk, content.length)).equals(content), 'the disk holds the image');
  });

  it("--image-streams takes 'auto' or 1 to 16, and a bad value is named with what it may be", () => {
    const streams = (value: string) => loadAgentConfig({ imageStreams: value, controller: '127.0.0.1:1' }, {}).imageStreams;
    assert.equal(streams('3'), 3);
    assert.equal(streams('auto'), Math.min(4, availableParallelism()));
    assert.throws(() => streams('lots'), /--image-streams: 'lots' is neither 'auto' nor a whole number from 1 to 16/);
    assert.throws(() => streams('0'), /--image-streams: 0 is not between 1 and 16/);
  });

  it('a lane whose connection breaks mid-transfer: the other lanes go on, its rest is fetched again, the disk ends bit-exact', async () => {
    const content = randomBytes(40 * MIB);
    const { sha256: digest } = await addImage(t.controller, 'lanes-broken', content);
    const disk = join(dirs.path, 'lanes-broken.disk');
    await writeFile(disk, Buffer.alloc(40 * MIB));
    proxy.throttle(8 * MIB);
    const reset = setTimeout(() => {
      proxy.resetAll();
      proxy.throttle(0);
    }, 1500);
    try {
      const { result } = await deploy('lanes-broken', disk, inLanesSource(), { streams: 2 });
      assert.equal(result.sha256, digest);
      assert.ok(result.resumes >= 1, 'the broken lanes were resumed');
      assert.ok((await diskStart(disk, content.length)).equals(content), 'the disk holds the image');
    } finally {
      clearTimeout(reset);
      proxy.throttle(0);
    }
  });

  it('a deploy cancelled while its lanes fetch ends at once, its lanes stopped', async () => {
    const content = randomBytes(40 * MIB);
    await addImage(t.controller, 'lanes-cancelled', content);
    const disk = join(dirs.path, 'lanes-cancelled.disk');
    await writeFile(disk, Buffer.alloc(40 * MIB));
    proxy.throttle(4 * MIB);
    const cancel = new AbortController();
    const received: number[] = [];
    // Cancelled once the lanes fetch (their worker threads take a while to start on a loaded machine), and timed from then.
    let cancelledAt = 0;
    const cancelNow = () => {
      if (cancelledAt > 0) return;
      cancelledAt = Date.now();
      cancel.abort(new Error('the test cancels'));
    };
    const fallback = setTimeout(cancelNow, 15_000);
    let armed = false;
    try {
      await assert.rejects(
        deploy('lanes-cancelled', disk, inLanesSource(), {
          streams: 2,
          signal: cancel.signal,
          report: (progress) => {
            received.push(progress.bytesFromController ?? 0);
            if (!armed && (progress.bytesFromController ?? 0) > 0) {
              armed = true;
              setTimeout(cancelNow, 300);
            }
          },
        }),
        /write_image cancelled at \d+ of \d+ bytes/,
      );
    } finally {
      clearTimeout(fallback);
      proxy.throttle(0);
    }
    assert.ok(Date.now() - cancelledAt < 5000, `ended ${Date.now() - cancelledAt} ms after the cancel`);
    assert.ok((received.at(-1) ?? 0) > 0, 'the lanes had started fetching');
    await eventually(() => proxy.stats.connections <= 1 || undefined, { timeoutMs: 5000, what: "the lanes' connections to close" });
  });

  it('a chunk that is corrupt at every delivery fails the deploy with the chunk named, after three tries', async () => {
    const content = randomBytes(2 * MIB);
    await addImage(t.controller, 'always-bad', content);
    const disk = join(dirs.path, 'always-bad.disk');
    await writeFile(disk, Buffer.alloc(3 * MIB));
    const corrupting: ImageSource = {
      ...source,
      async *read(image, offset, signal, length = 0) {
        for await (const message of source.read(image, offset, signal, length)) {
          if (!message.zero && message.offset === 2 * MANIFEST_CHUNK) {
            const data = Buffer.from(message.data);
            data.writeUInt8(data.readUInt8(0) ^ 0xff, 0);
            yield { ...message, data };
          } else yield message;
        }
      },
    };
    await assert.rejects(
      deploy('always-bad', disk, corrupting),
      /chunk 2 \(bytes 524288-786431\) failed verification 3 times: it hashes to [0-9a-f]{64}, the manifest says [0-9a-f]{64}/,
    );
  });

  it('a redeploy of an unchanged image sends under 1 % of it, a 1 %-changed image under 3 %, and the disk ends bit-exact', async (ctx) => {
    const size = 64 * MIB;
    const v1 = randomBytes(size);
    await addImage(t.controller, 'v1', v1);
    const disk = join(dirs.path, 'delta.disk');
    await writeFile(disk, Buffer.alloc(size + 4 * MIB));

    const first = await deploy('v1', disk);
    ctx.diagnostic(`first deploy: ${first.sent} bytes sent for ${size}`);
    assert.ok(first.sent >= size, 'the first deploy sends the whole image');
    assert.equal(first.result.chunksSkipped, 0);

    const again = await deploy('v1', disk);
    ctx.diagnostic(
      `redeploy: ${again.sent} bytes sent (${((100 * again.sent) / size).toFixed(2)} %), ${again.result.chunksSkipped} chunks skipped`,
    );
    assert.equal(again.result.chunksSkipped, size / MANIFEST_CHUNK);
    assert.equal(again.result.chunksFetched, 0);
    assert.equal(again.result.bytesSkipped, size);
    assert.ok(again.sent < size / 100, `an unchanged redeploy sent ${again.sent} bytes, 1 % is ${size / 100}`);

    // 1 % of the chunks change (a byte each, spread over the image).
    const v2 = Buffer.from(v1);
    const chunks = size / MANIFEST_CHUNK;
    const changed = Math.ceil(chunks / 100);
    for (let i = 0; i < changed; i++) {
      const at = Math.floor(((i + 0.5) * chunks) / changed) * MANIFEST_CHUNK + 777;
      v2[at] = (v2[at] as number) ^ 0x5a;
    }
    await addImage(t.controller, 'v2', v2);
    const delta = await deploy('v2', disk);
    ctx.diagnostic(
      `1 %-changed: ${delta.sent} bytes sent (${((100 * delta.sent) / size).toFixed(2)} %), ${delta.result.chunksFetched} chunks fetched`,
    );
    assert.equal(delta.result.chunksFetched, changed);
    assert.ok(delta.sent < (3 * size) / 100, `a 1 %-changed redeploy sent ${delta.sent} bytes, 3 % is ${(3 * size) / 100}`);
    assert.equal(sha256(await diskStart(disk, size)), sha256(v2), 'the disk holds the new image');
  });

  it("a blank disk file (no data blocks) has only the image's zero chunks read before fetching, and ends bit-exact", async () => {
    const size = 8 * MIB;
    const chunks = size / MANIFEST_CHUNK;
    const image = randomBytes(size);
    // Every fourth chunk is zeros, as an OS image's unused space.
    for (let i = 0; i < chunks; i += 4) image.fill(0, i * MANIFEST_CHUNK, (i + 1) * MANIFEST_CHUNK);
    const zeroChunks = chunks / 4;
    await addImage(t.controller, 'holes', image);
    const disk = join(dirs.path, 'blank.disk');
    await writeFile(disk, '');
    await truncate(disk, size + MIB);
    assert.equal((await stat(disk)).blocks, 0, 'the test needs a file system with sparse files');

    /** Deploys 'holes' and counts the chunks the delta scan read (one 'scanning' report each). */
    const deployCountingScans = async () => {
      await deploying('holes');
      let scanned = 0;
      const result = await writeImage(
        source,
        { image: 'holes', devicePath: disk, deviceSizeBytes: size + MIB, expectedSha256: '', expectedSizeBytes: 0 },
        OPTIONS,
        (progress) => {
          if (progress.phase === 'scanning') scanned++;
        },
        new AbortController().signal,
        testLogger(),
      );
      return { result, scanned };
    };
    const first = await deployCountingScans();
    assert.equal(first.scanned, zeroChunks, 'on a blank file only the zero chunks are read');
    assert.equal(first.result.chunksSkipped, zeroChunks, 'a blank file already holds the zero chunks');
    assert.equal(sha256(await diskStart(disk, size)), sha256(image), 'the disk holds the image');

    // The file now holds data: nothing is assumed, every chunk is read and matches.
    const again = await deployCountingScans();
    assert.equal(again.scanned, chunks);
    assert.equal(again.result.chunksSkipped, chunks);
    assert.equal(again.result.chunksFetched, 0);
  });

  it('builds the manifest of an image stored before manifests on first use, and checks it against its sha256', async () => {
    const content = randomBytes(MIB + 5);
    const { sha256: digest } = await addImage(t.controller, 'older', content);
    // An image from before migration 9: its row and content, no manifest.
    assert.equal(await t.controller.store.deleteImageManifest(digest), true);
    const disk = join(dirs.path, 'older.disk');
    await writeFile(disk, Buffer.alloc(2 * MIB));
    const { result } = await deploy('older', disk);
    assert.equal(result.chunksFetched, 5);
    const stored = await t.controller.store.getImageManifest(digest);
    assert.equal(stored?.digests.length, 5 * 32, 'the manifest was built and stored');
    assert.ok((await diskStart(disk, content.length)).equals(content));
  });
});
