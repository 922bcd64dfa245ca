import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, afterEach, before, describe, it } from 'node:test';
import { createChannel, createClient, Status } from 'nice-grpc';
import { agentApiToken } from '../../common/agent-credentials.js';
import { agentMetadata } from '../../common/agent-metadata.js';
import { AgentServiceDefinition } from '../../gen/metalcast/v1/agent.js';
import { ProvisionState } from '../../gen/metalcast/v1/node.js';
import { createWaitingNode, lookup, openHeartbeat } from '../helpers/agent-client.js';
import { type AgentProcess, msg, spawnAgent } from '../helpers/agent-process.js';
import { eventually, metricValue, scrapeMetrics, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';

const FAST = {
  heartbeatTimeout: '10s',
  heartbeatIntervalMin: '300ms',
  heartbeatIntervalMax: '600ms',
  sweepInterval: '200ms',
  heartbeatFlushInterval: '50ms',
  startupGrace: '0s',
};

describe('inspection with real agent processes', () => {
  let t: TestController;
  const dirs = tempDir('metalcast-inspect-');
  const agents: AgentProcess[] = [];
  let machineIndex = 100;

  const newMachine = async () => {
    machineIndex += 1;
    return uniqueFakeMachine(join(dirs.path, `m${machineIndex}`), machineIndex);
  };
  const startAgent = (root: string, controller = t.controller.grpcAddress) => {
    const agent = spawnAgent({ controller, root });
    agents.push(agent);
    return agent;
  };
  const stateOf = async (name: string) => (await t.nodes.getNode({ node: name })).node?.provisionState;

  before(async () => {
    t = await startTestController(FAST);
  });
  afterEach(async () => {
    await Promise.all(agents.splice(0).map((a) => a.kill('SIGKILL')));
  });
  after(async () => {
    await t.destroy();
    dirs.remove();
  });

  it('ends in manageable with the disks and MACs the machine has', async () => {
    const machine = await newMachine();
    await createWaitingNode(t.nodes, 'inspect-1', [machine.macs[0] as string]);
    const agent = startAgent(machine.root);
    await eventually(async () => (await stateOf('inspect-1')) === ProvisionState.PROVISION_STATE_MANAGEABLE, { what: 'manageable' });

    const { node } = await t.nodes.getNode({ node: 'inspect-1' });
    assert.equal(node?.lastError, '');
    assert.deepEqual(
      node?.inventory?.interfaces.map((i) => i.macAddress),
      machine.macs,
    );
    assert.deepEqual(
      node?.inventory?.disks.map((d) => [d.devicePath, d.sizeBytes]),
      machine.disks.map((d) => [d.path, d.sizeBytes]),
    );
    assert.equal(node?.inventory?.system?.serialNumber, machine.system.serial);
    const events = (await t.nodes.listNodeEvents({ node: 'inspect-1' })).events;
    assert.match(
      events.filter((e) => e.kind === 'transition').at(-1)?.message ?? '',
      /inspect wait -> manageable \(inspection found 1 disks, 2 NICs/,
    );
    // The agent's token was wiped when the node left the agent states: it goes back to looking up.
    await agent.waitForLog(msg('controller no longer accepts this agent token'));
  });

  it('fails inspection when an enrolled MAC is not on the machine', async () => {
    const machine = await newMachine();
    await createWaitingNode(t.nodes, 'inspect-wrong-mac', [machine.macs[0] as string, '02:00:00:00:99:99']);
    startAgent(machine.root);
    await eventually(async () => (await stateOf('inspect-wrong-mac')) === ProvisionState.PROVISION_STATE_INSPECT_FAILED, {
      what: 'inspect failed',
    });
    const { node } = await t.nodes.getNode({ node: 'inspect-wrong-mac' });
    assert.match(node?.lastError ?? '', /enrolled MAC 02:00:00:00:99:99 not found on the machine/);
  });

  it('refuses calls to the agent without the right token, and runs commands with it', async () => {
    const machine = await newMachine();
    const node = await createWaitingNode(t.nodes, 'inspect-token', [machine.macs[0] as string]);
    // Maintenance keeps the controller from finishing the inspection, so the agent stays ours to poke.
    await t.nodes.setMaintenance({ node: node.uuid, enabled: true, reason: 'test holds the node' });
    const agent = startAgent(machine.root);
    await agent.waitForLog(msg('heartbeat stream established'));
    const address = (await agent.waitForLog(msg('agent API listening'))).advertiseAddress as string;
    const channel = createChannel(address);
    try {
      const client = createClient(AgentServiceDefinition, channel);
      await assertRejectsWith(client.getInventory({}), Status.UNAUTHENTICATED, /agent API credential/);
      await assertRejectsWith(client.listCommands({}, { metadata: agentMetadata(node.uuid, 'not-the-token') }), Status.UNAUTHENTICATED);
      const endpoint = t.controller.sessions.agentEndpoint(node.uuid);
      assert.ok(endpoint, 'the controller knows how to reach the agent');
      // The agent token itself is refused: the agent takes only the credential derived from it.
      await assertRejectsWith(client.getInventory({}, { metadata: agentMetadata(node.uuid, endpoint.token) }), Status.UNAUTHENTICATED);
      const auth = { metadata: agentMetadata(node.uuid, agentApiToken(endpoint.token)) };
      const inventory = await client.getInventory({}, auth);
      assert.deepEqual(
        inventory.inventory?.interfaces.map((i) => i.macAddress),
        machine.macs,
      );
      await assertRejectsWith(
        client.runCommand({ requestId: 'r1', parameters: { command: undefined } }, auth),
        Status.INVALID_ARGUMENT,
        /known commands: get_inventory, write_image, write_config_drive, erase_disks, power_off, reboot/,
      );
      const { command } = await client.runCommand({ requestId: 'r2', parameters: { command: { $case: 'powerOff', value: {} } } }, auth);
      const seen = [];
      for await (const update of client.watchCommand({ id: command?.id ?? '' }, auth)) seen.push(update.command?.state);
      assert.equal(seen.at(-1), 2 /* SUCCEEDED */);
      // A retry with the same request id returns the same command instead of acting twice.
      const again = await client.runCommand({ requestId: 'r2', parameters: { command: { $case: 'powerOff', value: {} } } }, auth);
      assert.equal(again.command?.id, command?.id);
      const recorded = await readFile(join(machine.root, 'power-actions.log'), 'utf8');
      assert.equal(recorded.trim().split('\n').length, 1);
      assert.match(recorded, /power_off/);
    } finally {
      channel.close();
    }
  });

  it('an agent killed and restarted looks up again, gets a new token and finishes; the old token stops working', async () => {
    const machine = await newMachine();
    const node = await createWaitingNode(t.nodes, 'inspect-restart', [machine.macs[0] as string]);
    await t.nodes.setMaintenance({ node: node.uuid, enabled: true, reason: 'hold until the agent restarted' });
    const first = startAgent(machine.root);
    await first.waitForLog(msg('heartbeat stream established'));
    const oldToken = t.controller.sessions.agentEndpoint(node.uuid)?.token;
    assert.ok(oldToken);
    await first.kill('SIGKILL');

    const second = startAgent(machine.root);
    await second.waitForLog(msg('heartbeat stream established'));
    const newToken = t.controller.sessions.agentEndpoint(node.uuid)?.token;
    assert.ok(newToken);
    assert.notEqual(newToken, oldToken);

    const stale = openHeartbeat(t.gateway, node.uuid, oldToken);
    stale.send();
    const ended = await stale.ended;
    assert.equal((ended as { code?: Status }).code, Status.UNAUTHENTICATED);

    await t.nodes.setMaintenance({ node: node.uuid, enabled: false, reason: '' });
    // Maintenance off: the next heartbeat hands the node to the conductor.
    await eventually(async () => (await stateOf('inspect-restart')) === ProvisionState.PROVISION_STATE_MANAGEABLE, {
      what: 'manageable after restart',
    });
  });

  it('a lookup while the agent is connected gets no second token', async () => {
    const machine = await newMachine();
    const node = await createWaitingNode(t.nodes, 'inspect-second', [machine.macs[0] as string]);
    await t.nodes.setMaintenance({ node: node.uuid, enabled: true, reason: 'hold' });
    const agent = startAgent(machine.root);
    await agent.waitForLog(msg('heartbeat stream established'));
    await assertRejectsWith(lookup(t.gateway, [machine.macs[0] as string]), Status.NOT_FOUND, /no node waiting for an agent/);
  });

  it('exits non-zero when its lookup budget runs out', async () => {
    const machine = await newMachine();
    const agent = spawnAgent({ controller: t.controller.grpcAddress, root: machine.root, 'lookup-budget': '1s' });
    agents.push(agent);
    assert.equal(await agent.exited, 3);
    assert.ok(agent.logs.some(msg('the controller knows no node waiting for an agent')));
  });

  it('tries the next controller address when the first cannot be reached', async () => {
    const machine = await newMachine();
    await createWaitingNode(t.nodes, 'inspect-failover', [machine.macs[0] as string]);
    startAgent(machine.root, `127.0.0.1:1,${t.controller.grpcAddress}`);
    await eventually(async () => (await stateOf('inspect-failover')) === ProvisionState.PROVISION_STATE_MANAGEABLE, {
      what: 'manageable through the second address',
    });
  });
});

describe('a controller restarted mid-inspection', () => {
  it('is reconnected to, and nothing is failed thanks to the grace period', async () => {
    const dirs = tempDir('metalcast-inspect-restart-');
    // A heartbeat timeout shorter than the outage: without the grace period the node would fail.
    const flags = { ...FAST, heartbeatTimeout: '2s', heartbeatIntervalMin: '200ms', heartbeatIntervalMax: '400ms', startupGrace: '5s' };
    let t = await startTestController(flags);
    const machine = await uniqueFakeMachine(join(dirs.path, 'm'), 7);
    const node = await createWaitingNode(t.nodes, 'restart-1', [machine.macs[0] as string]);
    await t.nodes.setMaintenance({ node: node.uuid, enabled: true, reason: 'hold' });
    const agent = spawnAgent({ controller: t.controller.grpcAddress, root: machine.root });
    try {
      await agent.waitForLog(msg('heartbeat stream established'));
      const address = t.controller.grpcAddress;
      await t.stop();
      // Down for longer than the heartbeat timeout.
      await new Promise((r) => setTimeout(r, 2500));
      t = await startTestController({ ...flags, listen: address }, t.dataDir);
      await eventually(async () => metricValue(await scrapeMetrics(t.controller), 'metalcast_agents_connected') === 1, {
        what: 'the agent to reconnect',
        timeoutMs: 15_000,
      });
      // Still waiting, not failed.
      assert.equal((await t.nodes.getNode({ node: 'restart-1' })).node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_WAIT);
      await t.nodes.setMaintenance({ node: node.uuid, enabled: false, reason: '' });
      await eventually(
        async () => (await t.nodes.getNode({ node: 'restart-1' })).node?.provisionState === ProvisionState.PROVISION_STATE_MANAGEABLE,
        {
          what: 'manageable',
        },
      );
      const events = (await t.nodes.listNodeEvents({ node: 'restart-1' })).events;
      assert.ok(!events.some((e) => e.kind === 'timeout'), 'no timeout event');
    } finally {
      await agent.kill('SIGKILL');
      await t.destroy();
      dirs.remove();
    }
  });
});
