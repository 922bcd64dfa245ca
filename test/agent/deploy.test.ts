import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { type AgentProcess, spawnAgent } from '../helpers/agent-process.js';
import { eventually, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { addImage, makeImageContent, sha256 } from '../helpers/images.js';

const MIB = 1024 * 1024;

describe('deploy and clean end to end', () => {
  let t: TestController;
  const dirs = tempDir('metalcast-deploy-');
  const agents: AgentProcess[] = [];

  before(async () => {
    t = await startTestController({
      heartbeatTimeout: '20s',
      heartbeatIntervalMin: '300ms',
      heartbeatIntervalMax: '600ms',
      sweepInterval: '500ms',
      heartbeatFlushInterval: '50ms',
      startupGrace: '0s',
      imageChunkSize: '256K',
    });
  });
  after(async () => {
    await Promise.all(agents.map((a) => a.kill('SIGKILL')));
    await t.destroy();
    dirs.remove();
  });

  const waitFor = (name: string, state: ProvisionState, timeoutMs = 30_000) =>
    eventually(
      async () => {
        const { node } = await t.nodes.getNode({ node: name });
        if (node?.provisionState === state) return node;
        if (node?.lastError) throw new Error(`node ${name} is ${ProvisionState[node.provisionState]}: ${node.lastError}`);
        return undefined;
      },
      { timeoutMs, what: `${name} to reach ${ProvisionState[state]}` },
    );
  const act = (node: string, action: ProvisionAction, image?: string) =>
    t.nodes.setProvisionState({ node, action, deploy: image ? { image, target: undefined } : undefined });

  it('takes a node from enroll through inspect, provide and deploy to active, with the image on its disk, and back through cleaning', async () => {
    const content = makeImageContent(9 * MIB + 12345);
    const image = await addImage(t.controller, 'demo-os', content);
    const machine = await uniqueFakeMachine(join(dirs.path, 'm1'), 301);
    // Old data on the disk: zero chunks must be written as zeros, not skipped.
    const disk = machine.disks[0] as { path: string };
    const { writeFile } = await import('node:fs/promises');
    await writeFile(disk.path, Buffer.alloc(10 * MIB, 0xaa), { flag: 'r+' });

    await t.nodes.createNode({ name: 'd1', macAddresses: [machine.macs[0] as string] });
    await act('d1', ProvisionAction.PROVISION_ACTION_MANAGE);
    await act('d1', ProvisionAction.PROVISION_ACTION_INSPECT);
    agents.push(spawnAgent({ controller: t.controller.grpcAddress, root: machine.root }));
    await waitFor('d1', ProvisionState.PROVISION_STATE_MANAGEABLE);

    await act('d1', ProvisionAction.PROVISION_ACTION_PROVIDE);
    await waitFor('d1', ProvisionState.PROVISION_STATE_AVAILABLE);

    await act('d1', ProvisionAction.PROVISION_ACTION_DEPLOY, 'demo-os');
    const active = await waitFor('d1', ProvisionState.PROVISION_STATE_ACTIVE);
    assert.equal(active.lastError, '');
    const written = await readFile(disk.path);
    assert.equal(sha256(written.subarray(0, image.size)), image.sha256, 'the disk holds the image');
    const events = (await t.nodes.listNodeEvents({ node: 'd1' })).events.map((e) => e.message);
    assert.ok(events.some((m) => /deploy wait -> deploying/.test(m)));
    assert.ok(
      events.some((m) => new RegExp(`deploying -> active \\(deployed demo-os to .*sda: ${image.size} bytes`).test(m)),
      events.join('\n'),
    );
    const power = await readFile(join(machine.root, 'power-actions.log'), 'utf8');
    assert.match(power, /reboot/);
    // The agent's log brackets the write: an operator reads it, and the transfer and fan-out benchmarks time it.
    const messages = (agents[0] as AgentProcess).logs.map((l) => String(l.msg));
    const start = messages.findIndex((m) => m.startsWith('writing image'));
    const end = messages.findIndex((m) => m.startsWith('image written and verified'));
    assert.ok(start >= 0 && end > start, `a 'writing image' line, then 'image written and verified': ${messages.join(' / ')}`);

    await act('d1', ProvisionAction.PROVISION_ACTION_UNDEPLOY);
    const available = await waitFor('d1', ProvisionState.PROVISION_STATE_AVAILABLE);
    assert.equal(available.deploy, undefined, 'the deploy spec is cleared after cleaning');
    const erased = await readFile(disk.path);
    assert.ok(
      erased.subarray(0, 4 * MIB).every((b) => b === 0),
      'the start of the disk is erased',
    );
  });

  it('refuses a deploy of an unknown image, and a deploy whose disk hints no disk meets', async () => {
    const machine = await uniqueFakeMachine(join(dirs.path, 'm2'), 302);
    await t.nodes.createNode({ name: 'd2', macAddresses: [machine.macs[0] as string] });
    await act('d2', ProvisionAction.PROVISION_ACTION_MANAGE);
    await act('d2', ProvisionAction.PROVISION_ACTION_INSPECT);
    agents.push(spawnAgent({ controller: t.controller.grpcAddress, root: machine.root }));
    await waitFor('d2', ProvisionState.PROVISION_STATE_MANAGEABLE);
    await act('d2', ProvisionAction.PROVISION_ACTION_PROVIDE);
    await waitFor('d2', ProvisionState.PROVISION_STATE_AVAILABLE);
    await assert.rejects(
      act('d2', ProvisionAction.PROVISION_ACTION_DEPLOY, 'no-such-image'),
      /NOT_FOUND: image 'no-such-image' does not exist/,
    );
    await assert.rejects(
      t.nodes.setProvisionState({
        node: 'd2',
        action: ProvisionAction.PROVISION_ACTION_DEPLOY,
        deploy: {
          image: 'demo-os',
          target: {
            serial: 'NOPE',
            devicePath: undefined,
            name: undefined,
            sizeBytes: undefined,
            minSizeBytes: undefined,
            model: undefined,
            rotational: undefined,
          },
        },
      }),
      /no disk matches the hints \(serial=NOPE\)/,
    );
    assert.equal((await t.nodes.getNode({ node: 'd2' })).node?.provisionState, ProvisionState.PROVISION_STATE_AVAILABLE);
  });
});
