import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { PostgresStore } from '../../controller/store/postgres.js';
import type { NodeEventRecord } from '../../controller/store/store.js';
import { postgresSchema, postgresSkipReason } from '../helpers/postgres.js';
import { holdNextCommit, settledOrWaitingForLock } from '../helpers/postgres-hold.js';

const skip = await postgresSkipReason();

describe('node events on PostgreSQL, paged by afterId', { skip }, () => {
  let schema: Awaited<ReturnType<typeof postgresSchema>>;
  let late: PostgresStore;
  let quick: PostgresStore;
  let watcher: PostgresStore;

  before(async () => {
    schema = await postgresSchema();
    // Three controllers' stores: two writers and one watcher.
    late = await PostgresStore.open(schema.url);
    quick = await PostgresStore.open(schema.url);
    watcher = await PostgresStore.open(schema.url);
  });

  after(async () => {
    await Promise.all([late?.close(), quick?.close(), watcher?.close()]);
    await schema?.drop();
  });

  it('a watcher never misses an event whose transaction commits after a later one started', async () => {
    const node = await quick.createNode(
      { name: 'events-late', macAddresses: ['02:00:00:00:e0:01'], properties: {} },
      { kind: 'created', message: 'created', actor: 'test', fromState: null, toState: null },
    );
    const seen: NodeEventRecord[] = [];
    let cursor = 0;
    const page = async () => {
      for (let i = 0; i < 100; i++) {
        const events = await watcher.listEvents(node.uuid, cursor, 2);
        if (events.length === 0) return;
        seen.push(...events);
        cursor = events.at(-1)?.id ?? cursor;
      }
    };
    await page();

    // Writer 1 writes an event in a transaction that commits late.
    const held = holdNextCommit(late);
    const first = late.setMaintenance(node.uuid, true, 'late writer', {
      kind: 'maintenance',
      message: 'from the writer that commits late',
      actor: 'test',
      fromState: null,
      toState: null,
    });
    await held.atCommit;
    // Writer 2 writes another event of the same node meanwhile, committing at once (before the fix, with a later id).
    const second = quick.addEvent(node.uuid, {
      kind: 'note',
      message: 'from the writer that commits at once',
      actor: 'test',
      fromState: null,
      toState: null,
    });
    // Either writer 2 is done, or it waits for writer 1 (a lock on the node): both are allowed, the watcher must cope.
    await settledOrWaitingForLock(schema.url, second, 'node_events');
    await page();
    held.release();
    await first;
    await second;
    await page();

    const messages = seen.map((event) => event.message);
    assert.ok(messages.includes('from the writer that commits at once'), messages.join(' | '));
    assert.ok(
      messages.includes('from the writer that commits late'),
      `the watcher paged past the late writer's event: saw ${messages.join(' | ')}`,
    );
    const all = await watcher.listEvents(node.uuid, 0, 100);
    assert.deepEqual(
      seen.map((event) => event.id),
      all.map((event) => event.id),
      'the watcher saw every event, in order',
    );
  });

  it('many writers on several stores, a watcher paging all along: every event seen once, in id order', async () => {
    const node = await quick.createNode(
      { name: 'events-storm', macAddresses: ['02:00:00:00:e0:02'], properties: {} },
      { kind: 'created', message: 'created', actor: 'test', fromState: null, toState: null },
    );
    const seen: number[] = [];
    let cursor = 0;
    let writing = true;
    const watching = (async () => {
      for (let i = 0; i < 20_000 && (writing || i === 0); i++) {
        const events = await watcher.listEvents(node.uuid, cursor, 5);
        for (const event of events) seen.push(event.id);
        cursor = events.at(-1)?.id ?? cursor;
      }
    })();
    const writes: Promise<unknown>[] = [];
    for (let i = 0; i < 60; i++) {
      const store = i % 2 === 0 ? late : quick;
      const event = { kind: 'note', message: `event ${i}`, actor: 'test', fromState: null, toState: null };
      writes.push(i % 3 === 0 ? store.setMaintenance(node.uuid, i % 2 === 0, `m${i}`, event) : store.addEvent(node.uuid, event));
    }
    await Promise.all(writes);
    writing = false;
    await watching;
    for (;;) {
      const events = await watcher.listEvents(node.uuid, cursor, 50);
      if (events.length === 0) break;
      for (const event of events) seen.push(event.id);
      cursor = events.at(-1)?.id ?? cursor;
    }
    const all = (await watcher.listEvents(node.uuid, 0, 1000)).map((event) => event.id);
    assert.equal(all.length, 61);
    assert.deepEqual(seen, all);
  });
});
