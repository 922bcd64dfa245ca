import type { CallContext, ServerMiddleware, ServerMiddlewareCall } from 'nice-grpc';
import { ServerError, Status } from 'nice-grpc-common';
import { MetalcastError, resourceExhausted } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type { ControllerMetrics } from '../observability/metrics.js';

/**
 * Per-peer limits on what a stranger on the provisioning network can try
 * for free: lookups (guessing MACs) and agent calls with a bad token. Each
 * peer address (the host, without the port: one machine opens many
 * connections) gets a token bucket; a call over the limit is answered
 * RESOURCE_EXHAUSTED with a retry hint (the agent backs off and tries
 * again), counted in metalcast_rate_limited_total, and logged at most once a
 * minute per peer.
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

export type RateLimitKind = 'lookup' | 'agent_auth';

const WHAT: Record<RateLimitKind, string> = { lookup: 'lookups', agent_auth: 'failed agent token checks' };

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
        `too many ${WHAT[this.kind]} from ${peer}; refusing them (logged at most once a minute per peer)`,
      );
      bucket.refused = 0;
      bucket.loggedAt = now;
      this.suppressedLines = 0;
    }
    throw resourceExhausted(`too many ${WHAT[this.kind]} from ${peer}; retry in ${seconds}s`);
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

function isUnauthenticated(error: unknown): boolean {
  return (
    (error instanceof ServerError && error.code === Status.UNAUTHENTICATED) ||
    (error instanceof MetalcastError && error.status === Status.UNAUTHENTICATED)
  );
}

/** Passes a generator through, telling `onYield` about each message. */
async function* observe<T, R>(inner: AsyncGenerator<T, R, undefined>, onYield: () => void): AsyncGenerator<T, R, undefined> {
  let finished = false;
  try {
    for (;;) {
      const step = await inner.next();
      if (step.done) {
        finished = true;
        return step.value;
      }
      onYield();
      yield step.value;
    }
  } finally {
    if (!finished) await inner.return(undefined as R);
  }
}

/**
 * The agent gateway's limits, as a server middleware (other services pass
 * through): every Lookup takes a token of the peer's `lookup` bucket. The
 * other agent calls (Heartbeat, StatImage, ReadImage) are refused while the
 * peer's `agent_auth` bucket is empty, and a call that fails UNAUTHENTICATED
 * before answering anything (the token check of services/agent-auth.ts:
 * missing, unknown or wrong token) takes a token from it. Good agents fail a
 * token check about once per token change, so only strangers run it dry.
 */
export function agentGatewayRateLimits(limits: { lookup: PeerLimit; agentAuth: PeerLimit }): ServerMiddleware {
  return async function* rateLimits<Request, Response>(call: ServerMiddlewareCall<Request, Response>, context: CallContext) {
    const path = call.method.path;
    if (!path.startsWith(GATEWAY)) return yield* call.next(call.request, context);
    const peer = peerHost(context.peer);
    if (path === LOOKUP) {
      limits.lookup.take(peer, context);
      return yield* call.next(call.request, context);
    }
    limits.agentAuth.check(peer, context);
    let answered = false;
    try {
      const inner = call.next(call.request, context) as AsyncGenerator<Response, Response | undefined, undefined>;
      return yield* observe(inner, () => {
        answered = true;
      });
    } catch (error) {
      if (!answered && isUnauthenticated(error)) limits.agentAuth.charge(peer);
      throw error;
    }
  };
}
