import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Membership } from '../../controller/cluster/membership.js';
import { SqliteStore } from '../../controller/store/sqlite.js';
import type { Store, TakeoverResult } from '../../controller/store/store.js';
import { eventually, tempDir, testLogger } from '../helpers/controller.js';

const TOUCH_MS = 100;
const DEAD_AFTER_MS = 400;

describe('controller membership', () => {
  const dir = tempDir('metalcast-membership-');
  let store: SqliteStore;
  const started: Membership[] = [];
  before(() => {
    store = SqliteStore.open(join(dir.path, 'metalcast.db'));
  });
  after(async () => {
    for (const m of started) await m.stop();
    await store.close();
    dir.remove();
  });

  function member(id: string, onTakeover?: (dead: string, result: TakeoverResult) => void, on: Store = store): Membership {
    const m = new Membership(on, { id, touchIntervalMs: TOUCH_MS, deadAfterMs: DEAD_AFTER_MS }, testLogger(), onTakeover);
    started.push(m);
    return m;
  }

  it('takes over a controller that stopped touching its row: its locks are released and a node it left mid-step fails with the reason', async () => {
    const node = await store.createNode(
      { name: 'm-1', macAddresses: ['02:dd:00:00:00:01'], properties: {} },
      { kind: 'created', message: 'test', actor: 'test', fromState: null, toState: 'enroll' },
    );
    await store.transition(node.uuid, {
      from: ['enroll'],
      to: 'deploying',
      target: 'active',
      keepAgentToken: true,
      event: { kind: 'transition', message: 'test', actor: 'test', fromState: 'enroll', toState: 'deploying' },
    });
    // A controller that died ten seconds ago holding the node's lock half-way through a deploy.
    await store.registerController('zombie', '127.0.0.1:1', Date.now() - 10_000);
    assert.ok(await store.tryLock(node.uuid, 'zombie', 'deploy'));

    const takeovers: string[] = [];
    const a = member('a', (dead) => takeovers.push(dead));
    await a.start('127.0.0.1:2');
    assert.deepEqual(takeovers, ['zombie'], 'taken over at the first refresh');
    const failed = await store.getNode(node.uuid);
    assert.equal(failed?.provisionState, 'deploy_failed');
    assert.equal(failed?.reservation, null);
    assert.match(failed?.lastError ?? '', /controller zombie stopped \(not seen for \d+s\) while it held the node; taken over by a/);
    const events = await store.listEvents(node.uuid, 0, 100);
    assert.deepEqual(
      events.slice(-2).map((e) => e.kind),
      ['takeover', 'lock_released'],
    );
    assert.deepEqual(
      (await store.listControllers()).map((c) => c.id),
      ['a'],
      'the dead row is gone',
    );
    assert.deepEqual(a.members, ['a']);
    assert.ok(a.owns(node.uuid), 'alone, it owns every node');
  });

  it('shares the nodes with a controller that joins, each node owned by exactly one, and takes its share back when it leaves', async () => {
    const a = started[0] as Membership;
    const b = member('b');
    await b.start('127.0.0.1:3');
    // SQLite notifications stay in one process's store object, and both share it here; a refresh picks b up anyway.
    await eventually(() => a.members.length === 2, { what: 'a to see b' });
    const uuids = Array.from({ length: 200 }, (_, i) => `00000000-0000-4000-8000-${String(i).padStart(12, '0')}`);
    const ownedByA = uuids.filter((u) => a.owns(u));
    const ownedByB = uuids.filter((u) => b.owns(u));
    assert.equal(ownedByA.length + ownedByB.length, uuids.length, 'every node has one owner');
    assert.ok(ownedByA.length > 40 && ownedByB.length > 40, `${ownedByA.length} / ${ownedByB.length}`);
    await b.stop();
    await eventually(() => a.members.length === 1, { what: 'a to see b leave' });
    assert.ok(uuids.every((u) => a.owns(u)));
  });

  it('owns nothing while it cannot touch its row, and owns again once it can', async () => {
    let broken = false;
    const flaky = new Proxy(store, {
      get(target, property, receiver) {
        if (property === 'touchController' && broken) return async () => Promise.reject(new Error('database unreachable'));
        const value = Reflect.get(target, property, receiver);
        return typeof value === 'function' ? value.bind(target) : value;
      },
    }) as Store;
    const c = member('c', undefined, flaky);
    await c.start('127.0.0.1:4');
    await eventually(() => c.ranges().length > 0, { what: 'c to own a share' });
    broken = true;
    await eventually(() => c.ranges().length === 0, { what: 'c to give up its share', timeoutMs: DEAD_AFTER_MS * 3 });
    assert.equal(c.owns('00000000-0000-4000-8000-000000000001') || c.owns('00000000-0000-4000-8000-000000000002'), false);
    broken = false;
    await eventually(() => c.ranges().length > 0, { what: 'c to own a share again' });
  });
});
