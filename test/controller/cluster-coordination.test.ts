import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Status } from 'nice-grpc';
import { MetalcastError } from '../../common/errors.js';
import { ProvisionAction } from '../../gen/metalcast/v1/node.js';
import { createWaitingNode, lookup, openHeartbeat } from '../helpers/agent-client.js';
import { eventually, startTestController, type TestController } from '../helpers/controller.js';
import { postgresSchema, postgresSkipReason } from '../helpers/postgres.js';

/**
 * Two controllers in this process on one PostgreSQL schema: what they
 * coordinate through the database (locks, watchers, token revocation),
 * without agents. The crash and takeover path is cluster.test.ts.
 */
describe('two controllers coordinating through PostgreSQL', { skip: await postgresSkipReason() }, () => {
  let schema: Awaited<ReturnType<typeof postgresSchema>>;
  let a: TestController;
  let b: TestController;

  before(async () => {
    schema = await postgresSchema();
    const flags = { database: schema.url, startupGrace: '600s', heartbeatFlushInterval: '20ms', controllerTouchInterval: '500ms' };
    a = await startTestController({ ...flags, controllerId: 'ctl-a' });
    b = await startTestController({ ...flags, controllerId: 'ctl-b' });
    await eventually(() => a.controller.membership.members.length === 2 && b.controller.membership.members.length === 2, {
      what: 'both controllers to see each other',
    });
  });
  after(async () => {
    await a?.destroy();
    await b?.destroy();
    await schema?.drop();
  });

  it('serves patient waiters of both controllers in arrival order, woken by notification rather than polling', async () => {
    const node = await createWaitingNode(a.nodes, 'co-lock', ['02:cc:00:00:00:01']);
    await a.nodes.setMaintenance({ node: node.uuid, enabled: true, reason: 'the test plays the conductor' });
    const first = await a.controller.locks.lock(node.uuid, 'console');
    const order: string[] = [];
    const abort = new AbortController();
    const acquiredAt: number[] = [];
    const waiters = [
      [b, 'deploy'],
      [a, 'clean'],
      [b, 'inspect'],
    ].map(async ([controller, operation], index) => {
      await new Promise((r) => setTimeout(r, 50 * index));
      const lock = await (controller as TestController).controller.locks.lockPatiently(node.uuid, operation as string, abort.signal);
      acquiredAt.push(Date.now());
      order.push(operation as string);
      await new Promise((r) => setTimeout(r, 20));
      await lock.release();
    });
    await new Promise((r) => setTimeout(r, 300));
    // While hand-offs queue, an ordinary attempt on either controller is refused.
    await assert.rejects(
      b.controller.locks.lock(node.uuid, 'read'),
      (e: unknown) => e instanceof MetalcastError && e.status === Status.FAILED_PRECONDITION,
    );
    const releasedAt = Date.now();
    await first.release();
    await Promise.all(waiters);
    abort.abort();
    assert.deepEqual(order, ['deploy', 'clean', 'inspect'], 'first come, first served, across controllers');
    // A waiter re-checks by itself only every 5 s; the three hand-offs took far less, so notifications woke them.
    const took = (acquiredAt.at(-1) as number) - releasedAt;
    assert.ok(took < 2000, `three hand-offs took ${took} ms after the release`);
    // The lock is free again and nobody queues.
    const held = await b.controller.locks.lock(node.uuid, 'read');
    await held.release();
  });

  it('a watcher on one controller sees the changes another controller makes', async () => {
    const node = await createWaitingNode(a.nodes, 'co-watch', ['02:cc:00:00:00:02']);
    const abort = new AbortController();
    const seen: string[] = [];
    const watching = (async () => {
      try {
        for await (const change of b.nodes.watchNodes({ nodes: [node.uuid] }, { signal: abort.signal })) {
          seen.push(change.node?.maintenance ? `maintenance: ${change.node.maintenanceReason}` : 'in service');
        }
      } catch {
        // Aborted at the end of the test.
      }
    })();
    await eventually(() => seen.length >= 1, { what: 'the watch snapshot' });
    await a.nodes.setMaintenance({ node: node.uuid, enabled: true, reason: 'changed on ctl-a' });
    await eventually(() => seen.includes('maintenance: changed on ctl-a'), {
      what: 'the change made on ctl-a to reach the watcher on ctl-b',
    });
    abort.abort();
    await watching;
  });

  it('a heartbeat stream held by one controller ends when the other wipes the node’s token', async () => {
    const node = await createWaitingNode(a.nodes, 'co-token', ['02:cc:00:00:00:03']);
    const { agentToken } = await lookup(b.gateway, ['02:cc:00:00:00:03']);
    const stream = openHeartbeat(b.gateway, node.uuid, agentToken);
    stream.send();
    await eventually(() => b.controller.sessions.isOpen(node.uuid), { what: 'the stream to open on ctl-b' });
    // Abort on ctl-a: the node leaves the agent states and its token is wiped in the database.
    await a.nodes.setProvisionState({ node: node.uuid, action: ProvisionAction.PROVISION_ACTION_ABORT });
    // ctl-b notices at the stream's next heartbeat.
    const ended = await eventually(
      async () => {
        stream.send();
        return Promise.race([stream.ended, new Promise((r) => setTimeout(() => r(undefined), 200))]);
      },
      { what: 'the stream on ctl-b to end' },
    );
    assert.equal((ended as { code?: Status }).code, Status.UNAUTHENTICATED);
  });
});
