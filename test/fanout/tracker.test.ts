import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { DEFAULT_FANOUT_POLICY, type ExchangeInput, FanoutTracker } from '../../controller/fanout/tracker.js';
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

function tracker(now = () => 1000) {
  const events = { peer: 0, controller: 0, failures: [] as string[], dropped: 0 };
  const t = new FanoutTracker(
    DEFAULT_FANOUT_POLICY,
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
  it('hands each chunk nobody holds to one agent only: the controller sends it about once per wave', () => {
    const { t } = tracker();
    const seen = new Set<number>();
    for (let i = 0; i < 4; i++) {
      const out = t.exchange(input(`n${i}`, []));
      for (const a of out.assignments) {
        assert.deepEqual(a.peers, [], 'nobody holds anything yet: from the controller');
        assert.ok(!seen.has(a.chunk), `chunk ${a.chunk} was leased twice`);
        seen.add(a.chunk);
      }
    }
    assert.equal(seen.size, CHUNKS, 'four agents with four slots each lease all sixteen chunks');
    const fifth = t.exchange(input('n4', []));
    assert.deepEqual(fifth.assignments, [], 'every chunk is on its way from the controller: the fifth waits');
    assert.ok(fifth.retryAfterMs > 0);
  });

  it('names holders, same rack first, and the rarest chunks first', () => {
    const { t } = tracker();
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

  it('counts bytes by source from the cumulative figures agents report', () => {
    const { t, events } = tracker();
    t.exchange(input('a', [], { bytesFromPeers: 100, bytesFromController: 50 }));
    t.exchange(input('a', [], { bytesFromPeers: 300, bytesFromController: 50 }));
    assert.equal(events.peer, 300);
    assert.equal(events.controller, 50);
  });
});
