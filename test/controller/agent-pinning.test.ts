import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { type Channel, ClientError, createChannel, createClient, createServer, type Server, Status } from 'nice-grpc';
import { type KeyAndCertificate, selfSignedCertificate } from '../../common/certificates.js';
import { createLogger } from '../../common/logging.js';
import { tlsClient, tlsServerCredentials } from '../../common/tls.js';
import { loadControllerConfig } from '../../controller/config.js';
import { type RunningController, startController } from '../../controller/controller.js';
import { AgentServiceDefinition, type AgentServiceImplementation } from '../../gen/metalcast/v1/agent.js';
import { AgentGatewayServiceDefinition } from '../../gen/metalcast/v1/agent_gateway.js';
import { Inventory } from '../../gen/metalcast/v1/inventory.js';
import { NodeServiceDefinition, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { NO_AGENT_CERTIFICATE } from '../../controller/services/heartbeat.js';
import { createWaitingNode, lookup, openHeartbeat } from '../helpers/agent-client.js';
import { eventually, tempDir } from '../helpers/controller.js';
import { makeTestPki, type TestPki } from '../helpers/tls.js';

const agentCertificate = (name: string) => selfSignedCertificate({ commonName: name, hosts: ['127.0.0.1'], usage: 'server', validDays: 1 });
const canonical = (pem: string) => new X509Certificate(pem).toString();

/** A stand-in for an agent's API: answers GetInventory with these MACs, over TLS with `identity`, and counts the calls. */
async function fakeAgent(identity: KeyAndCertificate, macs: string[]): Promise<{ server: Server; address: string; calls: () => number }> {
  let calls = 0;
  const implementation: AgentServiceImplementation = {
    async getInventory() {
      calls++;
      return { inventory: Inventory.fromPartial({ interfaces: macs.map((macAddress) => ({ name: 'eth0', macAddress })) }) };
    },
    async runCommand() {
      throw new Error('not in this test');
    },
    async *watchCommand() {},
    async getCommand() {
      throw new Error('not in this test');
    },
    async listCommands() {
      return { commands: [] };
    },
  };
  const server = createServer();
  server.add(AgentServiceDefinition, implementation);
  const port = await server.listen('127.0.0.1:0', tlsServerCredentials(identity));
  return { server, address: `127.0.0.1:${port}`, calls: () => calls };
}

describe('agent certificate pinning', () => {
  const dir = tempDir('metalcast-pinning-');
  const logs: Record<string, unknown>[] = [];
  const servers: Server[] = [];
  let pki: TestPki;
  let controller: RunningController;
  let channel: Channel;
  let nodes: ReturnType<typeof createClient<typeof NodeServiceDefinition>>;
  let gateway: ReturnType<typeof createClient<typeof AgentGatewayServiceDefinition>>;
  let first: KeyAndCertificate;
  let second: KeyAndCertificate;
  const logged = (text: string) => logs.filter((l) => typeof l.msg === 'string' && l.msg.includes(text));

  before(async () => {
    pki = await makeTestPki(dir.path);
    [first, second] = await Promise.all([agentCertificate('agent one'), agentCertificate('agent two')]);
    const config = loadControllerConfig(
      {
        listen: '127.0.0.1:0',
        metricsListen: '127.0.0.1:0',
        dataDir: join(dir.path, 'data'),
        controllerId: 'pinning-test',
        operatorAuth: 'none',
        ...pki.controllerFlags,
        heartbeatTimeout: '20s',
        heartbeatIntervalMin: '300ms',
        heartbeatIntervalMax: '600ms',
        heartbeatFlushInterval: '50ms',
        sweepInterval: '500ms',
        startupGrace: '0s',
        agentCallTimeout: '2s',
      },
      {},
    );
    const destination = { write: (line: string) => void logs.push(JSON.parse(line) as Record<string, unknown>) };
    controller = await startController(config, createLogger({ name: 'pinning-test', level: 'debug', destination }));
    const secure = tlsClient(controller.grpcAddress, { caPem: pki.ca.certPem });
    channel = createChannel(controller.grpcAddress, secure.credentials, secure.channelOptions);
    nodes = createClient(NodeServiceDefinition, channel);
    gateway = createClient(AgentGatewayServiceDefinition, channel);
  });
  after(async () => {
    for (const server of servers) server.forceShutdown();
    channel.close();
    await controller.stop();
    dir.remove();
  });

  /** A node in inspect wait, held there by maintenance (the conductor leaves it alone), and its agent token. */
  async function heldNode(name: string, mac: string): Promise<{ uuid: string; token: string }> {
    const node = await createWaitingNode(nodes, name, [mac]);
    await nodes.setMaintenance({ node: node.uuid, enabled: true, reason: 'hold in inspect wait' });
    return { uuid: node.uuid, token: (await lookup(gateway, [mac])).agentToken };
  }
  const endedWith = async (ended: Promise<unknown>, code: Status, details: RegExp) => {
    const error = await ended;
    assert.ok(error instanceof ClientError, `expected the stream to end with ${Status[code]}, got ${String(error)}`);
    assert.equal(Status[error.code], Status[code]);
    assert.match(error.details, details);
  };

  it('pins the certificate of the first heartbeat, and ends a stream that later presents another', async () => {
    const { uuid, token } = await heldNode('pin-1', '52:54:00:bb:00:01');
    const stream = openHeartbeat(gateway, uuid, token);
    await stream.beat({ agentCertificatePem: first.certPem });
    assert.equal((await controller.store.getNode(uuid))?.agentCertificatePem, canonical(first.certPem));
    const pinnedLine = logged('agent certificate pinned for this node').find((l) => l.node === uuid);
    assert.equal(pinnedLine?.fingerprint, new X509Certificate(first.certPem).fingerprint256);
    await stream.beat({}, 5000); // later heartbeats carry none, which is fine
    await stream.beat({ agentCertificatePem: first.certPem }); // the same one again is fine too

    stream.send({ agentCertificatePem: second.certPem });
    await endedWith(stream.ended, Status.UNAUTHENTICATED, /differs from the one pinned/);
    const refused = logged('agent certificate differs from the one pinned for this node').find((l) => l.node === uuid);
    assert.equal(refused?.level, 40);
    assert.equal(refused?.presented, new X509Certificate(second.certPem).fingerprint256);
    assert.equal(refused?.pinned, new X509Certificate(first.certPem).fingerprint256);
    assert.equal((await controller.store.getNode(uuid))?.agentCertificatePem, canonical(first.certPem), 'the pin stays');
  });

  it('holds the pin across streams with the same token; a new lookup lets a restarted agent pin its new certificate', async () => {
    const { uuid, token } = await heldNode('pin-2', '52:54:00:bb:00:02');
    const one = openHeartbeat(gateway, uuid, token);
    await one.beat({ agentCertificatePem: first.certPem });
    one.end();
    assert.equal(await one.ended, undefined);

    const reconnected = openHeartbeat(gateway, uuid, token);
    await reconnected.beat({ agentCertificatePem: first.certPem });
    reconnected.end();
    await reconnected.ended;

    const impostor = openHeartbeat(gateway, uuid, token);
    impostor.send({ agentCertificatePem: second.certPem });
    await endedWith(impostor.ended, Status.UNAUTHENTICATED, /differs from the one pinned/);

    const fresh = (await lookup(gateway, ['52:54:00:bb:00:02'])).agentToken;
    assert.equal((await controller.store.getNode(uuid))?.agentCertificatePem, null, 'a lookup forgets the pin');
    const restarted = openHeartbeat(gateway, uuid, fresh);
    await restarted.beat({ agentCertificatePem: second.certPem });
    assert.equal((await controller.store.getNode(uuid))?.agentCertificatePem, canonical(second.certPem));
    restarted.end();
    await restarted.ended;
  });

  it('refuses what is not one certificate: a key, garbage, a bundle, too much', async () => {
    const { uuid, token } = await heldNode('pin-3', '52:54:00:bb:00:03');
    const cases: [string, RegExp][] = [
      [`${first.certPem}${first.keyPem}`, /holds a private key; send the certificate only/],
      ['-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n', /not a valid X\.509 certificate/],
      ['hello', /holds no PEM certificate/],
      [`${first.certPem}${second.certPem}`, /one certificate expected, got 2/],
      [`${first.certPem}${' '.repeat(9000)}`, /at most 8192 bytes/],
    ];
    for (const [pem, message] of cases) {
      const stream = openHeartbeat(gateway, uuid, token);
      stream.send({ agentCertificatePem: pem });
      await endedWith(stream.ended, Status.INVALID_ARGUMENT, message);
    }
    assert.equal((await controller.store.getNode(uuid))?.agentCertificatePem, null);
  });

  it('refuses a heartbeat stream without a certificate at once, with FAILED_PRECONDITION saying what to do, and never calls that agent', async () => {
    // It used to be accepted: the node then waited for its heartbeat timeout, explained only in the controller's log.
    const node = await createWaitingNode(nodes, 'pin-4', ['52:54:00:bb:00:04']);
    const { agentToken } = await lookup(gateway, ['52:54:00:bb:00:04']);
    const stream = openHeartbeat(gateway, node.uuid, agentToken);
    stream.send({ agentAddress: '127.0.0.1:9' });
    const endedOrOpen = Promise.race([stream.ended, new Promise((resolve) => setTimeout(resolve, 10_000, 'still open after 10 s'))]);
    await endedWith(endedOrOpen, Status.FAILED_PRECONDITION, /^heartbeat without agent_certificate_pem: /);
    const error = (await stream.ended) as ClientError;
    assert.equal(error.details, NO_AGENT_CERTIFICATE);
    assert.equal(logged('refused a heartbeat stream without an agent certificate').filter((l) => l.node === node.uuid).length, 1);
    assert.equal((await nodes.getNode({ node: 'pin-4' })).node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_WAIT);
    assert.deepEqual(
      logged('agent not called yet').filter((l) => l.node === node.uuid),
      [],
      'the agent was never considered',
    );
    // With its certificate, the same agent is accepted.
    const again = openHeartbeat(gateway, node.uuid, agentToken);
    await again.beat({ agentCertificatePem: first.certPem });
    again.end();
    await again.ended;
  });

  it('calls the agent over TLS trusting only the pinned certificate: another certificate at its address is refused', async () => {
    // Something at the agent's address with a certificate other than the pinned one: never called.
    const impostor = await fakeAgent(first, ['52:54:00:bb:00:05']);
    servers.push(impostor.server);
    const node = await createWaitingNode(nodes, 'pin-5', ['52:54:00:bb:00:05']);
    const stream = openHeartbeat(gateway, node.uuid, (await lookup(gateway, ['52:54:00:bb:00:05'])).agentToken);
    await stream.beat({ agentAddress: impostor.address, agentCertificatePem: second.certPem });
    const failed = await eventually(
      async () => {
        const { node: current } = await nodes.getNode({ node: 'pin-5' });
        return current?.provisionState === ProvisionState.PROVISION_STATE_INSPECT_FAILED ? current : undefined;
      },
      { timeoutMs: 40_000, what: 'inspection to fail' },
    );
    assert.match(failed.lastError, /could not get the inventory from the agent at 127\.0\.0\.1:\d+: UNAVAILABLE: .*certificate/);
    assert.equal(impostor.calls(), 0, 'the impostor was never called');
    const warned = logged('refusing to call the agent: it did not present the certificate pinned for its node').find(
      (l) => l.node === node.uuid,
    );
    assert.equal(warned?.pinned, new X509Certificate(second.certPem).fingerprint256);
    stream.end();
    await stream.ended;

    // The agent with the pinned certificate is called, over TLS.
    const genuine = await fakeAgent(second, ['52:54:00:bb:00:06']);
    servers.push(genuine.server);
    const good = await createWaitingNode(nodes, 'pin-6', ['52:54:00:bb:00:06']);
    const goodStream = openHeartbeat(gateway, good.uuid, (await lookup(gateway, ['52:54:00:bb:00:06'])).agentToken);
    await goodStream.beat({ agentAddress: genuine.address, agentCertificatePem: second.certPem });
    await eventually(
      async () => (await nodes.getNode({ node: 'pin-6' })).node?.provisionState === ProvisionState.PROVISION_STATE_MANAGEABLE,
      { timeoutMs: 20_000, what: 'inspection through the pinned certificate' },
    );
    assert.ok(genuine.calls() >= 1);
    goodStream.end();
    await goodStream.ended;
  });
});
