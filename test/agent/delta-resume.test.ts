import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, describe, it } from 'node:test';
import { ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { type AgentProcess, spawnAgent } from '../helpers/agent-process.js';
import { eventually, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { addImage, readDiskStart, sha256 } from '../helpers/images.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';

/*
 * Resume at chunk granularity (docs/chunk-manifest.md): a deploy whose agent
 * is killed, or whose controller is stopped, mid-transfer goes on where it
 * was. The restarted agent knows nothing of the first one: it re-verifies
 * what the disk holds against the manifest and fetches the rest. Every byte
 * the controller sends is counted by a TcpProxy between agent and controller;
 * over the whole deploy, at most 10 % of the image may travel twice.
 */

const MIB = 1024 * 1024;
const IMAGE_BYTES = 48 * MIB;
const AGENT_FLAGS = { 'keepalive-time': '1s', 'keepalive-timeout': '10s' };
/** Slow enough that a fault lands mid-transfer (about 8 s for the image). */
const PROXY_RATE = 6_000_000;

const FLAGS: Record<string, string> = {
  heartbeatTimeout: '60s',
  heartbeatIntervalMin: '300ms',
  heartbeatIntervalMax: '600ms',
  sweepInterval: '500ms',
  heartbeatFlushInterval: '50ms',
  startupGrace: '0s',
  imageChunkSize: '256K',
  imageManifestChunkSize: '1M',
  transferStallTimeout: '3s',
  transferAttempts: '30',
  // A ping's answer queues behind a full flow-control window (16 MiB, about 3 s through the throttled
  // proxy): a shorter keepalive timeout would cut healthy connections and resend their windows.
  keepaliveTime: '1s',
  keepaliveTimeout: '10s',
  // A stop cuts running streams, as a crash would.
  shutdownTimeout: '1s',
};

describe('resuming a deploy at chunk granularity', () => {
  const dirs = tempDir('metalcast-delta-resume-');
  const agents: AgentProcess[] = [];
  const proxies: TcpProxy[] = [];
  const controllers: TestController[] = [];
  after(async () => {
    await Promise.all(agents.map((a) => a.kill('SIGKILL')));
    await Promise.all(proxies.map((p) => p.close()));
    for (const t of controllers) await t.destroy();
    dirs.remove();
  });

  /** A node taken to available through real cleaning, and its deploy started through a throttled, counting proxy. */
  async function startDeploy(t: TestController, name: string, index: number) {
    const content = randomBytes(IMAGE_BYTES);
    const image = await addImage(t.controller, `${name}-os`, content);
    const proxy = await TcpProxy.start(t.controller.grpcAddress);
    proxies.push(proxy);
    const machine = await uniqueFakeMachine(join(dirs.path, name), index, { disks: [{ name: 'sda', sizeBytes: IMAGE_BYTES + 64 * MIB }] });
    await t.nodes.createNode({ name, macAddresses: [machine.macs[0] as string] });
    await t.nodes.setProvisionState({ node: name, action: ProvisionAction.PROVISION_ACTION_MANAGE });
    await t.nodes.setProvisionState({ node: name, action: ProvisionAction.PROVISION_ACTION_PROVIDE });
    const agent = spawnAgent({ controller: proxy.address, root: machine.root, ...AGENT_FLAGS });
    agents.push(agent);
    await waitFor(t, name, ProvisionState.PROVISION_STATE_AVAILABLE);
    proxy.throttle(PROXY_RATE);
    const before = proxy.stats.bytesFromTarget;
    await t.nodes.setProvisionState({
      node: name,
      action: ProvisionAction.PROVISION_ACTION_DEPLOY,
      deploy: { image: `${name}-os`, target: undefined } as never,
    });
    return { content, image, proxy, machine, agent, before, disk: (machine.disks[0] as { path: string }).path };
  }

  function waitFor(t: TestController, name: string, state: ProvisionState, timeoutMs = 60_000) {
    return eventually(
      async () => {
        const { node } = await t.nodes.getNode({ node: name });
        if (node?.provisionState === state) return node;
        if (node?.lastError) throw new Error(`node ${name} is ${ProvisionState[node.provisionState]}: ${node.lastError}`);
        return undefined;
      },
      { timeoutMs, what: `${name} to reach ${ProvisionState[state]}` },
    );
  }

  /** Resolves once the agent reports at least `bytes` of the image in place. */
  async function writtenAtLeast(t: TestController, name: string, bytes: number): Promise<number> {
    const deadline = Date.now() + 60_000;
    while (Date.now() < deadline) {
      const { node } = await t.nodes.getNode({ node: name });
      assert.equal(
        node?.provisionState,
        ProvisionState.PROVISION_STATE_DEPLOY_WAIT,
        `the deploy ended before the fault: ${node?.lastError}`,
      );
      const done = node?.progress?.phase === 'writing' ? node.progress.doneBytes : 0;
      if (done >= bytes) return done;
      await sleep(50);
    }
    assert.fail(`${name} did not write ${bytes} bytes within 60 s`);
  }

  it('an agent killed mid-deploy and restarted resumes: under 10 % of the image travels again, the disk ends bit-exact', async (ctx) => {
    const t = await startTestController(FLAGS);
    controllers.push(t);
    const d = await startDeploy(t, 'agent-kill', 611);
    const at = await writtenAtLeast(t, 'agent-kill', IMAGE_BYTES / 2);
    await d.agent.kill('SIGKILL');
    ctx.diagnostic(`agent killed with ${at} bytes written`);
    const again = spawnAgent({ controller: d.proxy.address, root: d.machine.root, ...AGENT_FLAGS });
    agents.push(again);
    const node = await waitFor(t, 'agent-kill', ProvisionState.PROVISION_STATE_ACTIVE, 120_000).catch(async (error) => {
      const { node: now } = await t.nodes.getNode({ node: 'agent-kill' });
      const events = (await t.nodes.listNodeEvents({ node: 'agent-kill' })).events.map((e) => e.message);
      throw new Error(
        `${(error as Error).message}; node ${JSON.stringify(now?.progress)} ${now?.lastError}; events: ${events.join(' | ')}`,
      );
    });
    const sent = d.proxy.stats.bytesFromTarget - d.before;
    const twice = sent - IMAGE_BYTES;
    ctx.diagnostic(
      `${sent} bytes from the controller for a ${IMAGE_BYTES}-byte image: ${twice} (${((100 * twice) / IMAGE_BYTES).toFixed(1)} %) again`,
    );
    assert.ok(twice < IMAGE_BYTES / 10, `${twice} bytes travelled twice, 10 % of the image is ${IMAGE_BYTES / 10}`);
    assert.equal(sha256(await readDiskStart(d.disk, IMAGE_BYTES)), d.image.sha256, 'the disk holds the image');
    const events = (await t.nodes.listNodeEvents({ node: 'agent-kill' })).events;
    const deployed = events.find((e) => /chunks: \d+ already on the disk/.test(e.message))?.message ?? '';
    ctx.diagnostic(deployed);
    const skipped = Number(/chunks: (\d+) already on the disk/.exec(deployed)?.[1]);
    assert.ok(skipped >= (at / MIB) * 0.9 - 1, `the restarted agent found ${skipped} chunks on the disk after ${at} bytes were written`);
    assert.equal(node.provisionState, ProvisionState.PROVISION_STATE_ACTIVE);
    const saved = await t.controller.registry.getSingleMetric('metalcast_image_delta_bytes_saved_total')?.get();
    assert.ok((saved?.values[0]?.value ?? 0) >= skipped * MIB, 'the metric counts the bytes saved');
  });

  it('a controller stopped mid-deploy and restarted: the agent resumes, under 10 % of the image travels again', async (ctx) => {
    let t = await startTestController(FLAGS);
    controllers.push(t);
    const d = await startDeploy(t, 'ctl-kill', 612);
    const at = await writtenAtLeast(t, 'ctl-kill', IMAGE_BYTES / 2);
    const address = t.controller.grpcAddress;
    await t.stop();
    ctx.diagnostic(`controller stopped with ${at} bytes written`);
    t = await startTestController({ ...FLAGS, listen: address }, t.dataDir);
    // The new controller owns the data directory now: destroy only it.
    controllers.splice(controllers.length - 1, 1, t);
    await waitFor(t, 'ctl-kill', ProvisionState.PROVISION_STATE_ACTIVE, 120_000);
    const sent = d.proxy.stats.bytesFromTarget - d.before;
    const twice = sent - IMAGE_BYTES;
    ctx.diagnostic(
      `${sent} bytes from the controllers for a ${IMAGE_BYTES}-byte image: ${twice} (${((100 * twice) / IMAGE_BYTES).toFixed(1)} %) again`,
    );
    assert.ok(twice < IMAGE_BYTES / 10, `${twice} bytes travelled twice, 10 % of the image is ${IMAGE_BYTES / 10}`);
    assert.equal(sha256(await readDiskStart(d.disk, IMAGE_BYTES)), d.image.sha256, 'the disk holds the image');
  });
});
