import type { CallContext, ServerMiddleware, ServerMiddlewareCall } from 'nice-grpc';
import { ServerError, Status } from 'nice-grpc-common';
import { NODE_UUID_KEY } from '../../common/agent-metadata.js';
import { MetalcastError, resourceExhausted } from '../../common/errors.js';
import { UUID_PATTERN } from '../../common/input.js';
import type { Logger } from '../../common/logging.js';
import type { ControllerMetrics, RATE_LIMIT_KINDS } from '../observability/metrics.js';

/**
 * Per-client limits on what a stranger can try for free: lookups (guessing
 * MACs), agent calls with a bad token, and operator calls with a bad token.
 * Each key (a peer's host without the port, since one machine opens many
 * connections; a node uuid; an operator client's IPv4 address or IPv6 /64)
 * gets a token bucket; a call over the limit is answered RESOURCE_EXHAUSTED
 * with a retry hint (trailer retry-after-ms; the agent backs off and tries
 * again), counted in metalcast_rate_limited_total, and logged at most once
 * a minute per key. Failed credential checks are what is limited, never a
 * valid credential (docs/hardening-controller.md).
 */

/** A token bucket's shape: `perMinute` tokens a minute, at most `burst` saved up. perMinute 0 turns the limit off. */
export interface RateLimit {
  perMinute: number;
  burst: number;
}

/** Peers remembered at most; the least recently seen are forgotten first (a forgotten peer starts with a full bucket). */
const DEFAULT_MAX_PEERS = 65_536;
const LOG_INTERVAL_MS = 60_000;
/** Log lines per limiter per minute at most, whatever the number of peers (a spray from many addresses). */
const LOG_LINES_PER_MINUTE = 10;

/** One peer's bucket, and what the throttled log line needs. */
export interface Bucket {
  tokens: number;
  at: number;
  /** Calls refused since the last log line about this peer. */
  refused: number;
  loggedAt: number;
}

/** A token bucket per key, in a bounded map. */
export class PeerRateLimiter {
  private readonly buckets = new Map<string, Bucket>();
  private readonly maxPeers: number;
  private readonly now: () => number;

  constructor(
    readonly limit: RateLimit,
    options: { maxPeers?: number; now?: () => number } = {},
  ) {
    this.maxPeers = options.maxPeers ?? DEFAULT_MAX_PEERS;
    this.now = options.now ?? Date.now;
  }

  get enabled(): boolean {
    return this.limit.perMinute > 0;
  }

  /** Peers tracked now (tests, and a bound that must hold). */
  get size(): number {
    return this.buckets.size;
  }

  /** Milliseconds until `peer` has a token (0: it has one now), without taking it. */
  wait(peer: string): number {
    if (!this.enabled) return 0;
    // A peer never charged has a full bucket: checking it (every agent call) remembers nothing.
    const bucket = this.buckets.has(peer) ? this.bucket(peer) : undefined;
    if (!bucket) return this.limit.burst >= 1 ? 0 : Math.ceil(60_000 / this.limit.perMinute);
    return bucket.tokens >= 1 ? 0 : Math.ceil(((1 - bucket.tokens) * 60_000) / this.limit.perMinute);
  }

  /** Takes a token: 0 when there was one, else the milliseconds until there is (and nothing is taken). */
  take(peer: string): number {
    if (!this.enabled) return 0;
    const wait = this.wait(peer);
    if (wait === 0) this.bucket(peer).tokens -= 1;
    return wait;
  }

  /** Takes a token if there is one (failures are charged after the fact, so the bucket may run dry but not below 0). */
  charge(peer: string): void {
    if (!this.enabled) return;
    const bucket = this.bucket(peer);
    bucket.tokens = Math.max(0, bucket.tokens - 1);
  }

  /** The bucket of `peer`, refilled up to now and moved to the most recently used end. */
  bucketOf(peer: string): Bucket {
    return this.bucket(peer);
  }

  private bucket(peer: string): Bucket {
    const now = this.now();
    let bucket = this.buckets.get(peer);
    if (bucket) {
      this.buckets.delete(peer);
      bucket.tokens = Math.min(this.limit.burst, bucket.tokens + ((now - bucket.at) * this.limit.perMinute) / 60_000);
      bucket.at = now;
    } else {
      bucket = { tokens: this.limit.burst, at: now, refused: 0, loggedAt: Number.NEGATIVE_INFINITY };
    }
    this.buckets.set(peer, bucket);
    while (this.buckets.size > this.maxPeers) {
      const oldest = this.buckets.keys().next().value as string;
      this.buckets.delete(oldest);
    }
    return bucket;
  }
}

/** The host of a gRPC peer ("10.0.0.7:51234", "::1:51234", "::ffff:10.0.0.7:51234"), without the port. */
export function peerHost(peer: string): string {
  let host = peer;
  const colon = peer.lastIndexOf(':');
  if (colon > 0 && /^\d+$/.test(peer.slice(colon + 1))) host = peer.slice(0, colon);
  if (host.startsWith('[') && host.endsWith(']')) host = host.slice(1, -1);
  if (/^::ffff:\d+\.\d+\.\d+\.\d+$/i.test(host)) host = host.slice('::ffff:'.length);
  return host;
}

/**
 * The key a client's authentication failures are counted under: an IPv4
 * address as it is, an IPv6 address by its /64 (one host or one site is
 * given a whole /64, so counting per address would let it rotate through
 * 2^64 of them).
 */
export function clientKey(peer: string): string {
  const host = peerHost(peer);
  if (!host.includes(':')) return host;
  const groups = expandIpv6(host);
  return groups ? `${groups.slice(0, 4).join(':')}::/64` : host;
}

/** The eight 16-bit groups of an IPv6 address (without a zone), as lower-case hex without leading zeros; undefined when it is not one. */
function expandIpv6(address: string): string[] | undefined {
  let text = address.split('%')[0] as string;
  // An embedded IPv4 tail (::ffff:1.2.3.4 already became 1.2.3.4 in peerHost).
  const v4 = /(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(text);
  if (v4) {
    const [a, b, c, d] = v4.slice(1).map(Number) as [number, number, number, number];
    text = `${text.slice(0, v4.index)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const halves = text.split('::');
  if (halves.length > 2) return undefined;
  const head = halves[0] === '' ? [] : (halves[0] as string).split(':');
  const tail = halves.length === 2 && halves[1] !== '' ? (halves[1] as string).split(':') : [];
  const missing = 8 - head.length - tail.length;
  if (halves.length === 1 ? missing !== 0 : missing < 1) return undefined;
  const groups = [...head, ...Array<string>(halves.length === 2 ? missing : 0).fill('0'), ...tail];
  if (!groups.every((group) => /^[0-9a-f]{1,4}$/i.test(group))) return undefined;
  return groups.map((group) => Number.parseInt(group, 16).toString(16));
}

export type RateLimitKind = (typeof RATE_LIMIT_KINDS)[number];

const WHAT: Record<RateLimitKind, string> = {
  lookup: 'lookups',
  agent_auth: 'failed agent token checks',
  agent_auth_node: 'failed agent token checks',
  operator_auth: 'failed operator authentications',
};

/** How a key reads in messages: "from 10.0.0.7", "for node 1b4e…". */
const SUBJECT: Record<RateLimitKind, (key: string) => string> = {
  lookup: (key) => `from ${key}`,
  agent_auth: (key) => `from ${key}`,
  agent_auth_node: (key) => `for node ${key}`,
  operator_auth: (key) => `from ${key}`,
};

/** One limiter with its metric and its (throttled) log line. */
export class PeerLimit {
  readonly limiter: PeerRateLimiter;
  private logBudget = LOG_LINES_PER_MINUTE;
  private logBudgetAt = Number.NEGATIVE_INFINITY;
  private suppressedLines = 0;

  constructor(
    readonly kind: RateLimitKind,
    limit: RateLimit,
    private readonly metrics: Pick<ControllerMetrics, 'rateLimited'>,
    private readonly logger: Logger,
    options: { maxPeers?: number; now?: () => number } = {},
  ) {
    this.limiter = new PeerRateLimiter(limit, options);
    this.now = options.now ?? Date.now;
  }

  private readonly now: () => number;

  /** Takes a token for a call from `peer`, or throws RESOURCE_EXHAUSTED. */
  take(peer: string, context?: CallContext): void {
    const wait = this.limiter.take(peer);
    if (wait > 0) this.refuse(peer, wait, context);
  }

  /** Throws RESOURCE_EXHAUSTED when `peer` has no token left, without taking one. */
  check(peer: string, context?: CallContext): void {
    const wait = this.limiter.wait(peer);
    if (wait > 0) this.refuse(peer, wait, context);
  }

  /** Charges a failure of `peer` after the fact. */
  charge(peer: string): void {
    this.limiter.charge(peer);
  }

  private refuse(peer: string, waitMs: number, context: CallContext | undefined): never {
    const seconds = Math.max(1, Math.ceil(waitMs / 1000));
    this.metrics.rateLimited.inc({ kind: this.kind });
    context?.trailer.set('retry-after-ms', String(seconds * 1000));
    const bucket = this.limiter.bucketOf(peer);
    bucket.refused++;
    const now = this.now();
    if (now - bucket.loggedAt >= LOG_INTERVAL_MS && this.mayLog(now)) {
      const { perMinute, burst } = this.limiter.limit;
      this.logger.warn(
        {
          peer,
          kind: this.kind,
          refused: bucket.refused,
          limitPerMinute: perMinute,
          burst,
          ...(this.suppressedLines > 0 ? { otherPeersNotLogged: this.suppressedLines } : {}),
        },
        `too many ${WHAT[this.kind]} ${SUBJECT[this.kind](peer)}; refusing them (logged at most once a minute per peer)`,
      );
      bucket.refused = 0;
      bucket.loggedAt = now;
      this.suppressedLines = 0;
    }
    throw resourceExhausted(`too many ${WHAT[this.kind]} ${SUBJECT[this.kind](peer)}; retry in ${seconds}s`);
  }

  private mayLog(now: number): boolean {
    if (now - this.logBudgetAt >= LOG_INTERVAL_MS) {
      this.logBudget = LOG_LINES_PER_MINUTE;
      this.logBudgetAt = now;
    }
    if (this.logBudget <= 0) {
      this.suppressedLines++;
      return false;
    }
    this.logBudget--;
    return true;
  }
}

const GATEWAY = '/metalcast.v1.AgentGatewayService/';
const LOOKUP = `${GATEWAY}Lookup`;

/** Whether a handler's error is an UNAUTHENTICATED answer (a ServerError or a MetalcastError). */
export function isUnauthenticated(error: unknown): boolean {
  return (
    (error instanceof ServerError && error.code === Status.UNAUTHENTICATED) ||
    (error instanceof MetalcastError && error.status === Status.UNAUTHENTICATED)
  );
}

/**
 * After a failed credential check: RESOURCE_EXHAUSTED when any of the
 * caller's keys is out of tokens (the check does not count then: a guesser
 * that keeps guessing stays refused), else each key is charged and the
 * UNAUTHENTICATED answer stands. Only failures reach here, so a valid
 * credential is never refused because someone else at the same address
 * (a NAT, a shared jump host) or for the same node guessed wrong.
 */
export function chargeFailure(charges: ReadonlyArray<readonly [PeerLimit, string]>, context: CallContext, error: unknown): never {
  for (const [limit, key] of charges) limit.check(key, context);
  for (const [limit, key] of charges) limit.charge(key);
  throw error;
}

/**
 * The agent gateway's limits and token check, as a server middleware (other
 * services pass through). Every Lookup takes a token of the peer's `lookup`
 * bucket. Every other agent call (Heartbeat, StatImage, ReadImage,
 * GetConfigDrive) has its node uuid and token checked here, before its
 * request is decoded or validated, so that a malformed call without a valid
 * token is UNAUTHENTICATED and counted like any other guess. A failed check
 * is charged to the peer's address (`agentAuth`) and to the node uuid it
 * claims (`agentAuthByNode`, so that a guesser spread over many addresses
 * is refused too); while either is out of tokens, failed checks are
 * answered RESOURCE_EXHAUSTED. A call whose token is valid always goes on.
 * The handlers find the checked node in the context (authenticateAgent).
 */
export function agentGatewayRateLimits(
  limits: { lookup: PeerLimit; agentAuth: PeerLimit; agentAuthByNode: PeerLimit },
  authenticate: (context: CallContext) => Promise<CallContext>,
): ServerMiddleware {
  return async function* rateLimits<Request, Response>(call: ServerMiddlewareCall<Request, Response>, context: CallContext) {
    const path = call.method.path;
    if (!path.startsWith(GATEWAY)) return yield* call.next(call.request, context);
    const peer = peerHost(context.peer);
    if (path === LOOKUP) {
      limits.lookup.take(peer, context);
      return yield* call.next(call.request, context);
    }
    let authenticated: CallContext;
    try {
      authenticated = await authenticate(context);
    } catch (error) {
      if (!isUnauthenticated(error)) throw error;
      const charges: [PeerLimit, string][] = [[limits.agentAuth, peer]];
      const nodeUuid = context.metadata.get(NODE_UUID_KEY) ?? '';
      if (UUID_PATTERN.test(nodeUuid)) charges.push([limits.agentAuthByNode, nodeUuid]);
      chargeFailure(charges, context, error);
    }
    return yield* call.next(call.request, authenticated);
  };
}
