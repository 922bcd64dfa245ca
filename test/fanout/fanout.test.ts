import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { type AgentProcess, spawnAgent } from '../helpers/agent-process.js';
import { eventually, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { addImage, readDiskStart, sha256 } from '../helpers/images.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';
import { makeTestPki, type TestPki } from '../helpers/tls.js';

/*
 * Fan-out (docs/fanout.md) with real agent processes over TLS: the agents
 * of a wave fetch chunks from each other, pinning the certificate the
 * controller pinned for each peer; the controller sends each chunk about
 * once. A peer whose disk lies and a peer that stalls are dropped for the
 * wave and every honest disk ends bit-exact; half the wave killed mid-way
 * does not stop the other half.
 */

const MIB = 1024 * 1024;
const FLAGS: Record<string, string> = {
  fanout: 'true',
  heartbeatTimeout: '60s',
  heartbeatIntervalMin: '300ms',
  heartbeatIntervalMax: '600ms',
  sweepInterval: '500ms',
  heartbeatFlushInterval: '50ms',
  startupGrace: '0s',
  imageChunkSize: '256K',
  imageManifestChunkSize: '1M',
  transferStallTimeout: '8s',
  transferAttempts: '30',
  keepaliveTime: '5s',
  keepaliveTimeout: '20s',
  shutdownTimeout: '1s',
};

interface Member {
  name: string;
  agent: AgentProcess;
  disk: string;
}

describe('fan-out: agents share verified chunks', () => {
  const dirs = tempDir('metalcast-fanout-');
  const agents: AgentProcess[] = [];
  const proxies: TcpProxy[] = [];
  const controllers: TestController[] = [];
  let pki: TestPki;
  let machineIndex = 700;

  before(async () => {
    pki = await makeTestPki(dirs.path);
  });
  after(async () => {
    await Promise.all(agents.map((a) => a.kill('SIGKILL')));
    await Promise.all(proxies.map((p) => p.close()));
    for (const t of controllers) await t.destroy();
    dirs.remove();
  });

  async function controller(flags: Record<string, string> = {}): Promise<TestController> {
    const t = await startTestController({ ...FLAGS, ...pki.controllerFlags, ...flags }, undefined, { caPem: pki.ca.certPem });
    controllers.push(t);
    return t;
  }

  /** Nodes taken to available through real cleaning, each with its agent dialling the controller at `address`. */
  async function available(
    t: TestController,
    names: string[],
    imageBytes: number,
    address: string,
    agentFlags: Record<string, string> = {},
  ) {
    const members: Member[] = [];
    for (const name of names) {
      const machine = await uniqueFakeMachine(join(dirs.path, name), machineIndex++, {
        disks: [{ name: 'sda', sizeBytes: imageBytes + 64 * MIB }],
      });
      await t.nodes.createNode({ name, macAddresses: [machine.macs[0] as string] });
      await t.nodes.setProvisionState({ node: name, action: ProvisionAction.PROVISION_ACTION_MANAGE });
      await t.nodes.setProvisionState({ node: name, action: ProvisionAction.PROVISION_ACTION_PROVIDE });
      // Generous keepalive: the machine running the tests may be loaded, and a dropped connection is not what this tests.
      const agent = spawnAgent({
        controller: address,
        root: machine.root,
        ca: pki.caFile,
        'keepalive-time': '5s',
        'keepalive-timeout': '20s',
        ...agentFlags,
      });
      agents.push(agent);
      members.push({ name, agent, disk: (machine.disks[0] as { path: string }).path });
    }
    for (const m of members) await waitFor(t, m.name, ProvisionState.PROVISION_STATE_AVAILABLE);
    return members;
  }

  async function deploy(t: TestController, members: Member[], image: string, fanoutDisabled = false) {
    await Promise.all(
      members.map((m) =>
        t.nodes.setProvisionState({
          node: m.name,
          action: ProvisionAction.PROVISION_ACTION_DEPLOY,
          deploy: { image, target: undefined, fanoutDisabled } as never,
        }),
      ),
    );
  }

  function waitFor(t: TestController, name: string, state: ProvisionState, timeoutMs = 90_000) {
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

  async function metric(t: TestController, name: string, labels: Record<string, string> = {}): Promise<number> {
    const values = (await t.controller.registry.getSingleMetric(name)?.get())?.values ?? [];
    return values.filter((v) => Object.entries(labels).every(([k, want]) => v.labels[k] === want)).reduce((sum, v) => sum + v.value, 0);
  }

  async function deployedNote(t: TestController, name: string): Promise<string> {
    const events = (await t.nodes.listNodeEvents({ node: name })).events;
    if (process.env.FANOUT_DEBUG) console.log(events.map((e) => e.message).join('\n'));
    return events.findLast((e) => /deployed /.test(e.message))?.message ?? '';
  }

  it('a wave of 4: every disk bit-exact, the controller sends the image about once, the rest comes from peers; off per deploy, it sends it 4 times', async (ctx) => {
    const t = await controller();
    const IMAGE = 16 * MIB;
    const content = randomBytes(IMAGE);
    const image = await addImage(t.controller, 'wave-os', content);
    const members = await available(t, ['wave-1', 'wave-2', 'wave-3', 'wave-4'], IMAGE, t.controller.grpcAddress);
    const servedBefore = await metric(t, 'metalcast_image_bytes_served_total');
    await deploy(t, members, 'wave-os');
    for (const m of members) await waitFor(t, m.name, ProvisionState.PROVISION_STATE_ACTIVE);
    if (process.env.FANOUT_DEBUG)
      for (const m of members)
        for (const l of m.agent.logs.filter(
          (x) => x.component !== 'lookup' && ((x.level as number) >= 40 || /fan-out|peer/.test(String(x.msg))),
        ))
          ctx.diagnostic(`${m.name} ${JSON.stringify(l).slice(0, 400)}`);
    const served = (await metric(t, 'metalcast_image_bytes_served_total')) - servedBefore;
    const fromPeers = await metric(t, 'metalcast_fanout_image_bytes_total', { source: 'peer' });
    ctx.diagnostic(`controller sent ${served} bytes for 4 × ${IMAGE}; agents report ${fromPeers} bytes from peers`);
    for (const m of members) {
      assert.equal(sha256(await readDiskStart(m.disk, IMAGE)), image.sha256, `${m.name}'s disk holds the image`);
      ctx.diagnostic(`${m.name}: ${await deployedNote(t, m.name)}`);
    }
    assert.ok(served <= 1.5 * IMAGE, `the controller sent ${served} bytes, more than 1.5 × the image (${IMAGE})`);
    assert.ok(fromPeers >= 2 * IMAGE, `peers served only ${fromPeers} bytes of the 4 × ${IMAGE} the wave needed`);
    assert.match(await deployedNote(t, 'wave-1'), /bytes from peers \d+, from the controller \d+/);

    // The same wave with fan-out off for the deploy: every agent reads the whole image from the controller.
    for (const m of members) {
      await t.nodes.setProvisionState({ node: m.name, action: ProvisionAction.PROVISION_ACTION_UNDEPLOY });
    }
    for (const m of members) await waitFor(t, m.name, ProvisionState.PROVISION_STATE_AVAILABLE);
    // A new image: the disks still hold the first one, which delta re-imaging would not fetch again.
    const second = await addImage(t.controller, 'wave-os-2', randomBytes(IMAGE));
    const offBefore = await metric(t, 'metalcast_image_bytes_served_total');
    await deploy(t, members, 'wave-os-2', true);
    for (const m of members) await waitFor(t, m.name, ProvisionState.PROVISION_STATE_ACTIVE);
    const offServed = (await metric(t, 'metalcast_image_bytes_served_total')) - offBefore;
    ctx.diagnostic(`fan-out off: the controller sent ${offServed} bytes`);
    assert.ok(offServed >= 4 * IMAGE, `with fan-out off the controller sent ${offServed} bytes, not 4 × the image`);
    for (const m of members) {
      assert.equal(sha256(await readDiskStart(m.disk, IMAGE)), second.sha256, `${m.name}'s disk holds the second image`);
      assert.doesNotMatch(await deployedNote(t, m.name), /bytes from peers/, 'no byte came from a peer');
    }
  });

  it('a lying peer (its disk corrupted) and a stalling peer (stopped) are dropped for the wave; every honest disk ends bit-exact', async (ctx) => {
    // Early finishers linger as peers: the controller sends no final power command that would end their serving.
    const t = await controller({ deployFinalPower: 'none' });
    const IMAGE = 12 * MIB;
    const content = randomBytes(IMAGE);
    const image = await addImage(t.controller, 'trust-os', content);
    const early = await available(t, ['liar', 'staller'], IMAGE, t.controller.grpcAddress, { 'fanout-linger': '10m' });
    await deploy(t, early, 'trust-os');
    for (const m of early) await waitFor(t, m.name, ProvisionState.PROVISION_STATE_ACTIVE);
    // The liar still believes it holds every chunk; what it reads back from its disk is now garbage.
    const liarDisk = await open((early[0] as Member).disk, 'r+');
    await liarDisk.write(randomBytes(IMAGE), 0, IMAGE, 0);
    await liarDisk.close();
    // The staller accepts connections (the kernel does) and never answers.
    (early[1] as Member).agent.child.kill('SIGSTOP');

    const honest = await available(t, ['honest-1', 'honest-2', 'honest-3'], IMAGE, t.controller.grpcAddress);
    await deploy(t, honest, 'trust-os');
    for (const m of honest) await waitFor(t, m.name, ProvisionState.PROVISION_STATE_ACTIVE);
    for (const m of honest) {
      assert.equal(sha256(await readDiskStart(m.disk, IMAGE)), image.sha256, `${m.name}'s disk holds the image`);
      ctx.diagnostic(`${m.name}: ${await deployedNote(t, m.name)}`);
    }
    const corrupt = await metric(t, 'metalcast_fanout_peer_failures_total', { kind: 'corrupt' });
    const stalled = await metric(t, 'metalcast_fanout_peer_failures_total', { kind: 'stalled' });
    const dropped = await metric(t, 'metalcast_fanout_peers_dropped_total');
    ctx.diagnostic(`peer failures: ${corrupt} corrupt, ${stalled} stalled; ${dropped} peers dropped`);
    assert.ok(corrupt >= 1, 'a fetcher reported the lying peer');
    assert.ok(stalled >= 1, 'a fetcher reported the stalling peer');
    assert.equal(dropped, 2, 'both bad peers were dropped for the wave, and no honest one');
    (early[1] as Member).agent.child.kill('SIGCONT');
  });

  it('half the wave killed mid-way: the other half finishes bit-exact, from the controller and the remaining peers', async (ctx) => {
    const t = await controller();
    const IMAGE = 24 * MIB;
    const content = randomBytes(IMAGE);
    const image = await addImage(t.controller, 'half-os', content);
    // The controller's link is slow, so that the wave is still going when half of it dies.
    const proxy = await TcpProxy.start(t.controller.grpcAddress);
    proxies.push(proxy);
    const members = await available(t, ['half-1', 'half-2', 'half-3', 'half-4'], IMAGE, proxy.address);
    proxy.throttle(1_500_000);
    await deploy(t, members, 'half-os');
    await eventually(
      async () => {
        const { node } = await t.nodes.getNode({ node: 'half-1' });
        return (node?.progress?.doneBytes ?? 0) >= IMAGE / 4 ? true : undefined;
      },
      { timeoutMs: 60_000, what: 'half-1 to hold a quarter of the image' },
    );
    const [a, b, c, d] = members as [Member, Member, Member, Member];
    await Promise.all([a.agent.kill('SIGKILL'), b.agent.kill('SIGKILL')]);
    ctx.diagnostic('killed half-1 and half-2');
    for (const m of [c, d]) {
      await waitFor(t, m.name, ProvisionState.PROVISION_STATE_ACTIVE);
      assert.equal(sha256(await readDiskStart(m.disk, IMAGE)), image.sha256, `${m.name}'s disk holds the image`);
      ctx.diagnostic(`${m.name}: ${await deployedNote(t, m.name)}`);
    }
  });
});
