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

  it('counts bytes by source from the cumulative figures agents report', () => {
    const { t, events } = tracker();
    t.exchange(input('a', [], { bytesFromPeers: 100, bytesFromController: 50 }));
    t.exchange(input('a', [], { bytesFromPeers: 300, bytesFromController: 50 }));
    assert.equal(events.peer, 300);
    assert.equal(events.controller, 50);
  });
});
