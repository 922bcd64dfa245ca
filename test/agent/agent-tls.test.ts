import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, afterEach, before, describe, it } from 'node:test';
import { ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { type AgentProcess, msg, spawnAgent } from '../helpers/agent-process.js';
import { spawnController } from '../helpers/controller-process.js';
import { eventually, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { addImage, makeImageContent, sha256 } from '../helpers/images.js';
import { makeTestPki, type TestPki } from '../helpers/tls.js';

const MIB = 1024 * 1024;
const QUICK = {
  heartbeatTimeout: '20s',
  heartbeatIntervalMin: '300ms',
  heartbeatIntervalMax: '600ms',
  sweepInterval: '500ms',
  heartbeatFlushInterval: '50ms',
  startupGrace: '0s',
  imageChunkSize: '256K',
};
const kebab = (flags: Record<string, string>) =>
  Object.fromEntries(Object.entries(flags).map(([key, value]) => [key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`), value]));

describe('agents over TLS', () => {
  const dirs = tempDir('metalcast-agent-tls-');
  const agents: AgentProcess[] = [];
  let pki: TestPki;

  before(async () => {
    pki = await makeTestPki(dirs.path);
  });
  afterEach(async () => {
    await Promise.all(agents.splice(0).map((a) => a.kill('SIGKILL')));
  });
  after(() => dirs.remove());

  describe('end to end', () => {
    let t: TestController;
    before(async () => {
      t = await startTestController({ ...QUICK, ...pki.controllerFlags }, undefined, { caPem: pki.ca.certPem });
    });
    after(async () => {
      await t.destroy();
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

    it('inspects, cleans and deploys a node whose agent speaks TLS both ways, its certificate pinned', async () => {
      const content = makeImageContent(5 * MIB + 4321);
      const image = await addImage(t.controller, 'tls-os', content);
      const machine = await uniqueFakeMachine(join(dirs.path, 'm1'), 311);
      await t.nodes.createNode({ name: 't1', macAddresses: [machine.macs[0] as string] });
      await act('t1', ProvisionAction.PROVISION_ACTION_MANAGE);
      await act('t1', ProvisionAction.PROVISION_ACTION_INSPECT);
      // Held in inspect wait until its certificate is seen pinned (leaving inspect wait forgets it with the token).
      await t.nodes.setMaintenance({ node: 't1', enabled: true, reason: 'look at the pin first' });
      const agent = spawnAgent({ controller: t.controller.grpcAddress, root: machine.root, ca: pki.caFile });
      agents.push(agent);
      const listening = await agent.waitForLog(msg('agent API listening'));
      const served = listening.tls as { fingerprint: string };
      assert.match(served.fingerprint, /^([0-9A-F]{2}:){31}[0-9A-F]{2}$/);
      assert.ok(!agent.logs.some((l) => typeof l.msg === 'string' && l.msg.includes('plaintext')), 'no plaintext warning');

      const pinned = await eventually(async () => (await t.controller.store.getNode('t1'))?.agentCertificatePem, {
        what: 'the agent certificate to be pinned',
      });
      assert.equal(new X509Certificate(pinned).fingerprint256, served.fingerprint, 'the certificate the agent serves is the one pinned');
      await t.nodes.setMaintenance({ node: 't1', enabled: false, reason: '' });
      await waitFor('t1', ProvisionState.PROVISION_STATE_MANAGEABLE);

      await act('t1', ProvisionAction.PROVISION_ACTION_PROVIDE);
      await waitFor('t1', ProvisionState.PROVISION_STATE_AVAILABLE);
      await act('t1', ProvisionAction.PROVISION_ACTION_DEPLOY, 'tls-os');
      const active = await waitFor('t1', ProvisionState.PROVISION_STATE_ACTIVE);
      assert.equal(active.lastError, '');
      const written = await readFile((machine.disks[0] as { path: string }).path);
      assert.equal(sha256(written.subarray(0, image.size)), image.sha256, 'the disk holds the image');
    });

    it('refuses to start without --ca or --insecure, or with a --ca it cannot read: exit code 2', async () => {
      const machine = await uniqueFakeMachine(join(dirs.path, 'm2'), 312);
      let stderr = '';
      const neither = spawnAgent({ controller: t.controller.grpcAddress, root: machine.root, insecure: 'false' });
      agents.push(neither);
      neither.child.stderr?.on('data', (chunk: Buffer) => {
        stderr += chunk.toString();
      });
      assert.equal(await neither.exited, 2);
      assert.match(
        stderr,
        /the agent talks to the controller over TLS: give --ca \(metalcast\.ca= on the kernel command line\).* or --insecure/,
      );

      stderr = '';
      const unreadable = spawnAgent({ controller: t.controller.grpcAddress, root: machine.root, ca: join(dirs.path, 'nope.pem') });
      agents.push(unreadable);
      unreadable.child.stderr?.on('data', (chunk: Buffer) => {
        stderr += chunk.toString();
      });
      assert.equal(await unreadable.exited, 2);
      assert.match(stderr, /--ca: cannot read .*nope\.pem: no such file/);
    });

    it("says so when the controller's certificate is not signed by the CA it was given", async () => {
      const strangers = await makeTestPki(dirs.path, 'strangers-');
      const machine = await uniqueFakeMachine(join(dirs.path, 'm3'), 313);
      const agent = spawnAgent({ controller: t.controller.grpcAddress, root: machine.root, ca: strangers.caFile });
      agents.push(agent);
      const line = await agent.waitForLog(
        msg(`the certificate of the controller at ${t.controller.grpcAddress} is not signed by a CA in --ca`),
      );
      assert.equal(line.level, 50);
    });
  });

  it('a plaintext agent is refused by a TLS controller, with a clear error on both sides', async () => {
    const controller = await spawnController(
      { ...kebab({ ...QUICK, ...pki.controllerFlags }), 'data-dir': join(dirs.path, 'tls-controller'), 'operator-auth': 'none' },
      20_000,
      { caPem: pki.ca.certPem },
    );
    try {
      const machine = await uniqueFakeMachine(join(dirs.path, 'm4'), 314);
      const agent = spawnAgent({ controller: controller.grpcAddress, root: machine.root });
      agents.push(agent);
      const said = await agent.waitForLog(
        msg(`the controller at ${controller.grpcAddress} speaks TLS, and this agent runs with --insecure`),
      );
      assert.equal(said.level, 50);
      assert.match(said.msg as string, /give the agent --ca \(metalcast\.ca= on the kernel command line\)/);
      assert.ok(agent.logs.some(msg('talking to the controller and serving the agent API in plaintext (--insecure)')));
      const heard = await eventually(() => controller.logs.find(msg('a client spoke plaintext to this controller, which speaks TLS')), {
        what: "the controller's log line",
      });
      assert.equal(heard.level, 40);
      assert.match(heard.peer as string, /^127\.0\.0\.1:\d+$/);
    } finally {
      await controller.kill('SIGTERM');
    }
  });

  it('a TLS agent is refused by a plaintext controller, with a clear error on both sides', async () => {
    const controller = await spawnController({ ...kebab(QUICK), 'data-dir': join(dirs.path, 'plain-controller'), 'operator-auth': 'none' });
    try {
      const machine = await uniqueFakeMachine(join(dirs.path, 'm5'), 315);
      const agent = spawnAgent({ controller: controller.grpcAddress, root: machine.root, ca: pki.caFile });
      agents.push(agent);
      const said = await agent.waitForLog(
        msg(`the controller at ${controller.grpcAddress} does not speak TLS (is it running with --insecure?)`),
      );
      assert.equal(said.level, 50);
      const heard = await eventually(() => controller.logs.find(msg('a client tried TLS on this controller, which speaks plaintext')), {
        what: "the controller's log line",
      });
      assert.equal(heard.level, 40);
      assert.match(heard.peer as string, /^127\.0\.0\.1:\d+$/);
    } finally {
      await controller.kill('SIGTERM');
    }
  });
});
