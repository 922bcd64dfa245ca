import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Status } from 'nice-grpc-common';
import { PROVISION_STATES } from '../../controller/provisioning/states.js';
import { ProvisionState } from '../../gen/metalcast/v1/node.js';
import { createWaitingNode, type HeartbeatStream, lookup, openHeartbeat } from '../helpers/agent-client.js';
import { FAST_FLAGS, startTestController, type TestController } from '../helpers/controller.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';
import { type MetricFamily, parsePrometheusText, samplesOf, sampleValue } from '../helpers/prometheus-text.js';

const GATEWAY = 'metalcast.v1.AgentGatewayService';

describe('/metrics and /healthz', () => {
  let t: TestController;
  let stream: HeartbeatStream | undefined;

  async function scrape(): Promise<{ families: Map<string, MetricFamily>; contentType: string | null }> {
    const response = await fetch(`http://${t.controller.httpAddress}/metrics`);
    assert.equal(response.status, 200);
    return { families: parsePrometheusText(await response.text()), contentType: response.headers.get('content-type') };
  }

  before(async () => {
    t = await startTestController(FAST_FLAGS);
    // A node whose agent never comes, failed by one sweep run with a clock 10 s ahead (the timeout is 2 s).
    const silent = await createWaitingNode(t.nodes, 'mt-silent', ['02:00:00:00:61:01']);
    const timedOut = await t.controller.sweep.runOnce(Date.now() + 10_000);
    assert.deepEqual(
      timedOut.map((n) => n.uuid),
      [silent.uuid],
    );
    // A node whose agent is connected: one lookup found, two heartbeats.
    const live = await createWaitingNode(t.nodes, 'mt-live', ['02:00:00:00:61:02']);
    const { agentToken } = await lookup(t.gateway, ['02:00:00:00:61:02']);
    stream = openHeartbeat(t.gateway, live.uuid, agentToken);
    await stream.beat();
    await stream.beat();
    // And one lookup of each failure.
    await assertRejectsWith(lookup(t.gateway, ['02:00:00:00:61:99']), Status.NOT_FOUND);
    await assertRejectsWith(lookup(t.gateway, ['zz:11']), Status.INVALID_ARGUMENT);
  });
  after(async () => {
    stream?.cancel();
    await stream?.ended;
    await t.destroy();
  });

  it('serves valid Prometheus text with the content type Prometheus expects', async () => {
    const { families, contentType } = await scrape();
    assert.match(contentType ?? '', /^text\/plain; version=0\.0\.4/);
    for (const family of families.values()) {
      assert.notEqual(family.help, '', `${family.name} has help text`);
      assert.notEqual(family.type, 'untyped', `${family.name} has a type`);
    }
  });

  it('counts heartbeats, lookups by result and connected agents', async () => {
    const { families } = await scrape();
    assert.equal(families.get('metalcast_heartbeats_total')?.type, 'counter');
    assert.equal(sampleValue(families, 'metalcast_heartbeats_total'), 2);
    assert.equal(families.get('metalcast_lookups_total')?.type, 'counter');
    assert.equal(sampleValue(families, 'metalcast_lookups_total', { result: 'found' }), 1);
    assert.equal(sampleValue(families, 'metalcast_lookups_total', { result: 'not_found' }), 1);
    assert.equal(sampleValue(families, 'metalcast_lookups_total', { result: 'invalid' }), 1);
    assert.equal(families.get('metalcast_agents_connected')?.type, 'gauge');
    assert.equal(sampleValue(families, 'metalcast_agents_connected'), 1);
  });

  it('counts nodes by provision state at scrape time, with every state present', async () => {
    const { families } = await scrape();
    assert.equal(families.get('metalcast_nodes')?.type, 'gauge');
    const samples = samplesOf(families, 'metalcast_nodes');
    assert.deepEqual(samples.map((s) => s.labels.provision_state).sort(), [...PROVISION_STATES].sort());
    assert.equal(sampleValue(families, 'metalcast_nodes', { provision_state: 'inspect_wait' }), 1);
    assert.equal(sampleValue(families, 'metalcast_nodes', { provision_state: 'inspect_failed' }), 1);
    assert.equal(
      samples.reduce((sum, s) => sum + s.value, 0),
      2,
    );
    // Computed at scrape time: a new node shows in the next scrape.
    await t.nodes.createNode({ name: 'mt-new', macAddresses: ['02:00:00:00:61:03'] });
    assert.equal(sampleValue((await scrape()).families, 'metalcast_nodes', { provision_state: 'enroll' }), 1);
  });

  it('reports the sweep: its duration and the nodes it failed', async () => {
    const { families } = await scrape();
    assert.equal(families.get('metalcast_sweep_duration_seconds')?.type, 'histogram');
    assert.ok(sampleValue(families, 'metalcast_sweep_duration_seconds_count') >= 1);
    assert.ok(samplesOf(families, 'metalcast_sweep_duration_seconds_bucket', { le: '+Inf' }).length === 1);
    assert.equal(families.get('metalcast_heartbeat_timeouts_total')?.type, 'counter');
    assert.equal(sampleValue(families, 'metalcast_heartbeat_timeouts_total', { provision_state: 'inspect_wait' }), 1);
  });

  it('carries the process and Node.js runtime metrics', async () => {
    const { families } = await scrape();
    for (const name of [
      'process_cpu_user_seconds_total',
      'process_cpu_system_seconds_total',
      'process_start_time_seconds',
      'process_resident_memory_bytes',
      'nodejs_eventloop_lag_seconds',
      'nodejs_heap_size_used_bytes',
    ]) {
      const family = families.get(name);
      assert.ok(family && family.samples.length > 0, `${name} is exported`);
    }
    assert.ok(sampleValue(families, 'process_resident_memory_bytes') > 0);
  });

  it('counts handled gRPC calls by service, method and code', async () => {
    stream?.end();
    assert.equal(await stream?.ended, undefined);
    const { families } = await scrape();
    assert.equal(families.get('grpc_server_handled_total')?.type, 'counter');
    const handled = (method: string, code: string, extra: Record<string, string> = {}) =>
      sampleValue(families, 'grpc_server_handled_total', { grpc_service: GATEWAY, grpc_method: method, grpc_code: code, ...extra });
    assert.equal(handled('Lookup', 'OK', { grpc_type: 'unary' }), 1);
    assert.equal(handled('Lookup', 'NOT_FOUND'), 1);
    assert.equal(handled('Lookup', 'INVALID_ARGUMENT'), 1);
    assert.equal(handled('Heartbeat', 'OK', { grpc_type: 'bidi_stream' }), 1);
    // Every node was created by one successful CreateNode.
    assert.equal(
      sampleValue(families, 'grpc_server_handled_total', {
        grpc_service: 'metalcast.v1.NodeService',
        grpc_method: 'CreateNode',
        grpc_code: 'OK',
      }),
      samplesOf(families, 'metalcast_nodes').reduce((sum, s) => sum + s.value, 0),
    );
    assert.equal(families.get('grpc_server_handling_seconds')?.type, 'histogram');
    assert.equal(sampleValue(families, 'metalcast_agents_connected'), 0, 'the closed stream is no longer counted');
  });

  it('answers /healthz, and refuses other paths and methods', async () => {
    const health = await fetch(`http://${t.controller.httpAddress}/healthz`);
    assert.equal(health.status, 200);
    assert.equal(await health.text(), 'ok\n');
    assert.equal((await fetch(`http://${t.controller.httpAddress}/nope`)).status, 404);
    const post = await fetch(`http://${t.controller.httpAddress}/metrics`, { method: 'POST' });
    assert.equal(post.status, 405);
    assert.equal(post.headers.get('allow'), 'GET, HEAD');
  });

  it('still knows the node states the gauge reports', async () => {
    // Guards the gauge against a state added to the proto but not to the table (or the other way round).
    const protoStates = Object.keys(ProvisionState)
      .filter((k) => k.startsWith('PROVISION_STATE_') && k !== 'PROVISION_STATE_UNSPECIFIED')
      .map((k) => k.slice('PROVISION_STATE_'.length).toLowerCase());
    assert.deepEqual([...protoStates].sort(), [...PROVISION_STATES].sort());
  });
});
