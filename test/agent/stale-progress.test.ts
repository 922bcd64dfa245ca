import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, it } from 'node:test';
import { ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { type AgentProcess, spawnAgent } from '../helpers/agent-process.js';
import { eventually, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { addImage, makeImageContent } from '../helpers/images.js';

/*
 * Issue 18 item 6 and issue 19 item 12: after a node reached active,
 * `node show`, `node show --json` and `node watch --until` without a TTY
 * showed the progress of an earlier step ("100 % erasing sda", "resuming").
 * Progress belongs to the running step only. The CLI runs as a user runs it
 * (a process without a TTY); its output is asserted verbatim.
 */

const BIN = fileURLToPath(new URL('../../bin/metalcast.js', import.meta.url));
const MIB = 1024 * 1024;

describe('progress belongs to the running step only', { timeout: 120_000 }, () => {
  let t: TestController;
  const dirs = tempDir('metalcast-progress-');
  const agents: AgentProcess[] = [];
  let env: NodeJS.ProcessEnv;

  before(async () => {
    t = await startTestController({
      heartbeatTimeout: '20s',
      heartbeatIntervalMin: '200ms',
      heartbeatIntervalMax: '300ms',
      sweepInterval: '500ms',
      heartbeatFlushInterval: '50ms',
      startupGrace: '0s',
      imageChunkSize: '256K',
      // Full erase reports progress ("erasing sda") over the whole disk, as the issue saw.
      cleanMode: 'full',
    });
    env = { ...process.env, METALCAST_CONTROLLER: t.controller.grpcAddress, METALCAST_TOKEN: t.adminToken, METALCAST_INSECURE: 'true' };
  });
  after(async () => {
    await Promise.all(agents.map((a) => a.kill('SIGKILL')));
    await t.destroy();
    dirs.remove();
  });

  const cli = (args: string[]): Promise<{ code: number; stdout: string; stderr: string }> =>
    new Promise((resolve) => {
      execFile(process.execPath, [BIN, ...args], { env, timeout: 60_000 }, (error, stdout, stderr) =>
        resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr }),
      );
    });
  const waitFor = (name: string, state: ProvisionState, timeoutMs = 60_000) =>
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

  it('after clean (erasing sda) and deploy, node show, show --json and watch --until active show no progress', async () => {
    await addImage(t.controller, 'progress-os', makeImageContent(6 * MIB + 7));
    // A small disk, so that a full erase takes a moment and reports progress.
    const machine = await uniqueFakeMachine(join(dirs.path, 'm1'), 901, { disks: [{ name: 'sda', sizeBytes: 192 * MIB }] });
    await t.nodes.createNode({ name: 'p1', macAddresses: [machine.macs[0] as string] });
    await act('p1', ProvisionAction.PROVISION_ACTION_MANAGE);
    await act('p1', ProvisionAction.PROVISION_ACTION_INSPECT);
    agents.push(spawnAgent({ controller: t.controller.grpcAddress, root: machine.root }));
    await waitFor('p1', ProvisionState.PROVISION_STATE_MANAGEABLE);
    await act('p1', ProvisionAction.PROVISION_ACTION_PROVIDE);
    // The erase reports its progress while it runs: the feature still works.
    const erasing = await eventually(
      async () => {
        const { node } = await t.nodes.getNode({ node: 'p1' });
        return node?.progress?.phase === 'erasing sda' ? node.progress : undefined;
      },
      { timeoutMs: 60_000, intervalMs: 20, what: 'erase progress on the node' },
    );
    assert.ok(erasing.totalBytes > 0);
    await waitFor('p1', ProvisionState.PROVISION_STATE_AVAILABLE);
    assert.equal((await t.nodes.getNode({ node: 'p1' })).node?.progress, undefined, 'available: the erase is history');

    await act('p1', ProvisionAction.PROVISION_ACTION_DEPLOY, 'progress-os');
    await waitFor('p1', ProvisionState.PROVISION_STATE_ACTIVE);
    // Heartbeats that go on after active (the agent still reports its last command) must not bring it back.
    const agent = agents[0] as AgentProcess;
    const since = new Date().toISOString();
    await agent.waitForLog((l) => String(l.time) > since && String(l.msg).includes('lookup failed'), 10_000);

    const show = await cli(['node', 'show', 'p1']);
    assert.equal(show.code, 0, show.stderr);
    const progressLine = show.stdout.split('\n').find((line) => line.startsWith('progress'));
    assert.equal(progressLine, 'progress         -');
    assert.match(show.stdout, /^provision state {2}active$/m);

    const json = await cli(['node', 'show', 'p1', '--json']);
    assert.equal(json.code, 0, json.stderr);
    const shown = JSON.parse(json.stdout) as Record<string, unknown>;
    assert.equal(shown.provisionState ?? shown.provision_state, 'active', json.stdout.slice(0, 400));
    assert.equal(shown.progress, undefined, `no progress in --json: ${JSON.stringify(shown.progress)}`);

    const watch = await cli(['node', 'watch', 'p1', '--until', 'active']);
    assert.equal(watch.code, 0, watch.stderr);
    assert.equal(watch.stdout.replace(/^\S+ /gm, '<time> '), '<time> p1 active\n');
  });
});
