import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Status } from 'nice-grpc-common';
import { ProvisionAction } from '../../gen/metalcast/v1/node.js';
import { createWaitingNode, type HeartbeatStream, lookup, openHeartbeat } from '../helpers/agent-client.js';
import { eventually, FAST_FLAGS, metricValue, scrapeMetrics, startTestController, type TestController } from '../helpers/controller.js';
import { assertClientError, assertRejectsWith } from '../helpers/grpc-assert.js';

describe('Lookup', () => {
  let t: TestController;
  const streams: HeartbeatStream[] = [];
  /** Opens a heartbeat stream that the suite cancels at the end if the test did not finish it. */
  const heartbeat = (uuid: string, token: string) => {
    const stream = openHeartbeat(t.gateway, uuid, token);
    streams.push(stream);
    return stream;
  };

  before(async () => {
    t = await startTestController(FAST_FLAGS);
  });
  after(async () => {
    for (const stream of streams) stream.cancel();
    await Promise.all(streams.map((s) => s.ended));
    await t.destroy();
  });

  const lookups = async (result: string) =>
    metricValue(await scrapeMetrics(t.controller), `metalcast_lookups_total{result="${result}"}`) ?? 0;

  it('finds a waiting node by each of its MACs, in any case and separator, and hands out a fresh token each time', async () => {
    const node = await createWaitingNode(t.nodes, 'lk-each', ['02:00:00:00:01:0a', '02:00:00:00:01:0b', '02:00:00:00:01:0c']);
    const found = await lookups('found');
    const tokens = new Set<string>();
    for (const mac of ['02:00:00:00:01:0a', '02:00:00:00:01:0B', '02-00-00-00-01-0c', '02-00-00-00-01-0A']) {
      const response = await lookup(t.gateway, [mac]);
      assert.equal(response.nodeUuid, node.uuid, `lookup by ${mac}`);
      assert.match(response.agentToken, /^[A-Za-z0-9_-]{43}$/, '256-bit base64url token');
      assert.equal(response.heartbeatIntervalMinMs, 200);
      assert.equal(response.heartbeatIntervalMaxMs, 400);
      assert.equal(response.heartbeatTimeoutMs, 2000);
      tokens.add(response.agentToken);
    }
    assert.equal(tokens.size, 4, 'every lookup hands out a new token');
    assert.equal(await lookups('found'), found + 4);
  });

  it('finds the node when the agent also reports MACs the controller does not know', async () => {
    const node = await createWaitingNode(t.nodes, 'lk-extra', ['02:00:00:00:02:01']);
    const response = await lookup(t.gateway, ['02:00:00:00:02:99', '02:00:00:00:02:01', '02:00:00:00:02:98']);
    assert.equal(response.nodeUuid, node.uuid);
  });

  it('answers NOT_FOUND for unknown MACs, and the same for a node in a state that expects no agent', async () => {
    const notFoundBefore = await lookups('not_found');
    const unknown = await assertRejectsWith(lookup(t.gateway, ['02:00:00:00:03:99']), Status.NOT_FOUND, /02:00:00:00:03:99/);

    const { node } = await t.nodes.createNode({ name: 'lk-enroll', macAddresses: ['02:00:00:00:03:01'] });
    const enrolled = await assertRejectsWith(lookup(t.gateway, ['02:00:00:00:03:01']), Status.NOT_FOUND, /02:00:00:00:03:01/);
    await t.nodes.setProvisionState({ node: node!.uuid, action: ProvisionAction.PROVISION_ACTION_MANAGE });
    await assertRejectsWith(lookup(t.gateway, ['02:00:00:00:03:01']), Status.NOT_FOUND);

    // A stranger must not learn that the MAC is enrolled: the answers differ only in the MAC quoted.
    assert.equal(unknown.details.replace('02:00:00:00:03:99', 'MAC'), enrolled.details.replace('02:00:00:00:03:01', 'MAC'));
    assert.equal(await lookups('not_found'), notFoundBefore + 3);
  });

  it('answers NOT_FOUND when the MACs match two different nodes', async () => {
    await createWaitingNode(t.nodes, 'lk-two-a', ['02:00:00:00:04:01']);
    await createWaitingNode(t.nodes, 'lk-two-b', ['02:00:00:00:04:02']);
    await assertRejectsWith(lookup(t.gateway, ['02:00:00:00:04:01', '02:00:00:00:04:02']), Status.NOT_FOUND);
  });

  it('answers INVALID_ARGUMENT naming a malformed MAC, for no MAC at all and for an oversized agent version', async () => {
    const invalidBefore = await lookups('invalid');
    await assertRejectsWith(
      lookup(t.gateway, ['02:00:00:00:05:01', 'zz:11']),
      Status.INVALID_ARGUMENT,
      /MAC address 'zz:11' is not of the form aa:bb:cc:dd:ee:ff/,
    );
    await assertRejectsWith(lookup(t.gateway, ['02:00:00:00:05:0']), Status.INVALID_ARGUMENT, /'02:00:00:00:05:0'/);
    await assertRejectsWith(lookup(t.gateway, []), Status.INVALID_ARGUMENT, /at least one MAC address/);
    await assertRejectsWith(
      lookup(t.gateway, ['02:00:00:00:05:01', '02-00-00-00-05-01']),
      Status.INVALID_ARGUMENT,
      /02:00:00:00:05:01 is listed twice/,
    );
    await assertRejectsWith(
      t.gateway.lookup({ macAddresses: ['02:00:00:00:05:01'], systemSerial: '', systemUuid: '', agentVersion: 'v'.repeat(129) }),
      Status.INVALID_ARGUMENT,
      /agent_version: at most 128 characters/,
    );
    assert.equal(await lookups('invalid'), invalidBefore + 5, 'every refused lookup is counted as invalid');
  });

  it('refuses a second token while the agent has a heartbeat stream open, with the NOT_FOUND of an unknown MAC (no name, no address)', async () => {
    const node = await createWaitingNode(t.nodes, 'lk-alive', ['02:00:00:00:06:01']);
    const first = await lookup(t.gateway, ['02:00:00:00:06:01']);
    const stream = heartbeat(node.uuid, first.agentToken);
    await stream.beat();
    const aliveBefore = await lookups('agent_alive');

    const alive = await assertRejectsWith(lookup(t.gateway, ['02:00:00:00:06:01']), Status.NOT_FOUND);
    const unknown = await assertRejectsWith(lookup(t.gateway, ['02:00:00:00:06:99']), Status.NOT_FOUND);
    // Issue 18 item 5: a stranger asking with a neighbour's MACs learns nothing about the fleet.
    assert.equal(alive.details.replace('02:00:00:00:06:01', 'MAC'), unknown.details.replace('02:00:00:00:06:99', 'MAC'));
    assert.doesNotMatch(alive.details, /lk-alive|127\.0\.0\.1|live agent|stream/);
    assert.equal(await lookups('agent_alive'), aliveBefore + 1, 'the metric still tells the operator why');
    // The refused lookup changed nothing: the stream and its token still work.
    await stream.beat();
    assert.equal(stream.isEnded, false);
    stream.end();
    assert.equal(await stream.ended, undefined);
  });

  it('after the stream closes, hands out a fresh token, and the old one no longer opens a stream', async () => {
    const node = await createWaitingNode(t.nodes, 'lk-rotate', ['02:00:00:00:07:01']);
    const first = await lookup(t.gateway, ['02:00:00:00:07:01']);
    const stream = heartbeat(node.uuid, first.agentToken);
    await stream.beat();
    await stream.beat();
    // The heartbeat is on disk, so that lookup sees a recently heard agent and must rely on the stream's closing.
    await eventually(async () => (await t.nodes.getNode({ node: node.uuid })).node?.lastHeartbeatAt, { what: 'heartbeat flushed' });
    stream.end();
    assert.equal(await stream.ended, undefined, 'the agent closed its stream cleanly');

    const second = await lookup(t.gateway, ['02:00:00:00:07:01']);
    assert.equal(second.nodeUuid, node.uuid);
    assert.notEqual(second.agentToken, first.agentToken);

    const stale = heartbeat(node.uuid, first.agentToken);
    stale.send();
    assertClientError(await stale.ended, Status.UNAUTHENTICATED, /agent token is not valid.*look up again/);

    const fresh = heartbeat(node.uuid, second.agentToken);
    const ack = await fresh.beat();
    assert.equal(ack.sequence, 1);
    fresh.end();
    assert.equal(await fresh.ended, undefined);
  });

  it('hands out a fresh token once the controller notices a killed agent’s stream is gone', async () => {
    const node = await createWaitingNode(t.nodes, 'lk-killed', ['02:00:00:00:08:01']);
    const first = await lookup(t.gateway, ['02:00:00:00:08:01']);
    const stream = heartbeat(node.uuid, first.agentToken);
    await stream.beat();
    stream.cancel();
    await stream.ended;
    const second = await eventually(() => lookup(t.gateway, ['02:00:00:00:08:01']), { timeoutMs: 5000, what: 'lookup after cancel' });
    assert.notEqual(second.agentToken, first.agentToken);
  });

  it('ends a stream still bound to the old token with UNAUTHENTICATED when a lookup replaces the token', async () => {
    const node = await createWaitingNode(t.nodes, 'lk-revoke', ['02:00:00:00:09:01']);
    const first = await lookup(t.gateway, ['02:00:00:00:09:01']);
    const stream = heartbeat(node.uuid, first.agentToken);
    await stream.beat();
    // An open stream normally blocks lookup (see above). It cannot once the stored token is gone, as when
    // another controller on the same database wiped it; then the new token must end the old stream here too.
    await t.controller.store.setAgentToken(node.uuid, null, null);

    const second = await lookup(t.gateway, ['02:00:00:00:09:01']);
    assertClientError(await stream.ended, Status.UNAUTHENTICATED, /agent token was replaced by a newer lookup/);
    assert.notEqual(second.agentToken, first.agentToken);
    const fresh = heartbeat(node.uuid, second.agentToken);
    await fresh.beat();
    fresh.end();
    assert.equal(await fresh.ended, undefined);
  });
});

describe('A token replaced on another controller', () => {
  // A lookup on another controller of the same database leaves a token this one never handed out: the
  // conductor sees it when it reads the node for the stream's next heartbeat (batched, or one read each).
  for (const window of ['100ms', '0']) {
    it(`ends the stream at its next heartbeat with UNAUTHENTICATED (--heartbeat-check-window ${window})`, async () => {
      const t = await startTestController({ ...FAST_FLAGS, heartbeatCheckWindow: window });
      try {
        const node = await createWaitingNode(t.nodes, 'lk-elsewhere', ['02:00:00:00:09:11']);
        const { agentToken } = await lookup(t.gateway, ['02:00:00:00:09:11']);
        const live = openHeartbeat(t.gateway, node.uuid, agentToken);
        await live.beat();
        await t.controller.store.setAgentToken(node.uuid, 'f'.repeat(64), 'api-token-from-elsewhere');
        live.send();
        const outcome = await Promise.race([live.ended, sleep(5000).then(() => 'still open after 5 s')]);
        live.cancel();
        assertClientError(outcome, Status.UNAUTHENTICATED, /agent token was replaced by a newer lookup/);
      } finally {
        await t.destroy();
      }
    });
  }
});
