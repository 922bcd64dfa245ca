import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { type Node, ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { type AgentProcess, msg, spawnAgent } from '../helpers/agent-process.js';
import { eventually, startTestController, tempDir } from '../helpers/controller.js';
import { type ControllerProcess, freePort, spawnController } from '../helpers/controller-process.js';
import { type FakeMachine, uniqueFakeMachine } from '../helpers/fake-machine.js';
import { addImage, makeImageContent, seedImage, sha256 } from '../helpers/images.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';

const MIB = 1024 * 1024;
type NodeClient = ControllerProcess['nodes'];

const TERMINAL = new Set([ProvisionState.PROVISION_STATE_ACTIVE, ProvisionState.PROVISION_STATE_DEPLOY_FAILED]);

async function nodeState(nodes: NodeClient, name: string): Promise<Node | undefined> {
  return (await nodes.getNode({ node: name })).node;
}

/** Enrols machines and takes them to available through real cleaning. */
async function makeAvailable(nodes: NodeClient, machines: FakeMachine[]): Promise<void> {
  for (const [index, machine] of machines.entries()) {
    await nodes.createNode({ name: `c${index}`, macAddresses: [machine.macs[0] as string] });
    await nodes.setProvisionState({ node: `c${index}`, action: ProvisionAction.PROVISION_ACTION_MANAGE });
    await nodes.setProvisionState({ node: `c${index}`, action: ProvisionAction.PROVISION_ACTION_PROVIDE });
  }
  await eventually(
    async () => {
      for (const index of machines.keys()) {
        const node = await nodeState(nodes, `c${index}`);
        if (node?.lastError) throw new Error(`c${index}: ${node.lastError}`);
        if (node?.provisionState !== ProvisionState.PROVISION_STATE_AVAILABLE) return false;
      }
      return true;
    },
    // Agent processes start slowly on a busy machine.
    { timeoutMs: 120_000, what: 'every node available' },
  );
}

async function diskHolds(machine: FakeMachine, image: { sha256: string; size: number }): Promise<boolean> {
  const disk = await readFile((machine.disks[0] as { path: string }).path);
  return sha256(disk.subarray(0, image.size)) === image.sha256;
}

describe('crashes mid-deploy', () => {
  const dirs = tempDir('metalcast-crash-');
  const agents: AgentProcess[] = [];
  const cleanups: (() => Promise<unknown>)[] = [];
  after(async () => {
    await Promise.all(agents.map((a) => a.kill('SIGKILL')));
    for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
    dirs.remove();
  });

  it('kill -9 of the controller in the middle of 5 deploys: after a restart on the same database every node ends active or failed with a reason, none waits past its timeout, and no lock is left', async () => {
    const dataDir = join(dirs.path, 'controller');
    const image = await seedImage(dataDir, 'os', [makeImageContent(24 * MIB)]);
    const port = await freePort();
    const flags = {
      listen: `127.0.0.1:${port}`,
      'data-dir': dataDir,
      'heartbeat-timeout': '8s',
      'heartbeat-interval-min': '300ms',
      'heartbeat-interval-max': '600ms',
      'sweep-interval': '500ms',
      'heartbeat-flush-interval': '50ms',
      'startup-grace': '8s',
      'image-chunk-size': '256K',
      'transfer-stall-timeout': '2s',
      'keepalive-time': '1s',
      'keepalive-timeout': '1s',
    };
    let controller = await spawnController(flags, 60_000);
    cleanups.push(() => controller.kill());
    // A slow link, so that the kill lands mid-transfer.
    const proxy = await TcpProxy.start(`127.0.0.1:${port}`);
    cleanups.push(() => proxy.close());
    // The bar of issue 18: five deploys under way when the controller is killed.
    const machines = await Promise.all([0, 1, 2, 3, 4].map((i) => uniqueFakeMachine(join(dirs.path, `m${i}`), 400 + i)));
    const started = machines.map((machine) => spawnAgent({ controller: proxy.address, root: machine.root }));
    agents.push(...started);
    // Five agent processes starting at once on a busy machine take a while; the nodes wait for them once they are up.
    for (const agent of started) await agent.waitForLog(msg('hardware discovered'), 90_000);
    await makeAvailable(controller.nodes, machines);

    proxy.throttle(3 * MIB);
    for (const index of machines.keys()) {
      await controller.nodes.setProvisionState({
        node: `c${index}`,
        action: ProvisionAction.PROVISION_ACTION_DEPLOY,
        deploy: { image: 'os', target: undefined },
      });
    }
    await eventually(
      async () => {
        for (const index of machines.keys())
          if (((await nodeState(controller.nodes, `c${index}`))?.progress?.doneBytes ?? 0) === 0) return false;
        return true;
      },
      { timeoutMs: 30_000, what: 'every transfer under way' },
    );

    await controller.kill('SIGKILL');
    await new Promise((r) => setTimeout(r, 1000));
    controller = await spawnController(flags, 60_000);
    const restartedAt = Date.now();
    cleanups.push(() => controller.kill());
    proxy.throttle(0);

    // None waits past its timeout: a node still in deploy wait was heard from within the heartbeat timeout
    // (counted from the end of the startup grace, during which the sweep leaves nodes alone), plus the
    // sweep interval and slack for a busy machine.
    const waitLimitMs = 8000 + 500 + 5000;
    const overdue: string[] = [];
    const finals = await eventually(
      async () => {
        const nodes = await Promise.all(machines.map((_, index) => nodeState(controller.nodes, `c${index}`)));
        for (const node of nodes) {
          if (node?.provisionState !== ProvisionState.PROVISION_STATE_DEPLOY_WAIT) continue;
          const heard = Math.max(node.lastHeartbeatAt?.getTime() ?? 0, restartedAt + 8000);
          if (Date.now() - heard >= waitLimitMs)
            overdue.push(`${node.name} in deploy wait ${Date.now() - heard} ms after its agent was last heard`);
        }
        return nodes.every((n) => n && TERMINAL.has(n.provisionState)) ? (nodes as Node[]) : undefined;
      },
      { timeoutMs: 90_000, what: 'every node active or deploy failed' },
    );
    assert.deepEqual(overdue, [], 'no node waits past its timeout');
    for (const [index, node] of finals.entries()) {
      assert.equal(node.reservation, '', `c${index} holds no lock`);
      if (node.provisionState === ProvisionState.PROVISION_STATE_ACTIVE) {
        assert.ok(await diskHolds(machines[index] as FakeMachine, image), `c${index} is active and its disk holds the image`);
      } else {
        assert.notEqual(node.lastError, '', `c${index} failed with a reason`);
      }
    }
    // The transfers resume after a controller restart: in practice every node gets there.
    assert.ok(
      finals.every((n) => n.provisionState === ProvisionState.PROVISION_STATE_ACTIVE),
      finals.map((n) => `${n.name}: ${n.lastError}`).join('; '),
    );
    const cleared = controller.logs.find((l) => l.msg === 'cleared node locks left by a previous run of this controller');
    assert.ok(cleared, 'the restarted controller cleared the locks the killed one held');
  });

  it('kill -9 of an agent mid-deploy: the sweep fails the node with a clear last_error', async () => {
    const t = await startTestController({
      heartbeatTimeout: '3s',
      heartbeatIntervalMin: '300ms',
      heartbeatIntervalMax: '600ms',
      sweepInterval: '250ms',
      heartbeatFlushInterval: '50ms',
      startupGrace: '0s',
      imageChunkSize: '256K',
    });
    cleanups.push(() => t.destroy());
    await addImage(t.controller, 'os', makeImageContent(16 * MIB));
    const proxy = await TcpProxy.start(t.controller.grpcAddress);
    cleanups.push(() => proxy.close());
    const machine = await uniqueFakeMachine(join(dirs.path, 'k'), 450);
    const agent = spawnAgent({ controller: proxy.address, root: machine.root });
    agents.push(agent);
    // The 3 s timeout starts when the node waits for cleaning: the agent must be up by then, even on a busy machine.
    await agent.waitForLog(msg('agent API listening'), 30_000);
    await makeAvailable(t.nodes, [machine]);
    proxy.throttle(2 * MIB);
    await t.nodes.setProvisionState({
      node: 'c0',
      action: ProvisionAction.PROVISION_ACTION_DEPLOY,
      deploy: { image: 'os', target: undefined },
    });
    await eventually(async () => ((await nodeState(t.nodes, 'c0'))?.progress?.doneBytes ?? 0) > 0, { what: 'the transfer under way' });
    await agent.kill('SIGKILL');

    const failed = await eventually(
      async () => {
        const node = await nodeState(t.nodes, 'c0');
        return node?.provisionState === ProvisionState.PROVISION_STATE_DEPLOY_FAILED ? node : undefined;
      },
      { timeoutMs: 15_000, what: 'deploy failed' },
    );
    assert.match(failed.lastError, /^no heartbeat from the agent for \d+s \(timeout 3s\)$/);
    assert.equal(failed.reservation, '');
    const events = (await t.nodes.listNodeEvents({ node: 'c0' })).events;
    assert.equal(events.at(-1)?.kind, 'timeout');
    assert.equal(events.at(-1)?.actor, 'sweep');
  });

  it('several agents deploy at once, each disk ends up holding the image', async () => {
    const t = await startTestController({
      heartbeatTimeout: '20s',
      heartbeatIntervalMin: '300ms',
      heartbeatIntervalMax: '600ms',
      heartbeatFlushInterval: '50ms',
      startupGrace: '0s',
      maxConcurrentDeploys: '2',
    });
    cleanups.push(() => t.destroy());
    const image = await addImage(t.controller, 'os', makeImageContent(12 * MIB, 2));
    const machines = await Promise.all([0, 1, 2, 3].map((i) => uniqueFakeMachine(join(dirs.path, `p${i}`), 460 + i)));
    for (const machine of machines) agents.push(spawnAgent({ controller: t.controller.grpcAddress, root: machine.root }));
    await makeAvailable(t.nodes, machines);
    await Promise.all(
      machines.map((_, index) =>
        t.nodes.setProvisionState({
          node: `c${index}`,
          action: ProvisionAction.PROVISION_ACTION_DEPLOY,
          deploy: { image: 'os', target: undefined },
        }),
      ),
    );
    await eventually(
      async () => {
        for (const index of machines.keys()) {
          const node = await nodeState(t.nodes, `c${index}`);
          if (node?.lastError) throw new Error(`c${index}: ${node.lastError}`);
          if (node?.provisionState !== ProvisionState.PROVISION_STATE_ACTIVE) return false;
        }
        return true;
      },
      { timeoutMs: 60_000, what: 'every node active' },
    );
    for (const machine of machines) assert.ok(await diskHolds(machine, image));
  });
});
