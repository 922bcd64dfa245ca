import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { DEFAULT_FANOUT_POLICY, type ExchangeInput, type FanoutPolicy, FanoutTracker } from '../../controller/fanout/tracker.js';
import { PeerFailureKind } from '../../gen/metalcast/v1/fanout.js';
import { testLogger } from '../helpers/controller.js';

/* The tracker's choices, without processes: who is named for what, and when the controller serves. */

const CHUNKS = 16;

function bitmap(chunks: number[]): Uint8Array {
  const bits = new Uint8Array(Math.ceil(CHUNKS / 8));
  for (const c of chunks) bits[c >> 3] = (bits[c >> 3] ?? 0) | (1 << (c & 7));
  return bits;
}

function input(node: string, held: number[], more: Partial<ExchangeInput> = {}): ExchangeInput {
  return {
    nodeUuid: node,
    address: `${node}:1`,
    certificatePem: '',
    properties: {},
    waveKey: 'os@abc',
    chunkCount: CHUNKS,
    held: bitmap(held),
    fetching: bitmap([]),
    maxAssignments: 4,
    failures: [],
    bytesFromPeers: 0,
    bytesFromController: 0,
    ...more,
  };
}

function tracker(now = () => 1000, policy: Partial<FanoutPolicy> = {}) {
  const events = { peer: 0, controller: 0, failures: [] as string[], dropped: 0 };
  const t = new FanoutTracker(
    { ...DEFAULT_FANOUT_POLICY, ...policy },
    {
      bytes: (source, bytes) => {
        events[source] += bytes;
      },
      peerFailure: (kind) => events.failures.push(kind),
      peerDropped: () => {
        events.dropped++;
      },
    },
    testLogger(),
    now,
  );
  return { t, events };
}

describe('fan-out tracker', () => {
  it('hands each chunk nobody holds to one agent only, a few at a time: the controller sends it about once per wave', () => {
    const { t } = tracker();
    const agents = ['n0', 'n1', 'n2', 'n3', 'n4', 'n5'];
    for (const n of agents) t.exchange(input(n, [], { maxAssignments: 0 })); // the wave's members make themselves known
    const leased = new Map<number, string>();
    for (const n of agents) {
      const out = t.exchange(input(n, []));
      for (const a of out.assignments) {
        assert.deepEqual(a.peers, [], 'nobody holds anything yet: from the controller');
        assert.ok(!leased.has(a.chunk), `chunk ${a.chunk} was leased twice`);
        leased.set(a.chunk, n);
      }
    }
    assert.equal(
      leased.size,
      DEFAULT_FANOUT_POLICY.controllerStreams,
      'only controllerStreams chunks are read from the controller at once',
    );
    assert.equal(new Set(leased.values()).size, leased.size, 'each to another agent');
    const waiting = t.exchange(input('n5', []));
    assert.deepEqual(waiting.assignments, [], 'every stream is taken: the others wait for a peer to hold a chunk');
    assert.ok(waiting.retryAfterMs > 0);

    // One lease ends (its agent holds the chunk): the chunk is named from that peer, and a new chunk is leased.
    const [chunk, holder] = [...leased][0] as [number, string];
    t.exchange(input(holder, [chunk], { maxAssignments: 0 }));
    const next = t.exchange(input('n5', [], { maxAssignments: 2 }));
    assert.deepEqual(
      next.assignments.find((a) => a.chunk === chunk)?.peers.map((p) => p.nodeUuid),
      [holder],
      'the chunk now held is fetched from its holder',
    );
    const fresh = next.assignments.filter((a) => a.peers.length === 0);
    assert.equal(fresh.length, 1, 'the freed stream goes to the next chunk nobody holds');
    assert.ok(!leased.has(fresh[0]?.chunk ?? -1));
  });

  it('lets one agent alone read several chunks from the controller at once', () => {
    const { t } = tracker();
    const out = t.exchange(input('only', []));
    assert.equal(out.assignments.length, 4);
    assert.ok(out.assignments.every((a) => a.peers.length === 0));
  });

  it('names no peer that serves as many reads as it accepts, until those fetches end', () => {
    const { t } = tracker();
    t.exchange(input('seed', [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]));
    const first = t.exchange(input('a', [], { maxAssignments: 16 }));
    assert.equal(first.assignments.length, DEFAULT_FANOUT_POLICY.maxUploads, 'the only holder serves maxUploads reads at once');
    const second = t.exchange(input('b', [], { maxAssignments: 4 }));
    assert.deepEqual(second.assignments, [], 'the holder is busy: b waits rather than meet RESOURCE_EXHAUSTED');
    // a reports one fetch ended (the chunk no longer in its fetching bitmap, and held): one read is free again.
    const fetching = first.assignments.slice(1).map((x) => x.chunk);
    const got = first.assignments[0]?.chunk ?? -1;
    t.exchange(input('a', [got], { fetching: bitmap(fetching), maxAssignments: 0 }));
    const third = t.exchange(input('b', [], { maxAssignments: 4 }));
    assert.equal(third.assignments.length, 2, 'one read free at the seed, one at a (which now holds a chunk)');
  });

  it('drops a peer whose deploy moved on at once, and hands out what it was reading from the controller', () => {
    const { t, events } = tracker();
    const leased = t.exchange(input('leaver', [], { maxAssignments: 4 }));
    assert.equal(leased.assignments.length, 4);
    t.exchange(input('leaver', [0], { fetching: bitmap(leased.assignments.map((a) => a.chunk)), maxAssignments: 0 }));
    const out = t.exchange(
      input('me', [], {
        maxAssignments: 16,
        failures: [{ nodeUuid: 'leaver', chunk: 0, kind: PeerFailureKind.PEER_FAILURE_KIND_GONE, reason: 'serves no wave now' }],
      }),
    );
    assert.equal(events.dropped, 1);
    assert.ok(
      out.assignments.every((a) => a.peers.length === 0),
      'the leaver is named no more',
    );
    assert.equal(out.assignments.length, 4, "the leaver's leases are free again");
  });

  it('names holders, same rack first, and the rarest chunks first', () => {
    const { t } = tracker(undefined, { maxUploads: 64 });
    const all = Array.from({ length: CHUNKS }, (_, i) => i);
    t.exchange(input('far', all, { properties: { rack: 'r2' } }));
    t.exchange(input('near', all.slice(0, 8), { properties: { rack: 'r1' } }));
    const out = t.exchange(input('me', [], { properties: { rack: 'r1' }, maxAssignments: 16 }));
    assert.equal(out.assignments.length, CHUNKS);
    // Chunks 8-15 have one holder, 0-7 two: the rare ones come first.
    assert.deepEqual(
      out.assignments
        .slice(0, 8)
        .map((a) => a.chunk)
        .sort((a, b) => a - b),
      all.slice(8),
    );
    for (const a of out.assignments) {
      const names = a.peers.map((p) => p.nodeUuid);
      assert.deepEqual(names, a.chunk < 8 ? ['near', 'far'] : ['far'], `chunk ${a.chunk}: same rack first`);
    }
  });

  it('drops a peer that served a corrupt chunk for the wave, and counts the failure', () => {
    const { t, events } = tracker();
    t.exchange(input('liar', [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]));
    const before = t.exchange(input('me', [], { maxAssignments: 1 }));
    assert.equal(before.assignments[0]?.peers[0]?.nodeUuid, 'liar');
    const after = t.exchange(
      input('me', [], {
        maxAssignments: 16,
        failures: [{ nodeUuid: 'liar', chunk: 0, kind: PeerFailureKind.PEER_FAILURE_KIND_CORRUPT, reason: 'bad' }],
      }),
    );
    assert.ok(
      after.assignments.every((a) => a.peers.every((p) => p.nodeUuid !== 'liar')),
      'the liar is named no more',
    );
    assert.deepEqual(events.failures, ['corrupt']);
    assert.equal(events.dropped, 1);
    assert.deepEqual(t.snapshot('os@abc')?.dropped, ['liar']);
  });

  it('names a node whose write ended no more, without counting it a failure', () => {
    const { t, events } = tracker();
    const all = Array.from({ length: CHUNKS }, (_, i) => i);
    t.exchange(input('done', all));
    t.exchange(input('other', all.slice(0, 8)));
    t.leave('done');
    const out = t.exchange(input('me', [], { maxAssignments: 16 }));
    assert.ok(
      out.assignments.every((a) => a.peers.every((p) => p.nodeUuid === 'other')),
      'only the agent still deploying is named',
    );
    // Chunks 8-15 only the leaver held: they come from the controller, half of its four streams to each of the two agents left.
    const leased = out.assignments.filter((a) => a.peers.length === 0);
    assert.equal(leased.length, 2);
    assert.ok(leased.every((a) => a.chunk >= 8));
    assert.equal(events.dropped, 0);
    assert.equal(t.snapshot('os@abc')?.members, 2);
  });

  it('hands out again what an agent silent for 10 s was reading from the controller (it died mid-chunk)', () => {
    let now = 1000;
    const { t } = tracker(() => now);
    const first = t.exchange(input('dies', [], { maxAssignments: 4 }));
    assert.equal(first.assignments.length, 4);
    const fetching = bitmap(first.assignments.map((a) => a.chunk));
    now += 5_000;
    t.exchange(input('dies', [], { fetching, maxAssignments: 0 })); // alive, fetching: exchanges every 2 s
    now += 8_000;
    assert.deepEqual(t.exchange(input('waits', [], { maxAssignments: 4 })).assignments, [], '13 s in, heard from 8 s ago: its leases hold');
    now += 3_000;
    const after = t.exchange(input('waits', [], { maxAssignments: 4 }));
    assert.equal(after.assignments.length, 2, 'silent for 11 s: its chunks are leased again (half the streams each, two agents)');
  });

  it('stops naming a member that has gone quiet, and names it again when it exchanges', () => {
    let now = 1000;
    const { t } = tracker(() => now);
    const all = Array.from({ length: CHUNKS }, (_, i) => i);
    t.exchange(input('quiet', all));
    now += DEFAULT_FANOUT_POLICY.memberTtlMs;
    const without = t.exchange(input('me', [], { maxAssignments: 16 }));
    assert.ok(
      without.assignments.every((a) => a.peers.length === 0),
      'a member silent for the TTL holds nothing as far as the wave knows',
    );
    t.exchange(input('quiet', all));
    const again = t.exchange(input('other', [], { maxAssignments: 16 }));
    assert.ok(again.assignments.length > 0);
    assert.ok(
      again.assignments.every((a) => a.peers[0]?.nodeUuid === 'quiet' || a.peers.length === 0),
      'back in the wave: named again',
    );
  });

  it('keeps picking the rarest chunks first through joins, changes, drops, leaves and silences (holder counts kept up to date)', () => {
    let now = 1000;
    const { t } = tracker(() => now, { maxUploads: 1_000_000, maxPeers: 16 });
    // A fixed-seed generator: a failure replays.
    let seed = 17;
    const random = () => {
      seed = (seed * 1_103_515_245 + 12_345) % 2 ** 31;
      return seed / 2 ** 31;
    };
    const held = new Map<string, number[]>();
    const gone = new Set<string>();
    const names = Array.from({ length: 12 }, (_, i) => `m${i}`);
    for (let step = 0; step < 200; step++) {
      const name = names[Math.floor(random() * names.length)] as string;
      const what = random();
      if (what < 0.7) {
        const chunks = Array.from({ length: CHUNKS }, (_, i) => i).filter(() => random() < 0.4);
        t.exchange(input(name, chunks, { maxAssignments: 0 }));
        held.set(name, chunks);
        gone.delete(name);
      } else if (what < 0.8) {
        t.leave(name);
        gone.add(name);
      } else if (what < 0.9 && held.has(name) && !gone.has(name)) {
        // Reported corrupt by a bystander: dropped for the wave for good.
        t.exchange(
          input('reporter', [], {
            maxAssignments: 0,
            failures: [{ nodeUuid: name, chunk: 0, kind: PeerFailureKind.PEER_FAILURE_KIND_CORRUPT, reason: 'bad' }],
          }),
        );
        names.splice(names.indexOf(name), 1);
        gone.add(name);
        if (names.length < 4) break;
      } else {
        // Everyone but this one goes quiet for the TTL; they come back as they exchange again.
        now += DEFAULT_FANOUT_POLICY.memberTtlMs;
        for (const other of names) if (other !== name && held.has(other) && !gone.has(other)) gone.add(other);
        t.exchange(input(name, held.get(name) ?? [], { maxAssignments: 0 }));
        gone.delete(name);
      }
      // The truth, counted afresh from who is in the wave now.
      const holders = (chunk: number) =>
        [...held].filter(([n, chunks]) => !gone.has(n) && names.includes(n) && chunks.includes(chunk)).length;
      const out = t.exchange(input('asker', [], { maxAssignments: CHUNKS }));
      const order = out.assignments.map((a) => holders(a.chunk));
      for (let i = 1; i < order.length; i++) {
        assert.ok(
          (order[i - 1] as number) <= (order[i] as number),
          `step ${step}: chunks handed out with ${order.join(', ')} holders: not the rarest first`,
        );
      }
      for (const a of out.assignments) assert.equal(a.peers.length, holders(a.chunk), `step ${step}: chunk ${a.chunk}'s holders named`);
    }
  });

  it('counts bytes by source from the cumulative figures agents report', () => {
    const { t, events } = tracker();
    t.exchange(input('a', [], { bytesFromPeers: 100, bytesFromController: 50 }));
    t.exchange(input('a', [], { bytesFromPeers: 300, bytesFromController: 50 }));
    assert.equal(events.peer, 300);
    assert.equal(events.controller, 50);
  });
});
