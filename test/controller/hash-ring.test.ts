import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { describe, it } from 'node:test';
import { HashRing, inRanges, RING_SIZE, ringHash } from '../../controller/cluster/hash-ring.js';

const keys = Array.from({ length: 20_000 }, () => randomUUID());

describe('HashRing', () => {
  it('gives every key exactly one owner, the same one its ranges say, and shares within 25% of even', () => {
    const ring = new HashRing(['c2', 'c0', 'c1']);
    const ranges = new Map(ring.members.map((m) => [m, ring.rangesOf(m)]));
    const counts = new Map<string, number>();
    for (const key of keys) {
      const owner = ring.ownerOf(key) as string;
      const hash = ringHash(key);
      const claimed = ring.members.filter((m) => inRanges(hash, ranges.get(m) ?? []));
      assert.deepEqual(claimed, [owner], `key ${key} (hash ${hash})`);
      counts.set(owner, (counts.get(owner) ?? 0) + 1);
    }
    for (const [member, count] of counts) {
      assert.ok(Math.abs(count / keys.length - 1 / 3) < 0.25 / 3, `${member} owns ${count} of ${keys.length}`);
    }
  });

  it('covers the whole ring with disjoint ranges, including both ends', () => {
    const ring = new HashRing(['a', 'b', 'c', 'd']);
    const all = ring.members.flatMap((m) => ring.rangesOf(m)).sort((x, y) => x.from - y.from);
    assert.equal(all[0]?.from, 0);
    assert.equal(all.at(-1)?.to, RING_SIZE);
    for (let i = 1; i < all.length; i++) assert.equal(all[i]?.from, all[i - 1]?.to, 'no gap and no overlap');
    for (const edge of [0, 1, RING_SIZE - 1]) assert.ok(ring.ownerOfHash(edge), `hash ${edge} has an owner`);
  });

  it('moves only the joining member’s share when a member joins, and every member computes the same ring', () => {
    const before = new HashRing(['c0', 'c1']);
    const after = new HashRing(['c1', 'c2', 'c0']);
    let moved = 0;
    for (const key of keys) {
      const was = before.ownerOf(key);
      const is = after.ownerOf(key);
      if (was !== is) {
        moved++;
        assert.equal(is, 'c2', 'a key only ever moves to the member that joined');
      }
    }
    assert.ok(moved / keys.length < 0.45, `${moved} of ${keys.length} keys moved (about a third expected)`);
    assert.deepEqual(new HashRing(['c0', 'c2', 'c1']).rangesOf('c1'), after.rangesOf('c1'), 'order of members does not matter');
  });

  it('one member owns everything; an empty ring owns nothing', () => {
    assert.deepEqual(new HashRing(['solo']).rangesOf('solo'), [{ from: 0, to: RING_SIZE }]);
    assert.equal(new HashRing([]).ownerOf('x'), undefined);
    assert.deepEqual(new HashRing(['a']).rangesOf('stranger'), []);
  });
});
