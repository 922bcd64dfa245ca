import { randomBytes } from 'node:crypto';
import type { Logger } from '../../common/logging.js';
import { type ChunkAssignment, type ChunkPeer, type PeerFailure, PeerFailureKind } from '../../gen/metalcast/v1/fanout.js';
import { HolderCounts } from './holder-counts.js';

/** Fan-out policy of one controller (docs/fanout.md); the flags that set it are in controller/config.ts. */
export interface FanoutPolicy {
  /** --fanout: agents share chunks at all. */
  enabled: boolean;
  /** --fanout-max-peers: peers named per chunk, the fetching agent tries them in order. */
  maxPeers: number;
  /** --fanout-max-uploads: chunk reads one agent serves at once. */
  maxUploads: number;
  /** --fanout-max-upload-rate: bytes per second one agent serves to peers; 0 for no cap. */
  maxUploadBytesPerSecond: number;
  /** --fanout-controller-streams: chunks of one wave read from the controller at once. */
  controllerStreams: number;
  /** How long a chunk handed out to be read from the controller is reserved for that agent. */
  controllerLeaseMs: number;
  /** A member that has not exchanged for this long is no longer handed out as a peer. */
  memberTtlMs: number;
}

export const DEFAULT_FANOUT_POLICY: FanoutPolicy = {
  enabled: true,
  maxPeers: 3,
  maxUploads: 4,
  maxUploadBytesPerSecond: 0,
  controllerStreams: 4,
  controllerLeaseMs: 30_000,
  memberTtlMs: 60_000,
};

/** Errors from one peer before it is dropped for the wave; a corrupt or stalled chunk drops it at once. */
const MAX_PEER_ERRORS = 3;
/**
 * An assignment counts towards its peer's load until the fetcher reports it
 * no longer fetches that chunk; this bounds how long one that never reports
 * again (its agent died) counts.
 */
const INFLIGHT_TTL_MS = 60_000;
/** A wave nobody exchanged with for this long is forgotten. */
const WAVE_IDLE_MS = 10 * 60_000;
const RETRY_AFTER_MS = 150;
/**
 * Chunks with holders looked at per exchange, at most: each costs a pass
 * over the members. When that many are all at busy holders, the agent asks
 * again shortly rather than have the tracker scan the whole image.
 */
const MAX_CHUNKS_LOOKED_AT = 256;
const NO_CHUNKS = new Uint8Array(0);
/** A lease whose agent has not exchanged for this long is handed out again: agents exchange every 2 s while they fetch. */
const LEASE_SILENCE_MS = 10_000;

/** An agent of a wave, as the tracker knows it. */
interface Member {
  nodeUuid: string;
  address: string;
  certificatePem: string;
  rack: string;
  zone: string;
  /** Bit i set: holds chunk i, verified. */
  held: Uint8Array;
  heldCount: number;
  /** Whether `held` is in the wave's holder counts: members dropped, gone quiet or left are not. */
  counted: boolean;
  seenAt: number;
  /** Chunks this member fetches now from a peer, as assigned: chunk → the first peer named, and when. */
  inflight: Map<number, { peer: string; at: number }>;
  errors: number;
  bytesFromPeers: number;
  bytesFromController: number;
}

/** The agents deploying one image (by content) at the same time through this controller. */
interface Wave {
  key: string;
  credential: string;
  chunkCount: number;
  members: Map<string, Member>;
  /** Holders per chunk among the counted members. */
  holders: HolderCounts;
  /** Chunk → the agent reading it from the controller now, and until when that holds. */
  leases: Map<number, { nodeUuid: string; until: number }>;
  /** Peers dropped for this wave: they served a wrong chunk, stalled or failed too often. */
  dropped: Set<string>;
  touchedAt: number;
}

/** The exchange as the tracker sees it, after the gRPC edge has authenticated and checked it. */
export interface ExchangeInput {
  nodeUuid: string;
  address: string;
  certificatePem: string;
  properties: Record<string, string>;
  /** Identifies the wave: image name and content. */
  waveKey: string;
  chunkCount: number;
  held: Uint8Array;
  fetching: Uint8Array;
  maxAssignments: number;
  failures: PeerFailure[];
  bytesFromPeers: number;
  bytesFromController: number;
}

export interface ExchangeOutput {
  credential: string;
  assignments: ChunkAssignment[];
  retryAfterMs: number;
}

/** What the tracker reports for metrics: byte deltas by source and failures by kind. */
export interface TrackerEvents {
  bytes(source: 'peer' | 'controller', bytes: number): void;
  peerFailure(kind: string): void;
  peerDropped(): void;
}

export function bit(bitmap: Uint8Array, index: number): boolean {
  return ((bitmap[index >> 3] ?? 0) & (1 << (index & 7))) !== 0;
}

function popcount(bitmap: Uint8Array, count: number): number {
  let n = 0;
  for (let i = 0; i < count; i++) if (bit(bitmap, i)) n++;
  return n;
}

/**
 * The controller as tracker: it learns from each agent's exchange which
 * chunks it holds, and answers with chunks to fetch — rarest first, each
 * from peers that hold it and serve fewer reads than they accept (same
 * rack, then same zone, then least loaded), or from the controller when no
 * live peer holds it and no other agent is reading it from the controller
 * already (a lease), so that the controller sends each chunk about once per
 * wave, a few chunks at a time (controllerStreams) so that each spreads
 * while the next is sent. All in memory: a controller that
 * restarts starts new waves, and agents re-report what they hold at their
 * next exchange.
 */
export class FanoutTracker {
  private readonly waves = new Map<string, Wave>();

  constructor(
    readonly policy: FanoutPolicy,
    private readonly events: TrackerEvents,
    private readonly logger: Logger,
    private readonly now: () => number = Date.now,
  ) {}

  exchange(input: ExchangeInput): ExchangeOutput {
    const now = this.now();
    this.forgetIdleWaves(now);
    const wave = this.wave(input.waveKey, input.chunkCount, now);
    const member = this.member(wave, input, now);

    for (const failure of input.failures) this.peerFailed(wave, input.nodeUuid, failure);

    // Leases end when their agent holds the chunk or no longer fetches it, when they time out, or
    // when their agent has not exchanged for a while (it does every 2 s while it fetches): it died.
    for (const [chunk, lease] of wave.leases) {
      const holder = wave.members.get(lease.nodeUuid);
      if (lease.until <= now || !holder || now - holder.seenAt > LEASE_SILENCE_MS) wave.leases.delete(chunk);
      else if (lease.nodeUuid === input.nodeUuid && !bit(input.fetching, chunk)) wave.leases.delete(chunk);
    }
    // Likewise this agent's fetches from peers: the ones it no longer reports as fetching have ended.
    for (const [chunk, fetch] of member.inflight) {
      if (!bit(input.fetching, chunk) || now - fetch.at > INFLIGHT_TTL_MS) member.inflight.delete(chunk);
    }

    // Members gone quiet leave the counts until they exchange again.
    for (const m of wave.members.values()) {
      if (m.counted && now - m.seenAt >= this.policy.memberTtlMs) this.uncount(wave, m);
    }
    const live = [...wave.members.values()].filter((m) => m.nodeUuid !== member.nodeUuid && m.counted && m.heldCount > 0);
    const load = this.uploads(wave, now);
    // The controller sends a few chunks at a time, each to one agent, so that each is whole
    // early and spreads among the peers while the next ones are sent. Leasing every chunk at
    // once would split the controller's link between all of them: none would be whole, and
    // none could spread, until the whole image had been sent.
    let leasesLeft = Math.max(0, this.policy.controllerStreams - wave.leases.size);
    // Spread the streams over the wave's agents: one agent's own link would otherwise carry them all.
    // The counted members are exactly those neither dropped nor gone quiet (this one included).
    let members = 0;
    for (const m of wave.members.values()) if (m.counted) members++;
    let ownLeasesLeft = Math.max(0, Math.ceil(this.policy.controllerStreams / members) - leasesOf(wave, member.nodeUuid));
    const assignments: ChunkAssignment[] = [];
    let lookedAt = 0;
    // Rarest first: the chunks few agents hold spread before the common ones; a chunk nobody holds is the rarest.
    for (const chunk of wave.holders.rarestFirst((c) => !bit(input.held, c) && !bit(input.fetching, c))) {
      if (assignments.length >= input.maxAssignments || lookedAt >= MAX_CHUNKS_LOOKED_AT) break;
      const holders = wave.holders.count(chunk) > 0 ? live.filter((m) => bit(m.held, chunk)) : [];
      if (holders.length === 0) {
        const lease = wave.leases.get(chunk);
        if (lease && lease.nodeUuid !== member.nodeUuid) continue; // someone brings it from the controller: wait for them
        if (leasesLeft === 0 || ownLeasesLeft === 0) continue; // the controller's streams are taken: wait for a peer to hold it
        leasesLeft--;
        ownLeasesLeft--;
        wave.leases.set(chunk, { nodeUuid: member.nodeUuid, until: now + this.policy.controllerLeaseMs });
        assignments.push({ chunk, peers: [] });
        continue;
      }
      lookedAt++;
      // Holders serving as many reads as they accept would answer RESOURCE_EXHAUSTED: another chunk, or later.
      const ranked = holders
        .filter((m) => (load.get(m.nodeUuid) ?? 0) < this.policy.maxUploads)
        .map((m) => {
          const locality = (member.rack !== '' && m.rack === member.rack ? 2 : 0) + (member.zone !== '' && m.zone === member.zone ? 1 : 0);
          return { m, locality, load: load.get(m.nodeUuid) ?? 0, tie: Math.random() };
        })
        .sort((a, b) => b.locality - a.locality || a.load - b.load || a.tie - b.tie)
        .slice(0, this.policy.maxPeers)
        .map((r) => r.m);
      const first = ranked[0];
      if (!first) continue;
      load.set(first.nodeUuid, (load.get(first.nodeUuid) ?? 0) + 1);
      member.inflight.set(chunk, { peer: first.nodeUuid, at: now });
      assignments.push({ chunk, peers: ranked.map(toPeer) });
    }
    return { credential: wave.credential, assignments, retryAfterMs: assignments.length === 0 ? RETRY_AFTER_MS : 0 };
  }

  /** Reads each member serves now, as far as the tracker knows: the fetches it named the member first for that have not ended. */
  private uploads(wave: Wave, now: number): Map<string, number> {
    const load = new Map<string, number>();
    for (const m of wave.members.values()) {
      for (const fetch of m.inflight.values()) {
        if (now - fetch.at <= INFLIGHT_TTL_MS) load.set(fetch.peer, (load.get(fetch.peer) ?? 0) + 1);
      }
    }
    return load;
  }

  /**
   * The node's agent stops serving its wave (the conductor says so: its write
   * failed, or its next command follows at once). It is named no more, and
   * what it was reading from the controller is handed out again.
   */
  leave(nodeUuid: string): void {
    for (const wave of this.waves.values()) {
      const member = wave.members.get(nodeUuid);
      if (!member) continue;
      this.uncount(wave, member);
      wave.members.delete(nodeUuid);
      releaseLeases(wave, nodeUuid);
    }
  }

  /** For tests and `node show`: what a wave looks like now. */
  snapshot(waveKey: string): { members: number; dropped: string[]; leases: number } | undefined {
    const wave = this.waves.get(waveKey);
    if (!wave) return undefined;
    return { members: wave.members.size, dropped: [...wave.dropped], leases: wave.leases.size };
  }

  private wave(key: string, chunkCount: number, now: number): Wave {
    let wave = this.waves.get(key);
    if (!wave || wave.chunkCount !== chunkCount) {
      wave = {
        key,
        credential: randomBytes(32).toString('base64url'),
        chunkCount,
        members: new Map(),
        holders: new HolderCounts(chunkCount),
        leases: new Map(),
        dropped: new Set(),
        touchedAt: now,
      };
      this.waves.set(key, wave);
      this.logger.info({ wave: key, chunks: chunkCount }, 'fan-out wave started');
    }
    wave.touchedAt = now;
    return wave;
  }

  private member(wave: Wave, input: ExchangeInput, now: number): Member {
    let member = wave.members.get(input.nodeUuid);
    if (!member) {
      member = {
        nodeUuid: input.nodeUuid,
        address: '',
        certificatePem: '',
        rack: '',
        zone: '',
        held: new Uint8Array(0),
        heldCount: 0,
        counted: false,
        seenAt: now,
        inflight: new Map(),
        errors: 0,
        bytesFromPeers: 0,
        bytesFromController: 0,
      };
      wave.members.set(input.nodeUuid, member);
    }
    member.address = input.address;
    member.certificatePem = input.certificatePem;
    member.rack = input.properties.rack ?? '';
    member.zone = input.properties.zone ?? '';
    if (!wave.dropped.has(member.nodeUuid)) {
      wave.holders.change(member.counted ? member.held : NO_CHUNKS, input.held);
      member.counted = true;
    }
    member.held = input.held;
    member.heldCount = popcount(input.held, wave.chunkCount);
    member.seenAt = now;
    // Byte counts are cumulative per deploy; a restarted agent starts again from 0.
    const fromPeers = input.bytesFromPeers - member.bytesFromPeers;
    const fromController = input.bytesFromController - member.bytesFromController;
    if (fromPeers > 0) this.events.bytes('peer', fromPeers);
    if (fromController > 0) this.events.bytes('controller', fromController);
    member.bytesFromPeers = input.bytesFromPeers;
    member.bytesFromController = input.bytesFromController;
    return member;
  }

  private peerFailed(wave: Wave, reporter: string, failure: PeerFailure): void {
    const kind = PeerFailureKind[failure.kind]?.replace('PEER_FAILURE_KIND_', '').toLowerCase() ?? 'unspecified';
    this.events.peerFailure(kind);
    const peer = wave.members.get(failure.nodeUuid);
    if (!peer || wave.dropped.has(failure.nodeUuid)) return;
    peer.errors++;
    const drop =
      failure.kind === PeerFailureKind.PEER_FAILURE_KIND_CORRUPT ||
      failure.kind === PeerFailureKind.PEER_FAILURE_KIND_STALLED ||
      failure.kind === PeerFailureKind.PEER_FAILURE_KIND_GONE ||
      peer.errors >= MAX_PEER_ERRORS;
    this.logger.warn(
      { wave: wave.key, peer: failure.nodeUuid, reporter, chunk: failure.chunk, kind, reason: failure.reason.slice(0, 300), dropped: drop },
      drop ? 'peer dropped from the fan-out wave' : 'a peer failed to serve a chunk',
    );
    if (drop) {
      this.uncount(wave, peer);
      wave.dropped.add(failure.nodeUuid);
      this.events.peerDropped();
      // What it was reading from the controller is handed out again rather than waited for.
      releaseLeases(wave, failure.nodeUuid);
    }
  }

  /** Takes a member's chunks out of the holder counts (dropped, gone quiet, left); its next exchange puts them back unless dropped. */
  private uncount(wave: Wave, member: Member): void {
    if (!member.counted) return;
    wave.holders.change(member.held, NO_CHUNKS);
    member.counted = false;
  }

  private forgetIdleWaves(now: number): void {
    for (const [key, wave] of this.waves) if (now - wave.touchedAt > WAVE_IDLE_MS) this.waves.delete(key);
  }
}

function releaseLeases(wave: Wave, nodeUuid: string): void {
  for (const [chunk, lease] of wave.leases) if (lease.nodeUuid === nodeUuid) wave.leases.delete(chunk);
}

function leasesOf(wave: Wave, nodeUuid: string): number {
  let n = 0;
  for (const lease of wave.leases.values()) if (lease.nodeUuid === nodeUuid) n++;
  return n;
}

function toPeer(m: Member): ChunkPeer {
  return { nodeUuid: m.nodeUuid, address: m.address, certificatePem: m.certificatePem };
}
