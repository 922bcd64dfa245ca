import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Membership } from '../../controller/cluster/membership.js';
import { PostgresStore } from '../../controller/store/postgres.js';
import { eventually, testLogger } from '../helpers/controller.js';
import { postgresSchema, postgresSkipReason } from '../helpers/postgres.js';

const skip = await postgresSkipReason();
const TOUCH_MS = 100;
const DEAD_AFTER_MS = 500;

describe('membership with controller clocks that disagree', { skip }, () => {
  let schema: Awaited<ReturnType<typeof postgresSchema>>;
  const stores: PostgresStore[] = [];
  const members: Membership[] = [];
  const takeovers: string[] = [];

  before(async () => {
    schema = await postgresSchema();
  });
  after(async () => {
    for (const m of members) await m.stop();
    for (const s of stores) await s.close().catch(() => {});
    await schema?.drop();
  });

  async function start(id: string, offsetMs: number): Promise<{ member: Membership; store: PostgresStore }> {
    const store = await PostgresStore.open(schema.url);
    stores.push(store);
    const member = new Membership(
      store,
      { id, touchIntervalMs: TOUCH_MS, deadAfterMs: DEAD_AFTER_MS, now: () => Date.now() + offsetMs },
      testLogger(),
      (dead) => takeovers.push(`${id} took over ${dead}`),
    );
    members.push(member);
    await member.start(`127.0.0.1:${10_000 + members.length}`);
    return { member, store };
  }

  it('one controller 60 s ahead and one 60 s behind: nobody is taken for dead; a controller that stops is taken over', async () => {
    const ahead = await start('ahead', 60_000);
    const behind = await start('behind', -60_000);
    const right = await start('right', 0);
    for (const { member } of [ahead, behind, right]) {
      await eventually(async () => member.members.length === 3, {
        timeoutMs: 5000,
        intervalMs: 20,
        what: `${member.id} to see all three controllers`,
      });
    }
    // Several dead-after periods of touches and refreshes on every side: the ring holds, nobody is taken over.
    await new Promise((resolve) => setTimeout(resolve, 3 * DEAD_AFTER_MS));
    for (const { member } of [ahead, behind, right]) await member.refresh();
    assert.deepEqual(takeovers, [], 'a live controller was taken for dead because of its clock');
    for (const { member } of [ahead, behind, right]) {
      assert.deepEqual([...member.members].sort(), ['ahead', 'behind', 'right'], `${member.id}'s ring`);
      assert.ok(member.ranges().length > 0, `${member.id} owns its share`);
    }

    // The controller whose clock is behind loses its database (as if it died): the others take it over, by the database's clock.
    await behind.store.close();
    await eventually(async () => (takeovers as string[]).some((t) => t.endsWith('took over behind')), {
      timeoutMs: 10_000,
      intervalMs: 50,
      what: 'the stopped controller to be taken over',
    });
    assert.ok(!(takeovers as string[]).some((t) => !t.endsWith('took over behind')), takeovers.join('; '));
    await eventually(async () => ahead.member.members.length === 2 && right.member.members.length === 2, {
      timeoutMs: 5000,
      intervalMs: 20,
      what: 'the ring without it',
    });
  });
});
