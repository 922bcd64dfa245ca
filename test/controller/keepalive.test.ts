import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, afterEach, before, describe, it } from 'node:test';
import { type Channel, createChannel, createClient } from 'nice-grpc';
import { Status } from 'nice-grpc-common';
import { AgentGatewayServiceDefinition } from '../../gen/metalcast/v1/agent_gateway.js';
import { createWaitingNode, type GatewayClient, type HeartbeatStream, lookup, openHeartbeat } from '../helpers/agent-client.js';
import { eventually, FAST_FLAGS, metricValue, scrapeMetrics, startTestController, type TestController } from '../helpers/controller.js';
import { assertClientError } from '../helpers/grpc-assert.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';

const KEEPALIVE_TIME_MS = 500;
const KEEPALIVE_TIMEOUT_MS = 500;
/** Timers on a loaded two-core machine fire late; the scrape takes time too. */
const SLACK_MS = 1500;

describe('Keepalive', () => {
  let t: TestController;
  let proxy: TcpProxy;
  let channel: Channel | undefined;
  let agentGateway: GatewayClient;
  let streams: HeartbeatStream[] = [];
  let macCounter = 0;

  before(async () => {
    // A long heartbeat timeout, so that only keepalive can end a quiet stream here.
    t = await startTestController({ ...FAST_FLAGS, heartbeatTimeout: '60s' });
  });
  after(async () => {
    await t.destroy();
  });

  // Each test gets its own path: after a black hole, the client's connection is dead and it does not know.
  async function agentPath() {
    proxy = await TcpProxy.start(t.controller.grpcAddress);
    // No keepalive on the agent's side: whatever ends the stream, it is the controller's keepalive.
    channel = createChannel(proxy.address);
    agentGateway = createClient(AgentGatewayServiceDefinition, channel);
  }
  afterEach(async () => {
    for (const stream of streams) stream.cancel();
    await Promise.all(streams.map((s) => s.ended));
    streams = [];
    channel?.close();
    channel = undefined;
    await proxy?.close();
  });

  /** A waiting node and a heartbeat stream to it through the proxy, with one heartbeat acknowledged. */
  async function connectedAgent(name: string) {
    await agentPath();
    const mac = `02:00:00:00:41:${(++macCounter).toString(16).padStart(2, '0')}`;
    const node = await createWaitingNode(t.nodes, name, [mac]);
    const { agentToken } = await lookup(agentGateway, [mac]);
    const stream = openHeartbeat(agentGateway, node.uuid, agentToken);
    streams.push(stream);
    await stream.beat();
    assert.equal(await connected(), 1);
    return { node, mac, stream };
  }
  const connected = async () => metricValue(await scrapeMetrics(t.controller), 'metalcast_agents_connected');

  it('keeps a quiet but healthy connection open across several keepalive windows', async () => {
    const { stream } = await connectedAgent('ka-quiet');
    const bytesBefore = proxy.stats.bytesFromTarget;
    // No heartbeat for three keepalive windows: only the controller's pings cross the link, and they are answered.
    await sleep(3 * (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS));
    assert.ok(proxy.stats.bytesFromTarget > bytesBefore, 'the controller pinged the quiet connection');
    assert.equal(stream.isEnded, false);
    assert.equal(await connected(), 1);
    await stream.beat();
    assert.equal(proxy.stats.acceptedConnections, 1, 'the same connection all along');
  });

  it('closes a heartbeat stream whose peer froze (black-holed, no FIN) within its keepalive window', async () => {
    const { mac, stream } = await connectedAgent('ka-frozen');
    proxy.blackhole();
    const frozenAt = Date.now();
    await eventually(async () => (await connected()) === 0, {
      timeoutMs: KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS + SLACK_MS,
      intervalMs: 50,
      what: 'the controller to drop the frozen agent',
    });
    const tookMs = Date.now() - frozenAt;
    assert.ok(tookMs <= KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS + SLACK_MS, `dropped after ${tookMs}ms`);
    // The black hole hid the controller's side of it from the agent.
    assert.equal(stream.isEnded, false);
    // The frozen agent no longer blocks its replacement.
    const replacement = await lookup(t.gateway, [mac]);
    assert.ok(replacement.agentToken);
  });

  it('closes the stream at once when the connection is reset', async () => {
    const { stream } = await connectedAgent('ka-reset');
    proxy.resetAll();
    assertClientError(await stream.ended, Status.UNAVAILABLE);
    await eventually(async () => (await connected()) === 0, { timeoutMs: 2000, what: 'the reset stream to close' });
  });
});
