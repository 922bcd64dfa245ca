import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Status } from 'nice-grpc';
import { MetalcastError } from '../../common/errors.js';
import { createWaitingNode, lookup, openHeartbeat } from '../helpers/agent-client.js';
import { metricValue, scrapeMetrics, startTestController, type TestController } from '../helpers/controller.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';

describe('node locks', () => {
  let t: TestController;
  before(async () => {
    t = await startTestController({ startupGrace: '600s', heartbeatFlushInterval: '20ms' });
  });
  after(async () => t.destroy());

  it('an ordinary attempt on a locked node fails fast, naming the holder and the operation', async () => {
    const node = await createWaitingNode(t.nodes, 'lock-1', ['02:bb:00:00:00:01']);
    const held = await t.controller.locks.lock(node.uuid, 'console');
    try {
      await assertRejectsWith(
        t.nodes.setMaintenance({ node: node.uuid, enabled: false, reason: '' }),
        Status.FAILED_PRECONDITION,
        /node is locked by test-controller for console/,
      );
    } finally {
      await held.release();
    }
    // Released: the same call goes through.
    await t.nodes.setMaintenance({ node: node.uuid, enabled: false, reason: '' });
  });

  it('a patient hand-off is served despite a flood of heartbeats and short lock holders, and waiters go in arrival order', async () => {
    const node = await createWaitingNode(t.nodes, 'lock-2', ['02:bb:00:00:00:02']);
    const { agentToken } = await lookup(t.gateway, ['02:bb:00:00:00:02']);
    // Maintenance keeps the controller's own conductor out of the way; the test plays the hand-offs.
    await t.nodes.setMaintenance({ node: node.uuid, enabled: true, reason: 'test plays the conductor' });
    const stream = openHeartbeat(t.gateway, node.uuid, agentToken);

    const first = await t.controller.locks.lock(node.uuid, 'console');
    const order: string[] = [];
    const abort = new AbortController();
    const handOffs = ['deploy', 'clean', 'inspect'].map(async (operation, index) => {
      // Stagger the arrivals so that their order is known.
      await new Promise((r) => setTimeout(r, 20 * index));
      const lock = await t.controller.locks.lockPatiently(node.uuid, operation, abort.signal);
      order.push(operation);
      await new Promise((r) => setTimeout(r, 20));
      await lock.release();
    });
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(t.controller.locks.waiting(node.uuid), 3);

    // The flood: heartbeats and operators trying to grab the lock, while the hand-offs wait.
    let refused = 0;
    let flooding = true;
    const flood = (async () => {
      for (let i = 0; flooding && i < 2000; i++) {
        stream.send();
        try {
          const lock = await t.controller.locks.lock(node.uuid, 'read');
          await lock.release();
        } catch (error) {
          assert.ok(error instanceof MetalcastError && error.status === Status.FAILED_PRECONDITION);
          refused++;
        }
      }
    })();
    await new Promise((r) => setTimeout(r, 300));
    await first.release();
    await Promise.all(handOffs);
    flooding = false;
    await flood;
    abort.abort();
    stream.end();

    assert.deepEqual(order, ['deploy', 'clean', 'inspect'], 'first come, first served');
    assert.ok(refused > 0, 'short holders were held off while hand-offs waited');
    const metrics = await scrapeMetrics(t.controller);
    assert.ok((metricValue(metrics, 'metalcast_lock_wait_seconds_count{kind="patient"}') ?? 0) >= 3);
    assert.ok((metricValue(metrics, 'metalcast_heartbeats_total') ?? 0) > 0);
    // Nothing is left locked.
    assert.equal((await t.nodes.getNode({ node: node.uuid })).node?.reservation, '');
  });

  it('a patient waiter gives up when its signal aborts, and the lock stays usable', async () => {
    const node = await createWaitingNode(t.nodes, 'lock-3', ['02:bb:00:00:00:03']);
    const held = await t.controller.locks.lock(node.uuid, 'console');
    const abort = new AbortController();
    const waiting = t.controller.locks.lockPatiently(node.uuid, 'deploy', abort.signal);
    setTimeout(() => abort.abort(), 50);
    await assert.rejects(waiting, (error: Error) => error.name === 'AbortError');
    assert.equal(t.controller.locks.waiting(node.uuid), 0);
    await held.release();
    const again = await t.controller.locks.lock(node.uuid, 'console');
    await again.release();
  });
});
