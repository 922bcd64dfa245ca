import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { type AddressInfo, createServer, type Socket } from 'node:net';
import { DatabaseSync } from 'node:sqlite';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, it } from 'node:test';
import { Status } from 'nice-grpc-common';
import { ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { createWaitingNode, type HeartbeatStream, lookup, openHeartbeat } from '../helpers/agent-client.js';
import { FAST_FLAGS, metricValue, scrapeMetrics, startTestController, type TestController } from '../helpers/controller.js';
import { deferred } from '../helpers/deferred.js';
import { assertClientError, assertRejectsWith } from '../helpers/grpc-assert.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';

describe('Controller restart', () => {
  /** Everything a test started, stopped afterwards whatever happened. */
  let streams: HeartbeatStream[] = [];
  let controllers: TestController[] = [];
  let cleanups: (() => Promise<void> | void)[] = [];

  async function start(flags: Record<string, string>, dataDir?: string): Promise<TestController> {
    const controller = await startTestController(flags, dataDir);
    controllers.push(controller);
    return controller;
  }
  function heartbeat(t: TestController, uuid: string, token: string): HeartbeatStream {
    const stream = openHeartbeat(t.gateway, uuid, token);
    streams.push(stream);
    return stream;
  }

  afterEach(async () => {
    for (const stream of streams) stream.cancel();
    await Promise.all(streams.map((s) => s.ended));
    for (const t of controllers) await t.stop();
    for (const cleanup of cleanups.reverse()) await cleanup();
    for (const dir of new Set(controllers.map((t) => t.dataDir))) rmSync(dir, { recursive: true, force: true });
    streams = [];
    controllers = [];
    cleanups = [];
  });

  it('keeps nodes, their ports, properties, states, maintenance and events', async () => {
    const first = await start({});
    const { node: plain } = await first.nodes.createNode({
      name: 'rs-plain',
      macAddresses: ['02:00:00:00:31:01', '02:00:00:00:31:02'],
      properties: { rack: 'r7', owner: 'team-a' },
    });
    const held = await createWaitingNode(first.nodes, 'rs-held', ['02:00:00:00:31:03']);
    await first.nodes.setMaintenance({ node: held.uuid, enabled: true, reason: 'firmware update' });
    const waiting = await createWaitingNode(first.nodes, 'rs-waiting', ['02:00:00:00:31:04']);
    await first.nodes.addNodePort({ node: waiting.uuid, macAddress: '02:00:00:00:31:05' });
    const failed = await createWaitingNode(first.nodes, 'rs-failed', ['02:00:00:00:31:06']);
    await first.nodes.setProvisionState({ node: failed.uuid, action: ProvisionAction.PROVISION_ACTION_ABORT });

    const uuids = [plain!.uuid, held.uuid, waiting.uuid, failed.uuid];
    const snapshot = async (t: TestController) => ({
      nodes: await Promise.all(uuids.map(async (uuid) => (await t.nodes.getNode({ node: uuid })).node)),
      list: (await t.nodes.listNodes({ provisionState: 0, pageSize: 0, pageToken: '' })).nodes,
      events: await Promise.all(
        uuids.map(async (uuid) => (await t.nodes.listNodeEvents({ node: uuid, pageSize: 0, pageToken: '' })).events),
      ),
    });
    const before = await snapshot(first);
    assert.equal(before.list.length, 4);

    const second = await first.restart();
    controllers.push(second);
    const after = await snapshot(second);
    assert.deepEqual(after, before);
    assert.deepEqual(after.nodes[0]?.properties, { rack: 'r7', owner: 'team-a' });
    assert.equal(after.nodes[1]?.maintenanceReason, 'firmware update');
    assert.deepEqual(after.nodes[2]?.macAddresses, ['02:00:00:00:31:04', '02:00:00:00:31:05']);
    assert.equal(after.nodes[3]?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_FAILED);
    // And the restarted controller works on them: the waiting node's agent can look up.
    assert.equal((await lookup(second.gateway, ['02:00:00:00:31:05'])).nodeUuid, waiting.uuid);
  });

  it('keeps agent tokens: an agent heard just before the restart reconnects with its token and gets no second one', async () => {
    const flags = { ...FAST_FLAGS, heartbeatTimeout: '20s', heartbeatIntervalMin: '1s', heartbeatIntervalMax: '10s' };
    const first = await start(flags);
    const node = await createWaitingNode(first.nodes, 'rs-token', ['02:00:00:00:32:01']);
    const { agentToken } = await lookup(first.gateway, ['02:00:00:00:32:01']);
    const stream = heartbeat(first, node.uuid, agentToken);
    await stream.beat();

    const second = await first.restart();
    controllers.push(second);
    assertClientError(await stream.ended, Status.UNAVAILABLE, /shutting down/);
    // Within its heartbeat interval the agent may still be alive and about to reconnect: no second token.
    await assertRejectsWith(lookup(second.gateway, ['02:00:00:00:32:01']), Status.NOT_FOUND, /no node waiting for an agent/);
    const reconnected = heartbeat(second, node.uuid, agentToken);
    await reconnected.beat();
    await reconnected.beat();
    reconnected.end();
    assert.equal(await reconnected.ended, undefined);
  });

  it('clears the node locks this controller left behind, and only those', async () => {
    const first = await start({});
    const { node: mine } = await first.nodes.createNode({ name: 'rs-lock-mine', macAddresses: ['02:00:00:00:33:01'] });
    const { node: theirs } = await first.nodes.createNode({ name: 'rs-lock-theirs', macAddresses: ['02:00:00:00:33:02'] });
    assert.ok(await first.controller.store.tryLock(mine!.uuid, first.config.controllerId, 'inspect'));
    assert.ok(await first.controller.store.tryLock(theirs!.uuid, 'another-controller', 'deploy'));

    const second = await first.restart();
    controllers.push(second);
    assert.equal((await second.nodes.getNode({ node: mine!.uuid })).node?.reservation, '');
    const other = (await second.nodes.getNode({ node: theirs!.uuid })).node;
    assert.equal(other?.reservation, 'another-controller');
    assert.equal(other?.reservationOperation, 'deploy');
  });

  describe('start-up grace', () => {
    it('fails no node during the grace period after start, then fails the silent ones; an agent that reconnects is spared', async () => {
      const first = await start(FAST_FLAGS);
      const silent = await createWaitingNode(first.nodes, 'gr-silent', ['02:00:00:00:34:01']);
      const back = await createWaitingNode(first.nodes, 'gr-back', ['02:00:00:00:34:02']);
      const { agentToken } = await lookup(first.gateway, ['02:00:00:00:34:02']);
      await first.stop();
      // The controller was down for a minute: both nodes are long past the heartbeat timeout.
      const db = new DatabaseSync(first.config.database.slice('sqlite:'.length));
      db.prepare('UPDATE nodes SET liveness_at = liveness_at - 60000 WHERE uuid IN (?, ?)').run(silent.uuid, back.uuid);
      db.close();

      const startingAt = Date.now();
      const second = await start({ ...FAST_FLAGS, startupGrace: '1500ms' }, first.dataDir);
      const startedAt = Date.now();
      // The reconnecting agent heartbeats during the grace, at the pace it is asked to.
      const stream = heartbeat(second, back.uuid, agentToken);
      let beating = true;
      const beats = (async () => {
        while (beating && !stream.isEnded) {
          const ack = await stream.beat();
          await sleep(ack.nextIntervalMs);
        }
      })();

      let seenFailedAt: number | undefined;
      while (Date.now() < startedAt + 1500 + 200 + 1000) {
        const { node } = await second.nodes.getNode({ node: silent.uuid });
        if (node?.provisionState === ProvisionState.PROVISION_STATE_INSPECT_FAILED) {
          seenFailedAt = Date.now();
          assert.match(node.lastError, /^no heartbeat from the agent since the node entered inspect wait \d+s ago \(timeout 2s\)$/);
          break;
        }
        assert.equal(node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_WAIT);
        await sleep(25);
      }
      assert.ok(seenFailedAt !== undefined, 'the silent node failed once the grace was over');
      assert.ok(seenFailedAt >= startingAt + 1500, `failed ${seenFailedAt - startingAt}ms after start, inside the 1500ms grace`);
      const grace = metricValue(await scrapeMetrics(second.controller), 'metalcast_sweep_runs_total{result="grace"}') ?? 0;
      assert.ok(grace >= 1, 'the sweep reported waiting out the grace');

      // One more sweep interval and more: the node whose agent came back still waits.
      await sleep(400);
      assert.equal((await second.nodes.getNode({ node: back.uuid })).node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_WAIT);
      beating = false;
      await beats;
      stream.end();
      assert.equal(await stream.ended, undefined);
    });
  });

  describe('graceful stop', () => {
    it('ends open heartbeat streams with UNAVAILABLE and stops well within the shutdown timeout', async () => {
      const t = await start({ ...FAST_FLAGS, shutdownTimeout: '10s' });
      const node = await createWaitingNode(t.nodes, 'gs-open', ['02:00:00:00:35:01']);
      const { agentToken } = await lookup(t.gateway, ['02:00:00:00:35:01']);
      const stream = heartbeat(t, node.uuid, agentToken);
      await stream.beat();

      const stopping = Date.now();
      await t.controller.stop();
      const tookMs = Date.now() - stopping;
      assert.ok(tookMs < 2000, `stop took ${tookMs}ms with a heartbeat stream open`);
      assertClientError(await stream.ended, Status.UNAVAILABLE, /the controller is shutting down; reconnect shortly/);
    });

    it('ends a heartbeat stream that was still authenticating when the stop began', async () => {
      // Neither keepalive nor the sweep may end the stream here: only the stop should.
      const t = await start({ ...FAST_FLAGS, heartbeatTimeout: '60s', keepaliveTime: '60s', shutdownTimeout: '10s' });
      const node = await createWaitingNode(t.nodes, 'gs-late', ['02:00:00:00:35:02']);
      const { agentToken } = await lookup(t.gateway, ['02:00:00:00:35:02']);
      // A slow database: the stream's authentication waits on this node's read until released.
      const store = t.controller.store;
      const getNode = store.getNode.bind(store);
      const entered = deferred();
      const release = deferred();
      store.getNode = async (ref: string) => {
        if (ref === node.uuid) {
          entered.resolve();
          await release.promise;
        }
        return getNode(ref);
      };
      const stream = heartbeat(t, node.uuid, agentToken);
      stream.send();
      await entered.promise;

      const stopping = Date.now();
      const stopped = t.controller.stop();
      release.resolve();
      await stopped;
      const tookMs = Date.now() - stopping;
      assert.ok(tookMs < 2000, `stop took ${tookMs}ms: the stream that authenticated late held it open`);
      assertClientError(await stream.ended, Status.UNAVAILABLE);
    });

    it('does not wait for a call to an agent that stopped answering', async () => {
      const t = await start({ ...FAST_FLAGS, shutdownTimeout: '10s' });
      // An agent API that accepts connections and then never answers: the controller's inventory call hangs. The proxy
      // leads to a port that only accepts, not to the controller's own port: a silent socket there would sit in the
      // controller's TLS handshake, which a stop gives the whole shutdown timeout (shutdown.test.ts tests that bound).
      const silent = createServer((socket) => socket.on('error', () => {}));
      const held = new Set<Socket>();
      silent.on('connection', (socket) => {
        held.add(socket);
        socket.once('close', () => held.delete(socket));
      });
      await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
      cleanups.push(() => {
        for (const socket of held) socket.destroy();
        silent.close();
      });
      const target = await TcpProxy.start(`127.0.0.1:${(silent.address() as AddressInfo).port}`);
      cleanups.push(() => target.close());
      target.blackhole();
      const node = await createWaitingNode(t.nodes, 'gs-hung-agent', ['02:00:00:00:36:01']);
      const { agentToken } = await lookup(t.gateway, ['02:00:00:00:36:01']);
      const stream = heartbeat(t, node.uuid, agentToken);
      await stream.beat({ agentAddress: target.address });
      // Wait until the controller is inside the call: it holds the node's lock for the inspection.
      const deadline = Date.now() + 5000;
      while ((await t.controller.store.getNode(node.uuid))?.reservation !== t.config.controllerId) {
        assert.ok(Date.now() < deadline, 'the controller did not start inspecting');
        await sleep(20);
      }
      // ...and its call has reached the silent agent (the lock is taken a moment before the call starts).
      while (target.stats.acceptedConnections === 0) {
        assert.ok(Date.now() < deadline, 'the controller did not call the agent');
        await sleep(20);
      }

      const stopping = Date.now();
      await t.controller.stop();
      const tookMs = Date.now() - stopping;
      assert.ok(tookMs < 2000, `stop took ${tookMs}ms while an agent call hung`);
      assertClientError(await stream.ended, Status.UNAVAILABLE);
      // Stopping is not the agent's fault: the node is not failed for it, and its lock is released.
      const after = await startTestController(FAST_FLAGS, t.dataDir);
      controllers.push(after);
      const { node: kept } = await after.nodes.getNode({ node: node.uuid });
      assert.equal(kept?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_WAIT);
      assert.equal(kept?.lastError, '');
    });
  });
});
