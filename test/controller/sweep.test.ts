import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, it } from 'node:test';
import { Status } from 'nice-grpc-common';
import { type Node, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { createWaitingNode, type HeartbeatStream, lookup, openHeartbeat } from '../helpers/agent-client.js';
import { FAST_FLAGS, metricValue, scrapeMetrics, startTestController, type TestController } from '../helpers/controller.js';
import { assertClientError } from '../helpers/grpc-assert.js';

const TIMEOUT_MS = 2000;
const SWEEP_INTERVAL_MS = 200;
/** Room for a loaded two-core machine: timers fire late, and the poll itself takes time. */
const SLACK_MS = 800;

describe('Sweep', () => {
  let t: TestController;
  const streams: HeartbeatStream[] = [];

  before(async () => {
    t = await startTestController(FAST_FLAGS);
  });
  after(async () => {
    for (const stream of streams) stream.cancel();
    await Promise.all(streams.map((s) => s.ended));
    await t.destroy();
  });

  /**
   * Polls the node until it leaves inspect wait or `deadline` passes; returns
   * the node and when the answer that showed it failed arrived. A node seen
   * failed at time Y failed no later than Y, which bounds it from both sides.
   */
  async function watchUntilFailed(uuid: string, deadline: number): Promise<{ node: Node; seenAt: number }> {
    while (Date.now() < deadline) {
      const { node } = await t.nodes.getNode({ node: uuid });
      const seenAt = Date.now();
      if (node?.provisionState !== ProvisionState.PROVISION_STATE_INSPECT_WAIT) return { node: node!, seenAt };
      await sleep(25);
    }
    assert.fail(`node ${uuid} was still in inspect wait at the deadline`);
  }

  it('fails a node whose agent went silent within timeout + sweep interval, and not before', async () => {
    const timeoutsBefore =
      metricValue(await scrapeMetrics(t.controller), 'metalcast_heartbeat_timeouts_total{provision_state="inspect_wait"}') ?? 0;
    const node = await createWaitingNode(t.nodes, 'sw-silent', ['02:00:00:00:21:01']);
    const { agentToken } = await lookup(t.gateway, ['02:00:00:00:21:01']);
    const stream = openHeartbeat(t.gateway, node.uuid, agentToken);
    streams.push(stream);
    // The agent's last heartbeat: the controller stamped it between these two instants.
    const sentAt = Date.now();
    await stream.beat();
    const ackedAt = Date.now();
    // The stream stays open and silent, like an agent whose process hung.

    const { node: failed, seenAt } = await watchUntilFailed(node.uuid, ackedAt + TIMEOUT_MS + SWEEP_INTERVAL_MS + SLACK_MS);
    assert.ok(
      seenAt >= sentAt + TIMEOUT_MS,
      `failed only ${seenAt - sentAt}ms after the last heartbeat, before the ${TIMEOUT_MS}ms timeout`,
    );
    assert.equal(failed.provisionState, ProvisionState.PROVISION_STATE_INSPECT_FAILED);
    assert.equal(failed.targetProvisionState, ProvisionState.PROVISION_STATE_UNSPECIFIED);
    assert.match(failed.lastError, /^no heartbeat from the agent for [23]s \(timeout 2s\)$/);

    const { events } = await t.nodes.listNodeEvents({ node: node.uuid, pageSize: 0, pageToken: '' });
    const timeout = events.at(-1);
    assert.equal(timeout?.kind, 'timeout');
    assert.equal(timeout?.actor, 'sweep');
    assert.equal(timeout?.message, failed.lastError);
    assert.equal(timeout?.fromState, ProvisionState.PROVISION_STATE_INSPECT_WAIT);
    assert.equal(timeout?.toState, ProvisionState.PROVISION_STATE_INSPECT_FAILED);

    // The hung agent's stream is ended and its token is no good any more.
    assertClientError(await stream.ended, Status.UNAUTHENTICATED, /the node timed out and is now inspect_failed/);
    const again = openHeartbeat(t.gateway, node.uuid, agentToken);
    streams.push(again);
    again.send();
    assertClientError(await again.ended, Status.UNAUTHENTICATED);

    const metrics = await scrapeMetrics(t.controller);
    assert.equal(metricValue(metrics, 'metalcast_heartbeat_timeouts_total{provision_state="inspect_wait"}'), timeoutsBefore + 1);
    assert.equal(metricValue(metrics, 'metalcast_agents_connected'), 0);
  });

  it('fails a node whose agent never came, counting from when the node started waiting', async () => {
    const before = Date.now();
    const node = await createWaitingNode(t.nodes, 'sw-never', ['02:00:00:00:22:01']);
    const waitingSince = Date.now();
    const { node: failed, seenAt } = await watchUntilFailed(node.uuid, waitingSince + TIMEOUT_MS + SWEEP_INTERVAL_MS + SLACK_MS);
    assert.ok(seenAt >= before + TIMEOUT_MS, `failed ${seenAt - before}ms after entering inspect wait`);
    assert.equal(failed.provisionState, ProvisionState.PROVISION_STATE_INSPECT_FAILED);
    assert.match(failed.lastError, /^no heartbeat from the agent since the node entered inspect wait [23]s ago \(timeout 2s\)$/);
  });

  it('leaves a node alone while its agent heartbeats, and while it is in maintenance', async () => {
    const live = await createWaitingNode(t.nodes, 'sw-live', ['02:00:00:00:23:01']);
    const held = await createWaitingNode(t.nodes, 'sw-held', ['02:00:00:00:23:02']);
    await t.nodes.setMaintenance({ node: held.uuid, enabled: true, reason: 'sweep test' });
    const { agentToken } = await lookup(t.gateway, ['02:00:00:00:23:01']);
    const stream = openHeartbeat(t.gateway, live.uuid, agentToken);
    streams.push(stream);

    // Heartbeat at the pace the controller asks for, for well over one timeout.
    const until = Date.now() + TIMEOUT_MS + 2 * SWEEP_INTERVAL_MS + SLACK_MS;
    let beats = 0;
    while (Date.now() < until) {
      const ack = await stream.beat();
      beats++;
      await sleep(ack.nextIntervalMs);
    }
    assert.ok(beats >= 5);
    for (const uuid of [live.uuid, held.uuid]) {
      const { node } = await t.nodes.getNode({ node: uuid });
      assert.equal(node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_WAIT, `${node?.name} still waits`);
      assert.equal(node?.lastError, '');
    }
    assert.equal(stream.isEnded, false);
    stream.end();
    assert.equal(await stream.ended, undefined);
  });
});
