import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createChannel, createClient, Status } from 'nice-grpc';
import { clientChannelOptions } from '../../common/grpc-options.js';
import { loadControllerConfig } from '../../controller/config.js';
import { type RunningController, startController } from '../../controller/controller.js';
import { PowerDrivers } from '../../controller/power/drivers.js';
import { FakePowerDriver } from '../../controller/power/fake.js';
import { ProvisionAction, ProvisionState, NodeServiceDefinition } from '../../gen/metalcast/v1/node.js';
import { type AgentProcess, spawnAgent } from '../helpers/agent-process.js';
import { createTestOperatorToken, eventually, operatorCallOptions, tempDir, testLogger } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';
import { addImage, makeImageContent } from '../helpers/images.js';

/*
 * Power drivers chosen per node by its power.driver property: the fake one
 * records what the controller asked for. Inspect, clean and deploy power the
 * node on into network boot; a deploy ends by booting the disk through the
 * driver (not the agent's reboot); a clean ends with power off; a power
 * failure fails the step with a last_error that names the driver.
 */
describe('power drivers', () => {
  const dirs = tempDir('metalcast-power-');
  const fakes = new Map<string, FakePowerDriver>();
  const fake = (id: string) => {
    let driver = fakes.get(id);
    if (!driver) {
      driver = new FakePowerDriver();
      fakes.set(id, driver);
    }
    return driver;
  };
  let controller: RunningController;
  let channel: ReturnType<typeof createChannel>;
  let nodes: ReturnType<typeof createClient<typeof NodeServiceDefinition>>;
  const agents: AgentProcess[] = [];

  before(async () => {
    const config = loadControllerConfig(
      {
        listen: '127.0.0.1:0',
        metricsListen: '127.0.0.1:0',
        dataDir: join(dirs.path, 'data'),
        controllerId: 'power-test',
        insecure: 'true',
        heartbeatTimeout: '20s',
        heartbeatIntervalMin: '300ms',
        heartbeatIntervalMax: '600ms',
        sweepInterval: '500ms',
        heartbeatFlushInterval: '50ms',
        startupGrace: '0s',
        imageChunkSize: '256K',
      },
      {},
    );
    const power = new PowerDrivers().register('fake', (properties) => fake(properties['power.fake_id'] ?? 'default'));
    controller = await startController(config, testLogger(), power);
    const token = await createTestOperatorToken(controller.store, 'admin');
    channel = createChannel(controller.grpcAddress, undefined, clientChannelOptions({ timeMs: 60_000, timeoutMs: 10_000 }));
    nodes = createClient(NodeServiceDefinition, channel, operatorCallOptions(token));
  });
  after(async () => {
    await Promise.all(agents.map((a) => a.kill('SIGKILL')));
    channel?.close();
    await controller?.stop();
    dirs.remove();
  });

  const act = (node: string, action: ProvisionAction, image?: string) =>
    nodes.setProvisionState({ node, action, deploy: image ? { image, target: undefined } : undefined });
  const waitFor = (name: string, state: ProvisionState) =>
    eventually(
      async () => {
        const { node } = await nodes.getNode({ node: name });
        if (node?.provisionState === state) return node;
        if (node?.lastError) throw new Error(`node ${name} is ${ProvisionState[node.provisionState]}: ${node.lastError}`);
        return undefined;
      },
      { timeoutMs: 30_000, what: `${name} to reach ${ProvisionState[state]}` },
    );

  it('powers the node on into network boot for inspect, clean and deploy, boots the disk after deploy and powers off after clean', async () => {
    const content = makeImageContent(2 * 1024 * 1024 + 17);
    await addImage(controller, 'power-os', content);
    const machine = await uniqueFakeMachine(join(dirs.path, 'm1'), 401);
    const driver = fake('p1');
    await nodes.createNode({
      name: 'p1',
      macAddresses: [machine.macs[0] as string],
      properties: { 'power.driver': 'fake', 'power.fake_id': 'p1' },
    });
    await act('p1', ProvisionAction.PROVISION_ACTION_MANAGE);
    assert.deepEqual(driver.actions, [], 'manage touches no power');
    await act('p1', ProvisionAction.PROVISION_ACTION_INSPECT);
    assert.deepEqual(driver.actions, ['boot_device:network', 'power_on']);
    // The fake machine's agent stands for the ramdisk the power on would have booted.
    agents.push(spawnAgent({ controller: controller.grpcAddress, root: machine.root }));
    await waitFor('p1', ProvisionState.PROVISION_STATE_MANAGEABLE);

    driver.actions.length = 0;
    await act('p1', ProvisionAction.PROVISION_ACTION_PROVIDE);
    await waitFor('p1', ProvisionState.PROVISION_STATE_AVAILABLE);
    assert.deepEqual(driver.actions, ['boot_device:network', 'reset', 'power_off']);

    driver.actions.length = 0;
    await act('p1', ProvisionAction.PROVISION_ACTION_DEPLOY, 'power-os');
    const active = await waitFor('p1', ProvisionState.PROVISION_STATE_ACTIVE);
    assert.equal(active.lastError, '');
    assert.deepEqual(driver.actions, ['boot_device:network', 'power_on', 'boot_device:disk', 'reset']);
    assert.equal(driver.bootDevice, 'disk');
    const record = join(machine.root, 'power-actions.log');
    assert.ok(!existsSync(record) || !/reboot/.test(readFileSync(record, 'utf8')), 'the driver rebooted the node, not the agent');
    const events = (await nodes.listNodeEvents({ node: 'p1' })).events.map((e) => e.message);
    assert.ok(
      events.some((m) => /final power: reboot/.test(m)),
      events.join('\n'),
    );
  });

  it('fails the step with a last_error naming the driver when power on fails', async () => {
    const driver = fake('p2');
    driver.failWith = 'QMP socket /run/p2.bmc: connection refused';
    await nodes.createNode({
      name: 'p2',
      macAddresses: ['52:54:00:77:00:02'],
      properties: { 'power.driver': 'fake', 'power.fake_id': 'p2' },
    });
    await act('p2', ProvisionAction.PROVISION_ACTION_MANAGE);
    const { node } = await act('p2', ProvisionAction.PROVISION_ACTION_INSPECT);
    assert.equal(node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_FAILED);
    assert.equal(node?.lastError, 'power on through fake failed: QMP socket /run/p2.bmc: connection refused');
  });

  it('refuses a node that names a driver that does not exist or lacks its settings, naming what to fix', async () => {
    await assertRejectsWith(
      nodes.createNode({ name: 'p3', macAddresses: ['52:54:00:77:00:03'], properties: { 'power.driver': 'redfish-ish' } }),
      Status.INVALID_ARGUMENT,
      /node 'p3' has power\.driver=redfish-ish, which is not a power driver; known: qemu, (\w+, )*fake/,
    );
    await nodes.createNode({ name: 'p4', macAddresses: ['52:54:00:77:00:04'], properties: {} });
    await assertRejectsWith(
      nodes.updateNode({ node: 'p4', setProperties: { 'power.driver': 'qemu' }, unsetProperties: [], setSecrets: {}, unsetSecrets: [] }),
      Status.INVALID_ARGUMENT,
      /the qemu power driver needs the property power\.qmp_socket/,
    );
  });

  it('reports a qemu driver whose QMP socket is not there', async () => {
    await nodes.createNode({
      name: 'p5',
      macAddresses: ['52:54:00:77:00:05'],
      properties: { 'power.driver': 'qemu', 'power.qmp_socket': join(dirs.path, 'no-such.bmc') },
    });
    await act('p5', ProvisionAction.PROVISION_ACTION_MANAGE);
    const { node } = await act('p5', ProvisionAction.PROVISION_ACTION_INSPECT);
    assert.equal(node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_FAILED);
    assert.match(node?.lastError ?? '', /^power on through qemu failed: cannot connect to the QMP socket .*no-such\.bmc: .*ENOENT/);
  });
});
