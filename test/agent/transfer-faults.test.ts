import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { open, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { connect as connectHttp2, constants as http2Constants } from 'node:http2';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, afterEach, before, describe, it, type TestContext } from 'node:test';
import { ClientError, Status } from 'nice-grpc';
import type { ImageSource } from '../../agent/imaging/image-source.js';
import { DEFAULT_WRITE_OPTIONS } from '../../agent/imaging/image-writer.js';
import { writeImage } from '../../agent/imaging/write-image.js';
import { AgentGatewayServiceDefinition, ReadImageRequest } from '../../gen/metalcast/v1/agent_gateway.js';
import { ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { lookup } from '../helpers/agent-client.js';
import { type AgentProcess, spawnAgent } from '../helpers/agent-process.js';
import { eventually, startTestController, type TestController, tempDir, testLogger } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import {
  addImage,
  type ImageTransferCounters,
  imageTransferCounters,
  readDiskStart,
  resendAllowancePerFault,
  sha256,
  zeroChunkBytes,
} from '../helpers/images.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';

/*
 * Fault tests of the image transfer, through the real deploy flow: a real
 * controller in this process, a real agent process that reaches it through a
 * TcpProxy, and faults injected into the proxy while the agent writes.
 *
 * The proxy throttles to PROXY_RATE so that a 16 MiB image takes about four
 * seconds and a fault lands mid-transfer. Every test ends by comparing the
 * disk with the image and by counting the bytes the controller served twice
 * (metalcast_image_bytes_served_total beyond the image size) against
 * resendAllowancePerFault (test/helpers/images.ts): per fault one flow-control
 * window, 34 chunks (grpc-js's buffers on both sides, and the one half
 * received), and the image's zero chunks, which ride in the window for free.
 *
 * Also here: faults of the image file on the controller (corrupted,
 * truncated, missing), a controller restarted mid-transfer, and two
 * in-process checks that a test through the agent process cannot make
 * happen on purpose: a disk write failing while the stream breaks, and a
 * ReadImage blocked on a reader that grants no window.
 */

const MIB = 1024 * 1024;
const CHUNK_BYTES = 64 * 1024;
const IMAGE_BYTES = 16 * MIB + 12_345;
const PROXY_RATE = 4_000_000;
const STALL_MS = 2000;
/** Timers, logging and a busy machine: what a detection may take beyond its nominal time. */
const DETECTION_SLACK_MS = 1500;

const CONTROLLER_FLAGS: Record<string, string> = {
  heartbeatTimeout: '30s',
  heartbeatIntervalMin: '300ms',
  heartbeatIntervalMax: '600ms',
  sweepInterval: '500ms',
  heartbeatFlushInterval: '50ms',
  startupGrace: '0s',
  imageChunkSize: '64K',
  transferStallTimeout: `${STALL_MS}ms`,
  transferAttempts: '30',
  // Keepalive on both sides, but slower than the stall timer (an unanswered
  // ping counts after 6 s): a black hole must be caught by the stall timer,
  // which is under test; keepalive then ends the dead connection. A ping's
  // answer queues behind the data in flight (up to the 16 MiB flow-control
  // window, through this process's proxy), so a ping sent a second before
  // the black hole may be unanswered for longer than that: with 3 s,
  // keepalive sometimes won the race.
  keepaliveTime: '1s',
  keepaliveTimeout: '6s',
};
const AGENT_FLAGS: Record<string, string> = { 'keepalive-time': '1s', 'keepalive-timeout': '6s' };

/** The agent's log line for an interrupted transfer. */
const interrupted = (since: number) => (line: Record<string, unknown>) =>
  line.msg === 'image transfer interrupted; resuming from the last written offset' && Date.parse(String(line.time)) >= since;

/** Random image content with a zero stretch that does not start on a chunk boundary, and a partial last chunk. */
function imageContent(size: number): Buffer {
  const content = randomBytes(size);
  content.fill(0, 5 * MIB + 1000, 6 * MIB + 1000);
  return content;
}

/** The value of a gauge without labels. */
async function gauge(t: TestController, name: string): Promise<number> {
  const metric = t.controller.registry.getSingleMetric(name);
  if (!metric) throw new Error(`the controller has no metric ${name}`);
  return (await metric.get()).values[0]?.value ?? 0;
}

/** A ReadImage call over raw HTTP/2 by a reader that grants no flow-control window and so never receives data. */
interface StalledReader {
  /** The grpc-status once the call ended, else undefined. */
  status(): string | undefined;
  close(): Promise<void>;
}

async function stalledReadImage(address: string, headers: Record<string, string>, request: ReadImageRequest): Promise<StalledReader> {
  const session = connectHttp2(`http://${address}`, { settings: { initialWindowSize: 0 } });
  session.on('error', () => {});
  const stream = session.request({
    ':method': 'POST',
    ':path': `/${AgentGatewayServiceDefinition.fullName}/ReadImage`,
    'content-type': 'application/grpc',
    te: 'trailers',
    ...headers,
  });
  stream.on('error', () => {});
  let status: string | undefined;
  stream.on('response', (h) => {
    if (h['grpc-status'] !== undefined) status = String(h['grpc-status']);
  });
  stream.on('trailers', (h) => {
    status = String(h['grpc-status']);
  });
  const body = ReadImageRequest.encode(request).finish();
  const frame = Buffer.alloc(5 + body.length);
  frame.writeUInt32BE(body.length, 1);
  frame.set(body, 5);
  stream.end(frame);
  return {
    status: () => status,
    close: async () => {
      stream.close(http2Constants.NGHTTP2_CANCEL);
      await new Promise<void>((resolve) => session.close(() => resolve()));
    },
  };
}

/** One node being deployed through a proxy. */
interface Deploy {
  name: string;
  proxy: TcpProxy;
  agent: AgentProcess;
  /** The fake machine's root (its power-actions.log is there). */
  root: string;
  diskPath: string;
  macs: string[];
  content: Buffer;
  image: { sha256: string; size: number };
  before: ImageTransferCounters;
  startedAt: number;
}

/** What a test needs from the controller of the moment (it changes when one is restarted). */
interface Harness {
  t: () => TestController;
  agents: AgentProcess[];
  proxies: TcpProxy[];
}

function harness(h: Harness) {
  const nodes = () => h.t().nodes;
  const act = (node: string, action: ProvisionAction, image?: string) =>
    nodes().setProvisionState({ node, action, deploy: image ? { image, target: undefined } : undefined });
  const waitFor = (name: string, state: ProvisionState, timeoutMs = 30_000) =>
    eventually(
      async () => {
        const { node } = await nodes().getNode({ node: name });
        if (node?.provisionState === state) return node;
        if (node?.lastError) throw new Error(`node ${name} is ${ProvisionState[node.provisionState]}: ${node.lastError}`);
        return undefined;
      },
      { timeoutMs, what: `${name} to reach ${ProvisionState[state]}` },
    );

  /** Enrolls a machine whose agent goes through a throttled proxy, takes it to available, and starts deploying. */
  async function startDeploy(
    name: string,
    index: number,
    options: {
      imageBytes?: number;
      afterImageAdded?: (image: { sha256: string; size: number }) => Promise<void>;
      /** Kill the agent before deploying: the node waits in deploy_wait, and the test reads the image itself. */
      withoutAgent?: boolean;
    } = {},
  ): Promise<Deploy> {
    const t = h.t();
    const content = imageContent(options.imageBytes ?? IMAGE_BYTES);
    const image = await addImage(t.controller, `${name}-os`, content);
    await options.afterImageAdded?.(image);
    const proxy = await TcpProxy.start(t.controller.grpcAddress);
    h.proxies.push(proxy);
    proxy.throttle(PROXY_RATE);
    // Machines live in the controller's temporary data directory, and go with it.
    const machine = await uniqueFakeMachine(join(t.dataDir, 'machines', name), index);
    await t.nodes.createNode({ name, macAddresses: [machine.macs[0] as string] });
    await act(name, ProvisionAction.PROVISION_ACTION_MANAGE);
    await act(name, ProvisionAction.PROVISION_ACTION_INSPECT);
    const agent = spawnAgent({ controller: proxy.address, root: machine.root, ...AGENT_FLAGS });
    h.agents.push(agent);
    await waitFor(name, ProvisionState.PROVISION_STATE_MANAGEABLE);
    await act(name, ProvisionAction.PROVISION_ACTION_PROVIDE);
    await waitFor(name, ProvisionState.PROVISION_STATE_AVAILABLE);
    if (options.withoutAgent) await agent.kill('SIGKILL');
    const before = await imageTransferCounters(t.controller);
    const startedAt = Date.now();
    await act(name, ProvisionAction.PROVISION_ACTION_DEPLOY, `${name}-os`);
    return {
      name,
      proxy,
      agent,
      root: machine.root,
      diskPath: (machine.disks[0] as { path: string }).path,
      macs: machine.macs,
      content,
      image,
      before,
      startedAt,
    };
  }

  /** Resolves once the agent reports at least `bytes` written; fails at once if the deploy ended first (the fault would miss). */
  async function writtenAtLeast(d: Deploy, bytes: number): Promise<number> {
    const deadline = Date.now() + 60_000;
    while (Date.now() < deadline) {
      const { node } = await nodes().getNode({ node: d.name });
      const state = node?.provisionState;
      if (state !== ProvisionState.PROVISION_STATE_DEPLOY_WAIT) {
        assert.fail(
          `node ${d.name} is ${state === undefined ? 'gone' : ProvisionState[state]} before ${bytes} bytes were written: the fault cannot land mid-transfer (${node?.lastError})`,
        );
      }
      const done = node?.progress?.phase === 'writing' ? node.progress.doneBytes : 0;
      if (done >= bytes) return done;
      await sleep(20);
    }
    assert.fail(`${d.name} did not write ${bytes} bytes within 60 s`);
  }

  /** Black-holes the proxy until the agent notices, which must be within the stall timeout; then restores it. */
  async function blackhole(d: Deploy, ctx: TestContext): Promise<void> {
    const at = Date.now();
    d.proxy.blackhole();
    let line: Record<string, unknown>;
    try {
      line = await d.agent.waitForLog(interrupted(at), STALL_MS + 10_000);
    } finally {
      d.proxy.restore();
    }
    const detectedMs = Date.parse(String(line.time)) - at;
    ctx.diagnostic(`black hole at ${line.done ?? line.offset} bytes detected after ${detectedMs} ms (${line.reason})`);
    assert.match(String(line.reason), /^no data for/, 'the stall timer caught it');
    assert.ok(
      detectedMs <= STALL_MS + DETECTION_SLACK_MS,
      `a black hole was detected after ${detectedMs} ms; the stall timeout is ${STALL_MS} ms`,
    );
  }

  /** Resets every connection of the proxy; the agent must notice at once. */
  async function reset(d: Deploy, ctx: TestContext): Promise<void> {
    const at = Date.now();
    d.proxy.resetAll();
    const line = await d.agent.waitForLog(interrupted(at), 10_000);
    const detectedMs = Date.parse(String(line.time)) - at;
    ctx.diagnostic(`reset at ${line.done ?? line.offset} bytes detected after ${detectedMs} ms (${line.reason})`);
    assert.ok(detectedMs <= DETECTION_SLACK_MS, `a reset was detected after ${detectedMs} ms`);
  }

  /**
   * Waits for active, then checks the disk against the image, the bytes
   * served twice against the allowance per fault, and the resumes.
   */
  async function finish(
    d: Deploy,
    faults: number,
    ctx: TestContext,
    served: () => Promise<ImageTransferCounters> = () => imageTransferCounters(h.t().controller),
  ) {
    const active = await waitFor(d.name, ProvisionState.PROVISION_STATE_ACTIVE, 90_000);
    assert.equal(active.lastError, '');
    const disk = await readDiskStart(d.diskPath, d.image.size);
    assert.equal(sha256(disk), d.image.sha256, 'the disk holds the image');
    const now = await served();
    const resent = now.served - d.before.served - d.image.size;
    const allowance = resendAllowancePerFault(CHUNK_BYTES, zeroChunkBytes(d.content, CHUNK_BYTES));
    const resumes = now.resumes - d.before.resumes;
    ctx.diagnostic(
      `${faults} faults in ${((Date.now() - d.startedAt) / 1000).toFixed(1)} s: ${resent} bytes served twice (allowance ${faults} × ${allowance.bytes}: ${allowance.explain}), ${resumes} resumed reads, ${d.proxy.stats.bytesFromTarget} bytes through the proxy`,
    );
    assert.ok(resent >= 0, `the controller served ${-resent} bytes less than the image: the metric or the transfer is wrong`);
    assert.ok(
      resent <= faults * allowance.bytes,
      `${resent} bytes served twice for ${faults} faults; at most ${faults * allowance.bytes} may be`,
    );
    assert.ok(resumes >= faults, `${resumes} resumed reads for ${faults} faults`);
    // A controller that lost track (restarted, or let go of the agent) follows the running command again.
    const writes = d.agent.logs.filter((l) => l.msg === 'command started' && l.name === 'write_image');
    assert.equal(writes.length, 1, 'the agent ran one write_image command');
    const events = (await nodes().listNodeEvents({ node: d.name })).events.map((e) => e.message);
    const done = events.find((m) => m.includes('deploying -> active'));
    const reported = Number(/(\d+) resumes/.exec(done ?? '')?.[1]);
    assert.ok(reported >= faults, `the deploy reports ${reported} resumes for ${faults} faults: ${done}`);
    return { resent, resumes };
  }

  return { act, waitFor, startDeploy, writtenAtLeast, blackhole, reset, finish };
}

describe('the image writer, in process', () => {
  it('does not lose a disk write that fails while the stream breaks', async () => {
    const dirs = tempDir('metalcast-writer-');
    const disk = join(dirs.path, 'disk');
    await writeFile(disk, Buffer.alloc(4 * CHUNK_BYTES));
    const content = randomBytes(2 * CHUNK_BYTES);
    const reads: number[] = [];
    const source: ImageSource = {
      stat: async (image) => ({
        image,
        sizeBytes: content.length,
        sha256: sha256(content),
        chunkSizeBytes: CHUNK_BYTES,
        manifestChunkSizeBytes: 0,
        manifestChunkCount: 0,
        manifestRootSha256: '',
      }),
      async *read(_image, offset) {
        reads.push(offset);
        for (let at = offset; at < content.length; at += CHUNK_BYTES) {
          yield { offset: at, length: CHUNK_BYTES, zero: false, data: content.subarray(at, at + CHUNK_BYTES) };
          // The first call breaks right after its first chunk, while that chunk is being written.
          if (reads.length === 1)
            throw new ClientError('/metalcast.v1.AgentGatewayService/ReadImage', Status.UNAVAILABLE, 'read ECONNRESET');
        }
      },
      failed: () => {},
    };
    // The disk fails the write of the first chunk, once: only writes of this content's memory are touched.
    const probe = await open(disk, 'r');
    const handles = Object.getPrototypeOf(probe) as { write: (...args: unknown[]) => Promise<unknown> };
    await probe.close();
    const write = handles.write;
    let failed = 0;
    handles.write = function (this: unknown, ...args: unknown[]) {
      const data = args[0];
      if (failed === 0 && data instanceof Uint8Array && data.buffer === content.buffer && data.byteOffset === content.byteOffset) {
        failed++;
        return Promise.reject(Object.assign(new Error('EIO: i/o error, write'), { code: 'EIO', errno: -5, syscall: 'write' }));
      }
      return write.apply(this, args);
    };
    try {
      const outcome = await writeImage(
        source,
        { image: 'x', devicePath: disk, deviceSizeBytes: 4 * CHUNK_BYTES, expectedSha256: '', expectedSizeBytes: 0 },
        { ...DEFAULT_WRITE_OPTIONS, backoffBaseMs: 1, backoffMaxMs: 1, maxAttempts: 3 },
        () => {},
        new AbortController().signal,
        testLogger(),
      ).then(
        (result) => result,
        (error: Error) => error,
      );
      assert.equal(failed, 1, 'the injected write error happened');
      const written = sha256((await readFile(disk)).subarray(0, content.length));
      assert.ok(
        outcome instanceof Error,
        `the writer reported success (sha256 ${(outcome as { sha256: string }).sha256}), but the disk hashes to ${written}, the image to ${sha256(content)}`,
      );
      assert.match(outcome.message, /^writing .*disk failed at \d+ of \d+ bytes: EIO/);
    } finally {
      handles.write = write;
      dirs.remove();
    }
  });
});

describe('image transfer faults between agent and controller', () => {
  let t: TestController;
  const agents: AgentProcess[] = [];
  const proxies: TcpProxy[] = [];
  const h = harness({ t: () => t, agents, proxies });

  before(async () => {
    t = await startTestController(CONTROLLER_FLAGS);
  });
  afterEach(async () => {
    await Promise.all(agents.splice(0).map((a) => a.kill('SIGKILL')));
    await Promise.all(proxies.splice(0).map((p) => p.close()));
  });
  after(async () => {
    await t?.destroy();
  });

  it('a black-holed link is detected within the stall timeout and the transfer resumes', async (ctx) => {
    const d = await h.startDeploy('bh', 501);
    await h.writtenAtLeast(d, 4 * MIB);
    await h.blackhole(d, ctx);
    await h.finish(d, 1, ctx);
  });

  it('a reset connection is resumed', async (ctx) => {
    const d = await h.startDeploy('rst', 502);
    await h.writtenAtLeast(d, 4 * MIB);
    await h.reset(d, ctx);
    await h.finish(d, 1, ctx);
  });

  it('repeated faults on a slow, delayed link still give the right image', async (ctx) => {
    // Four times the size, for room: up to a 16 MiB window of data is past the proxy when it fails, and progress
    // comes with heartbeats. With twice the size, the transfer once finished after the reset before the agent
    // had reported the 2 MiB more that the third fault waits for (CI, 2026-12-06).
    const d = await h.startDeploy('rep', 503, { imageBytes: 4 * IMAGE_BYTES });
    d.proxy.delay(30);
    let written = await h.writtenAtLeast(d, 2 * MIB);
    await h.blackhole(d, ctx);
    // Each next fault only once the resumed read has moved the transfer on.
    written = await h.writtenAtLeast(d, written + 2 * MIB);
    await h.reset(d, ctx);
    await h.writtenAtLeast(d, written + 2 * MIB);
    await h.blackhole(d, ctx);
    await h.finish(d, 3, ctx);
  });
});

describe('image file faults on the controller', () => {
  let t: TestController;
  const agents: AgentProcess[] = [];
  const proxies: TcpProxy[] = [];
  const h = harness({ t: () => t, agents, proxies });
  // A broken file fails every attempt alike: three are enough, and keep the backoff short.
  const ATTEMPTS = 3;

  before(async () => {
    t = await startTestController({ ...CONTROLLER_FLAGS, transferAttempts: String(ATTEMPTS) });
  });
  afterEach(async () => {
    await Promise.all(agents.splice(0).map((a) => a.kill('SIGKILL')));
    await Promise.all(proxies.splice(0).map((p) => p.close()));
  });
  after(async () => {
    await t?.destroy();
  });

  /** Fails the deploy, never having gone active, with no transfer left open on the controller. */
  async function assertFailedCleanly(d: Deploy, error: RegExp) {
    const failed = await h.waitFor(d.name, ProvisionState.PROVISION_STATE_DEPLOY_FAILED, 60_000);
    assert.match(failed.lastError, error);
    const events = (await t.nodes.listNodeEvents({ node: d.name })).events;
    assert.ok(!events.some((e) => e.toState === ProvisionState.PROVISION_STATE_ACTIVE || /-> active/.test(e.message)), 'never active');
    assert.ok(
      !events.some(
        (e) => e.fromState === ProvisionState.PROVISION_STATE_DEPLOY_WAIT && e.toState === ProvisionState.PROVISION_STATE_DEPLOYING,
      ),
      'the write was never taken as done',
    );
    assert.equal(events.filter((e) => e.kind === 'transition').at(-1)?.toState, ProvisionState.PROVISION_STATE_DEPLOY_FAILED);
    const power = await readFile(join(d.root, 'power-actions.log'), 'utf8').catch(() => '');
    assert.doesNotMatch(power, /reboot/, 'no final power action after a failed write');
    // Every ReadImage call has ended, so none holds a --max-image-transfers slot.
    await eventually(async () => (await gauge(t, 'metalcast_image_transfers_active')) === 0, {
      what: 'metalcast_image_transfers_active to return to 0',
      timeoutMs: 5000,
    });
    return failed;
  }

  it('a corrupted image file fails the deploy on the chunk that fails verification, and the node never becomes active', async (ctx) => {
    let blob = '';
    // Corrupt the stored blob after it was added and checked, before any agent reads it.
    const d = await h.startDeploy('bad', 504, {
      afterImageAdded: async (image) => {
        blob = t.controller.imageFiles.blobPath(image.sha256);
        const file = await open(blob, 'r+');
        await file.write(Buffer.alloc(4096, 0x5a), 0, 4096, 3 * MIB + 77);
        await file.close();
      },
    });
    // The corruption lies in manifest chunk 3 (1 MiB chunks): fetched three times, refused three times.
    await assertFailedCleanly(
      d,
      /write_image failed: chunk 3 \(bytes 3145728-4194303\) failed verification 3 times: it hashes to [0-9a-f]{64}, the manifest says [0-9a-f]{64}/,
    );

    // The agent wrote every byte it received, and refused them: the disk holds the corrupted blob, not the image.
    const disk = await readDiskStart(d.diskPath, d.image.size);
    const corrupted = await readFile(blob);
    assert.notEqual(sha256(disk), d.image.sha256);
    assert.equal(sha256(disk), sha256(corrupted), 'the disk holds exactly what the controller served');
    const now = await imageTransferCounters(t.controller);
    ctx.diagnostic(
      `served ${now.served - d.before.served} bytes for a ${d.image.size}-byte image, ${now.resumes - d.before.resumes} resumes`,
    );
    assert.equal(now.served - d.before.served, d.image.size + 2 * MIB, 'only the bad chunk is served again, twice');
    // metalcast_image_transfer_resumes_total counts ReadImage calls past offset 0: the two re-fetches of chunk 3.
    assert.equal(now.resumes - d.before.resumes, 2, "no read but the bad chunk's re-fetches starts past offset 0");
  });

  it('a truncated image file fails the deploy at once with DATA_LOSS, with the image written up to the cut', async (ctx) => {
    const keep = 6 * MIB + 3;
    const d = await h.startDeploy('short', 506, {
      afterImageAdded: async (image) => truncate(t.controller.imageFiles.blobPath(image.sha256), keep),
    });
    const failed = await assertFailedCleanly(
      d,
      new RegExp(
        `refused the image read \\(DATA_LOSS: the content of image '[^']+' on this controller is shorter than its recorded size .*\\) at (\\d+) of ${d.image.size} bytes`,
      ),
    );
    const written = Number(/\) at (\d+) of/.exec(failed.lastError)?.[1]);
    assert.ok(written <= keep, `the agent wrote ${written} bytes of a file cut at ${keep}`);
    // What was written is the image, up to where the file was cut.
    const disk = await readDiskStart(d.diskPath, written);
    assert.equal(sha256(disk), sha256(d.content.subarray(0, written)));
    const now = await imageTransferCounters(t.controller);
    const resent = now.served - d.before.served - written;
    const allowance = resendAllowancePerFault(CHUNK_BYTES, zeroChunkBytes(d.content, CHUNK_BYTES));
    ctx.diagnostic(`${failed.lastError}; ${resent} bytes served twice`);
    assert.ok(resent >= 0 && resent <= allowance.bytes, `${resent} bytes served twice (one attempt: no retry after DATA_LOSS)`);
  });

  it('a truncated image file read by a reader that stopped reading does not crash the controller', async (ctx) => {
    // The agent is replaced by a raw HTTP/2 reader that grants no flow-control window, so the
    // controller's ReadImage fills grpc-js's send buffer and waits at yield, with the read of
    // the next chunk already under way. Where the file is cut, that read fails while nothing
    // awaits it: unless it is handled, that is an unhandled rejection, which ends a Node process.
    const d = await h.startDeploy('stalled', 508, { withoutAgent: true });
    const blob = t.controller.imageFiles.blobPath(d.image.sha256);
    await h.waitFor(d.name, ProvisionState.PROVISION_STATE_DEPLOY_WAIT);
    const { nodeUuid, agentToken } = await lookup(t.gateway, d.macs);
    const headers = { 'metalcast-node-uuid': nodeUuid, authorization: `Bearer ${agentToken}` };
    const served = async () => (await imageTransferCounters(t.controller)).served;
    /** Starts a stalled read and resolves with the bytes the controller served before it blocked. */
    const blockedAt = async (reader: StalledReader) => {
      let last = -1;
      await eventually(
        async () => {
          const now = await served();
          const settled = now === last && now > 0;
          last = now;
          return settled;
        },
        { intervalMs: 200, timeoutMs: 10_000, what: 'the controller to block on the stalled reader' },
      );
      assert.equal(reader.status(), undefined, 'the call is still open, blocked');
      return last;
    };
    // Where does the controller block? Measure it on the intact file.
    const start = await served();
    const probe = await stalledReadImage(t.controller.grpcAddress, headers, { image: `${d.name}-os`, offset: 0, length: 0 });
    const blockedBytes = (await blockedAt(probe)) - start;
    await probe.close();
    assert.equal(blockedBytes % CHUNK_BYTES, 0);
    ctx.diagnostic(`with no window granted, the controller blocks after serving ${blockedBytes / CHUNK_BYTES} chunks`);
    await eventually(async () => (await gauge(t, 'metalcast_image_transfers_active')) === 0, { what: 'the probe to end' });

    // Cut the file just past there, so that the read in flight while the controller waits is the one that fails.
    await truncate(blob, blockedBytes + 3);
    const unhandled: unknown[] = [];
    const onUnhandled = (reason: unknown) => unhandled.push(reason);
    process.on('unhandledRejection', onUnhandled);
    try {
      const before = await served();
      const reader = await stalledReadImage(t.controller.grpcAddress, headers, { image: `${d.name}-os`, offset: 0, length: 0 });
      assert.equal((await blockedAt(reader)) - before, blockedBytes, 'the controller blocked at the same place');
      await sleep(200);
      await reader.close();
      await eventually(async () => (await gauge(t, 'metalcast_image_transfers_active')) === 0, { what: 'the read to end' });
    } finally {
      process.off('unhandledRejection', onUnhandled);
    }
    assert.deepEqual(
      unhandled.map((reason) => String((reason as Error)?.message ?? reason)),
      [],
      'no unhandled rejection (it would end the controller process)',
    );
  });

  it('a missing image file fails the deploy at once with DATA_LOSS and leaves no transfer slot taken', async (ctx) => {
    const d = await h.startDeploy('gone', 507, {
      afterImageAdded: async (image) => rm(t.controller.imageFiles.blobPath(image.sha256)),
    });
    const failed = await assertFailedCleanly(
      d,
      new RegExp(
        `DATA_LOSS: the content of image '[^']+' is missing on this controller; upload or import it again\\) at 0 of ${d.image.size} bytes`,
      ),
    );
    ctx.diagnostic(failed.lastError);
    const now = await imageTransferCounters(t.controller);
    assert.equal(now.served - d.before.served, 0, 'nothing was served');
  });
});

describe('a controller restarted mid-transfer', () => {
  it('is resumed against the new controller, which follows the running command to active', async (ctx) => {
    const agents: AgentProcess[] = [];
    const proxies: TcpProxy[] = [];
    // A graceful stop lets running calls go on (an image stream would finish through the old
    // controller); a short --shutdown-timeout cuts them, as a crash or a kill would.
    const flags = { ...CONTROLLER_FLAGS, shutdownTimeout: '1s' };
    let t = await startTestController(flags);
    const h = harness({ t: () => t, agents, proxies });
    try {
      // Larger than what can be in flight when the stop comes (the 16 MiB flow-control window and the buffers past
      // the 4 MiB written, plus the progress report's lag): with the 16 MiB image, the controller had sometimes sent
      // the last byte before it stopped, nothing was interrupted, and the test waited for a resume that never came.
      const d = await h.startDeploy('rs', 505, { imageBytes: 4 * IMAGE_BYTES });
      await h.writtenAtLeast(d, 4 * MIB);
      const first = t.controller;
      const address = t.controller.grpcAddress;
      const stopAt = Date.now();
      await t.stop();
      ctx.diagnostic(`the controller stopped in ${Date.now() - stopAt} ms`);
      t = await startTestController({ ...flags, listen: address }, t.dataDir);
      // Generous: on a loaded CI host the agent notices the cut only after its keepalive (6 s) and a slow restart.
      const line = await d.agent.waitForLog(interrupted(stopAt), 45_000);
      ctx.diagnostic(`the agent resumes from ${line.done ?? line.offset} bytes (${line.reason})`);
      const firstCounters = await imageTransferCounters(first);
      await h.finish(d, 1, ctx, async () => {
        const second = await imageTransferCounters(t.controller);
        return { served: firstCounters.served + second.served, resumes: firstCounters.resumes + second.resumes };
      });
    } finally {
      await Promise.all(agents.map((a) => a.kill('SIGKILL')));
      await Promise.all(proxies.map((p) => p.close()));
      await t.destroy();
    }
  });
});
