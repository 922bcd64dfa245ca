import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createChannel, createClient, Status } from 'nice-grpc';
import { clientChannelOptions } from '../../common/grpc-options.js';
import { createLogger } from '../../common/logging.js';
import { loadControllerConfig } from '../../controller/config.js';
import { type RunningController, startController } from '../../controller/controller.js';
import { PowerDrivers } from '../../controller/power/drivers.js';
import { FakePowerDriver } from '../../controller/power/fake.js';
import { SecretBox, SecretError } from '../../controller/secrets/secret-box.js';
import { NodeServiceDefinition, ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { createTestOperatorToken, operatorCallOptions, tempDir } from '../helpers/controller.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';

/*
 * Node secrets (BMC passwords): written through CreateNode and UpdateNode,
 * sealed before they reach the database, handed opened to the power
 * driver, never returned (only their names), and in no log line.
 */

const PASSWORD = 'hunter2-Sup3r-s3cret-BMC';
const NEW_PASSWORD = 'n3w-pa55word-after-rotation';

/** Every byte of every file under `dir`, as latin1 text (the SQLite file and its WAL). */
function allBytes(dir: string): string {
  let text = '';
  for (const entry of readdirSync(dir, { recursive: true, withFileTypes: true })) {
    if (entry.isFile()) text += readFileSync(join(entry.parentPath, entry.name)).toString('latin1');
  }
  return text;
}

describe('node secrets', () => {
  const dirs = tempDir('metalcast-secrets-');
  const logLines: string[] = [];
  /** The secrets each fake driver was made with, by node name. */
  const seen = new Map<string, Record<string, string>>();
  let controller: RunningController;
  let channel: ReturnType<typeof createChannel>;
  let nodes: ReturnType<typeof createClient<typeof NodeServiceDefinition>>;

  const start = async () => {
    const config = loadControllerConfig(
      {
        listen: '127.0.0.1:0',
        metricsListen: '127.0.0.1:0',
        dataDir: join(dirs.path, 'data'),
        controllerId: 'secrets-test',
        insecure: 'true',
        logLevel: 'trace',
      },
      {},
    );
    const logger = createLogger({ name: 'controller', level: 'trace', destination: { write: (line: string) => logLines.push(line) } });
    const power = new PowerDrivers().register('fake', (properties, secrets) => {
      if (!secrets['power.fake.password']) throw new Error('the fake power driver needs the secret power.fake.password');
      seen.set(properties['power.fake.node'] ?? '', secrets);
      return new FakePowerDriver();
    });
    controller = await startController(config, logger, power);
    const token = await createTestOperatorToken(controller.store, 'admin');
    channel = createChannel(controller.grpcAddress, undefined, clientChannelOptions({ timeMs: 60_000, timeoutMs: 10_000 }));
    nodes = createClient(NodeServiceDefinition, channel, operatorCallOptions(token));
  };
  const stop = async () => {
    channel?.close();
    await controller?.stop();
  };

  before(start);
  after(async () => {
    await stop();
    dirs.remove();
  });

  it('stores a secret given at creation sealed, lists only its name, and hands it opened to the driver', async () => {
    const { node } = await nodes.createNode({
      name: 's1',
      macAddresses: ['52:54:00:5e:00:01'],
      properties: { 'power.driver': 'fake', 'power.fake.node': 's1' },
      secrets: { 'power.fake.password': PASSWORD },
    });
    assert.deepEqual(node?.secretKeys, ['power.fake.password']);
    assert.ok(!JSON.stringify(node).includes(PASSWORD), 'CreateNode returned the password');
    const got = (await nodes.getNode({ node: 's1' })).node;
    assert.deepEqual(got?.secretKeys, ['power.fake.password']);
    assert.ok(!JSON.stringify(got).includes(PASSWORD), 'GetNode returned the password');
    const listed = (await nodes.listNodes({})).nodes;
    assert.ok(!JSON.stringify(listed).includes(PASSWORD), 'ListNodes returned the password');
    const events = (await nodes.listNodeEvents({ node: 's1' })).events;
    assert.match(events[0]?.message ?? '', /secrets power\.fake\.password/);
    assert.ok(!JSON.stringify(events).includes(PASSWORD));

    const sealed = (await controller.store.getNode('s1'))?.secrets['power.fake.password'] ?? '';
    assert.match(sealed, /^mcs1\.[0-9a-f]{8}\./, 'the store holds the sealed value');
    assert.ok(!allBytes(join(dirs.path, 'data')).includes(PASSWORD), 'the password is in the data directory in the clear');

    // The driver is made with the opened password when the node is powered.
    await nodes.setProvisionState({ node: 's1', action: ProvisionAction.PROVISION_ACTION_MANAGE });
    const inspecting = (await nodes.setProvisionState({ node: 's1', action: ProvisionAction.PROVISION_ACTION_INSPECT })).node;
    assert.equal(inspecting?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_WAIT, inspecting?.lastError);
    assert.deepEqual(seen.get('s1'), { 'power.fake.password': PASSWORD });
    await nodes.setProvisionState({ node: 's1', action: ProvisionAction.PROVISION_ACTION_ABORT });
  });

  it('changes, rotates and removes secrets and properties through UpdateNode, recording names only', async () => {
    await nodes.createNode({ name: 's2', macAddresses: ['52:54:00:5e:00:02'], properties: { rack: 'r9' } });
    const { node } = await nodes.updateNode({
      node: 's2',
      setProperties: { 'power.driver': 'fake', 'power.fake.node': 's2' },
      unsetProperties: ['rack'],
      setSecrets: { 'power.fake.password': PASSWORD },
      unsetSecrets: [],
    });
    assert.deepEqual(node?.properties, { 'power.driver': 'fake', 'power.fake.node': 's2' });
    assert.deepEqual(node?.secretKeys, ['power.fake.password']);
    const first = (await controller.store.getNode('s2'))?.secrets['power.fake.password'];
    await nodes.updateNode({
      node: 's2',
      setProperties: {},
      unsetProperties: [],
      setSecrets: { 'power.fake.password': NEW_PASSWORD },
      unsetSecrets: [],
    });
    const second = (await controller.store.getNode('s2'))?.secrets['power.fake.password'];
    assert.notEqual(second, first, 'a rotated secret is sealed anew');
    await nodes.setProvisionState({ node: 's2', action: ProvisionAction.PROVISION_ACTION_MANAGE });
    await nodes.setProvisionState({ node: 's2', action: ProvisionAction.PROVISION_ACTION_INSPECT });
    assert.deepEqual(seen.get('s2'), { 'power.fake.password': NEW_PASSWORD });
    await nodes.setProvisionState({ node: 's2', action: ProvisionAction.PROVISION_ACTION_ABORT });

    const messages = (await nodes.listNodeEvents({ node: 's2' })).events.filter((e) => e.kind === 'settings').map((e) => e.message);
    assert.deepEqual(messages, [
      'set power.driver, power.fake.node; unset rack; set secret power.fake.password',
      'set secret power.fake.password',
    ]);

    // Removing the password leaves the fake driver without what it needs: refused, naming it.
    await assertRejectsWith(
      nodes.updateNode({ node: 's2', setProperties: {}, unsetProperties: [], setSecrets: {}, unsetSecrets: ['power.fake.password'] }),
      Status.INVALID_ARGUMENT,
      /node 's2': the fake power driver needs the secret power\.fake\.password/,
    );
    const cleared = await nodes.updateNode({
      node: 's2',
      setProperties: {},
      unsetProperties: ['power.driver', 'power.fake.node'],
      setSecrets: {},
      unsetSecrets: ['power.fake.password'],
    });
    assert.deepEqual(cleared.node?.secretKeys, []);
    assert.deepEqual((await controller.store.getNode('s2'))?.secrets, {});
  });

  it('refuses bad secrets and settings with INVALID_ARGUMENT that never quotes a value', async () => {
    const base = { name: 's3', macAddresses: ['52:54:00:5e:00:03'], properties: {} };
    const refused = await assertRejectsWith(
      nodes.createNode({ ...base, secrets: { 'power.fake.password': `${PASSWORD}\u001b[2J` } }),
      Status.INVALID_ARGUMENT,
      /secrets\.power\.fake\.password: control character U\+001B/,
    );
    assert.ok(!refused.details.includes(PASSWORD));
    await assertRejectsWith(nodes.createNode({ ...base, secrets: { 'power.fake.password': '' } }), Status.INVALID_ARGUMENT, /empty/);
    await assertRejectsWith(nodes.createNode({ ...base, secrets: { 'bad key': 'x' } }), Status.INVALID_ARGUMENT, /key 'bad key'/);
    await assertRejectsWith(
      nodes.createNode({ ...base, properties: { 'power.driver': 'no-such' } }),
      Status.INVALID_ARGUMENT,
      /power\.driver=no-such, which is not a power driver; known: qemu, (\w+, )*fake/,
    );
    await assertRejectsWith(
      nodes.createNode({ ...base, properties: { 'power.driver': 'qemu' } }),
      Status.INVALID_ARGUMENT,
      /the qemu power driver needs the property power\.qmp_socket/,
    );
    await nodes.createNode(base);
    await assertRejectsWith(
      nodes.updateNode({ node: 's3', setProperties: {}, unsetProperties: [], setSecrets: { a: 'b' }, unsetSecrets: ['a'] }),
      Status.INVALID_ARGUMENT,
      /unset_secrets: 'a' is also in set_secrets/,
    );
    await assertRejectsWith(
      nodes.updateNode({ node: 'nope', setProperties: {}, unsetProperties: [], setSecrets: {}, unsetSecrets: [] }),
      Status.NOT_FOUND,
    );
  });

  it('writes no password into any log line', () => {
    assert.ok(logLines.length > 10, 'the controller logged');
    const leaks = logLines.filter((line) => line.includes(PASSWORD) || line.includes(NEW_PASSWORD));
    assert.deepEqual(leaks, []);
  });

  it('keeps its key in the data directory, readable by the controller only, and says which key a secret needs', async () => {
    const keyFile = join(dirs.path, 'data', 'secrets.key');
    assert.equal(statSync(keyFile).mode & 0o777, 0o600);
    const keyBefore = readFileSync(keyFile, 'utf8');
    await stop();
    await start();
    assert.equal(readFileSync(keyFile, 'utf8'), keyBefore, 'a restart keeps the key');
    assert.deepEqual((await nodes.getNode({ node: 's1' })).node?.secretKeys, ['power.fake.password']);
    await nodes.setProvisionState({ node: 's1', action: ProvisionAction.PROVISION_ACTION_MANAGE });
    seen.delete('s1');
    await nodes.setProvisionState({ node: 's1', action: ProvisionAction.PROVISION_ACTION_INSPECT });
    assert.deepEqual(seen.get('s1'), { 'power.fake.password': PASSWORD }, 'opened after a restart');
    await nodes.setProvisionState({ node: 's1', action: ProvisionAction.PROVISION_ACTION_ABORT });

    // Another key (a controller whose key file differs): the step fails, naming both keys.
    await stop();
    writeFileSync(keyFile, `${'ab'.repeat(32)}\n`);
    await start();
    await nodes.setProvisionState({ node: 's1', action: ProvisionAction.PROVISION_ACTION_MANAGE });
    const failed = (await nodes.setProvisionState({ node: 's1', action: ProvisionAction.PROVISION_ACTION_INSPECT })).node;
    assert.equal(failed?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_FAILED);
    assert.match(
      failed?.lastError ?? '',
      /secret power\.fake\.password was sealed with key [0-9a-f]{8}, but this controller's key \(.*secrets\.key\) is [0-9a-f]{8}: give every controller the same --secrets-key-file/,
    );
  });
});

describe('SecretBox', () => {
  it('opens what it sealed, binds a value to its name, and refuses a damaged value or another key', () => {
    const box = SecretBox.ephemeral();
    const sealed = box.seal('power.redfish.password', PASSWORD);
    assert.equal(box.open('power.redfish.password', sealed), PASSWORD);
    assert.notEqual(box.seal('power.redfish.password', PASSWORD), sealed, 'a fresh IV each time');
    assert.throws(() => box.open('power.ipmi.password', sealed), SecretError);
    // The second-to-last character changed to another (a fixed 'A' left it as it was whenever it was an 'A': 1 run in 64).
    const tampered = `${sealed.slice(0, -2)}${sealed.at(-2) === 'A' ? 'B' : 'A'}${sealed.slice(-1)}`;
    assert.throws(() => box.open('power.redfish.password', tampered), /damaged/);
    assert.throws(() => SecretBox.ephemeral().open('power.redfish.password', sealed), /sealed with key/);
    assert.throws(() => box.open('x', 'plain-text'), /not a sealed value/);
  });

  it('refuses a key file that is not a key, naming the file', () => {
    const dir = tempDir('metalcast-key-');
    try {
      const path = join(dir.path, 'secrets.key');
      writeFileSync(path, 'not a key\n');
      assert.throws(() => SecretBox.loadOrCreate(path), new RegExp(`${path} is not a secrets key`));
    } finally {
      dir.remove();
    }
  });
});
