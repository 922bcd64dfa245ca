import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, it } from 'node:test';
import { type AbortPower, ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { type AgentProcess, spawnAgent } from '../helpers/agent-process.js';
import { eventually, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { addImage, makeImageContent } from '../helpers/images.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';

/*
 * Issue 18 item 14: aborting a deploy or a clean leaves the machine powered
 * off (or as the operator asked), not running a half-written disk. The
 * nodes here have no power driver, so the controller asks the agent, whose
 * recording power driver writes what it did to power-actions.log. The
 * abort comes while the agent writes (a throttled proxy keeps the write
 * going): the conductor holds the node's lock then, and used to refuse the
 * abort with "node is locked … retry when it finishes".
 */

const BIN = fileURLToPath(new URL('../../bin/metalcast.js', import.meta.url));
const MIB = 1024 * 1024;

describe('abort powers the machine off', { timeout: 180_000 }, () => {
  let t: TestController;
  let proxy: TcpProxy;
  const dirs = tempDir('metalcast-abort-power-');
  const agents: AgentProcess[] = [];
  let env: NodeJS.ProcessEnv;

  before(async () => {
    t = await startTestController({
      heartbeatTimeout: '30s',
      heartbeatIntervalMin: '200ms',
      heartbeatIntervalMax: '400ms',
      sweepInterval: '500ms',
      heartbeatFlushInterval: '50ms',
      startupGrace: '0s',
      imageChunkSize: '256K',
      cleanMode: 'full',
    });
    await addImage(t.controller, 'abort-os', makeImageContent(24 * MIB + 5));
    proxy = await TcpProxy.start(t.controller.grpcAddress);
    env = { ...process.env, METALCAST_CONTROLLER: t.controller.grpcAddress, METALCAST_TOKEN: t.adminToken, METALCAST_INSECURE: 'true' };
  });
  after(async () => {
    await Promise.all(agents.map((a) => a.kill('SIGKILL')));
    await proxy?.close();
    await t?.destroy();
    dirs.remove();
  });

  const cli = (args: string[]): Promise<{ code: number; stdout: string; stderr: string }> =>
    new Promise((resolve) => {
      execFile(process.execPath, [BIN, ...args], { env, timeout: 60_000 }, (error, stdout, stderr) =>
        resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr }),
      );
    });
  const getNode = async (name: string) => (await t.nodes.getNode({ node: name })).node;
  const waitFor = (name: string, state: ProvisionState, timeoutMs = 60_000) =>
    eventually(async () => ((await getNode(name))?.provisionState === state ? getNode(name) : undefined), {
      timeoutMs,
      what: `${name} to reach ${ProvisionState[state]}`,
    });
  const act = (node: string, action: ProvisionAction, image?: string) =>
    t.nodes.setProvisionState({ node, action, deploy: image ? { image, target: undefined } : undefined });
  const powerLog = async (root: string) =>
    (await readFile(join(root, 'power-actions.log'), 'utf8').catch(() => '')).trim().split('\n').filter(Boolean);

  async function availableNode(name: string, index: number, diskBytes = 64 * MIB): Promise<{ root: string; agent: AgentProcess }> {
    const machine = await uniqueFakeMachine(join(dirs.path, name), 950 + index, { disks: [{ name: 'sda', sizeBytes: diskBytes }] });
    await t.nodes.createNode({ name, macAddresses: [machine.macs[0] as string] });
    await act(name, ProvisionAction.PROVISION_ACTION_MANAGE);
    await act(name, ProvisionAction.PROVISION_ACTION_INSPECT);
    const agent = spawnAgent({ controller: proxy.address, root: machine.root });
    agents.push(agent);
    await waitFor(name, ProvisionState.PROVISION_STATE_MANAGEABLE);
    await act(name, ProvisionAction.PROVISION_ACTION_PROVIDE);
    await waitFor(name, ProvisionState.PROVISION_STATE_AVAILABLE);
    return { root: machine.root, agent };
  }

  /** Waits until the node's agent is writing (progress on the node). */
  const writing = (name: string, phase: RegExp) =>
    eventually(async () => phase.test((await getNode(name))?.progress?.phase ?? ''), {
      timeoutMs: 30_000,
      intervalMs: 20,
      what: `${name}'s agent at work`,
    });

  it('an abort in the middle of writing the image stops the step and powers the machine off through its agent', async () => {
    const { root } = await availableNode('ab1', 1);
    assert.deepEqual(await powerLog(root), [], 'not powered off before');
    proxy.throttle(2 * MIB);
    try {
      await act('ab1', ProvisionAction.PROVISION_ACTION_DEPLOY, 'abort-os');
      await writing('ab1', /^writing$/);
      const { node } = await t.nodes.setProvisionState({ node: 'ab1', action: ProvisionAction.PROVISION_ACTION_ABORT });
      assert.equal(node?.provisionState, ProvisionState.PROVISION_STATE_DEPLOY_FAILED);
      assert.match(node?.lastError ?? '', /^aborted by \S+ while in deploy wait$/);
    } finally {
      proxy.throttle(0);
    }
    const log = await eventually(async () => ((await powerLog(root)).length > 0 ? powerLog(root) : undefined), {
      timeoutMs: 5000,
      what: 'the power off',
    });
    assert.match(log.join('\n'), /power_off$/);
    const events = (await t.nodes.listNodeEvents({ node: 'ab1' })).events;
    const power = events.find((e) => e.kind === 'abort_power');
    assert.match(power?.message ?? '', /^asked its agent at \S+ to power the machine off after the abort$/);
    assert.equal((await getNode('ab1'))?.reservation, '', 'no lock left');
  });

  it('an abort in the middle of a clean stops the step and powers the machine off', async () => {
    const { root, agent } = await availableNode('ab2', 2, 512 * MIB);
    await act('ab2', ProvisionAction.PROVISION_ACTION_DEPLOY, 'abort-os');
    await waitFor('ab2', ProvisionState.PROVISION_STATE_ACTIVE);
    const afterDeploy = (await powerLog(root)).length; // the deploy's final reboot
    // Undeploy: a full erase of 512 MiB takes a moment; abort while it runs.
    const since = new Date().toISOString();
    await act('ab2', ProvisionAction.PROVISION_ACTION_UNDEPLOY);
    // The agent's own word that the erase started: quicker than its progress reaching the node.
    await agent.waitForLog((l) => l.msg === 'erasing disks' && String(l.time) >= since, 30_000);
    const { node } = await t.nodes.setProvisionState({ node: 'ab2', action: ProvisionAction.PROVISION_ACTION_ABORT });
    assert.equal(node?.provisionState, ProvisionState.PROVISION_STATE_CLEAN_FAILED);
    const log = await eventually(async () => ((await powerLog(root)).length > afterDeploy ? powerLog(root) : undefined), {
      timeoutMs: 5000,
      what: 'the power off',
    });
    assert.match(log.at(-1) ?? '', /power_off$/);
    assert.equal((await getNode('ab2'))?.reservation, '', 'no lock left');
  });

  it('`node abort --power keep` leaves the machine be; without an agent or a driver the history says so; a bad value is refused', async () => {
    // Nodes waiting for an agent that never comes: the abort has nobody to ask.
    for (const name of ['ab3', 'ab4']) {
      await t.nodes.createNode({ name, macAddresses: [`02:6d:63:ff:00:0${name.at(-1)}`] });
      await act(name, ProvisionAction.PROVISION_ACTION_MANAGE);
      await act(name, ProvisionAction.PROVISION_ACTION_PROVIDE);
    }
    const kept = await cli(['node', 'abort', 'ab3', '--power', 'keep']);
    assert.equal(kept.code, 0, kept.stderr);
    assert.equal(kept.stdout, 'node ab3 is now clean_failed\n');
    const abortPower = async (name: string) =>
      (await t.nodes.listNodeEvents({ node: name })).events.filter((e) => e.kind === 'abort_power').map((e) => e.message);
    assert.deepEqual(await abortPower('ab3'), ['left powered as it was, as the abort asked']);

    const off = await cli(['node', 'abort', 'ab4']);
    assert.equal(off.code, 0, off.stderr);
    assert.equal(off.stdout, 'node ab4 is now clean_failed\n');
    assert.deepEqual(await abortPower('ab4'), ['no power driver and no live agent: the machine was not powered off; check it by hand']);

    const bad = await cli(['node', 'abort', 'ab4', '--power', 'maybe']);
    assert.notEqual(bad.code, 0);
    assert.match(bad.stderr, /'maybe' is not off or keep/);
    await assert.rejects(
      t.nodes.setProvisionState({ node: 'ab4', action: ProvisionAction.PROVISION_ACTION_ABORT, abortPower: 7 as AbortPower }),
      /INVALID_ARGUMENT: abort_power: 7 is not one of ABORT_POWER_OFF, ABORT_POWER_KEEP/,
    );
  });
});
