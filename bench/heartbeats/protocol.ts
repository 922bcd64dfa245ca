/** Messages between bench/heartbeats/heartbeats.ts and its worker processes (bench/heartbeats/worker.ts). */

export interface HeartbeatsWorkerSetup {
  type: 'setup';
  /** host:port of the controller's gRPC API. */
  controller: string;
  /** [node uuid, agent token] of each agent this worker runs. */
  agents: [uuid: string, token: string][];
  /** HTTP/2 connections this worker's agents spread over (agent i uses connection i % channels). */
  channels: number;
  /** An ack that has not arrived this long after its heartbeat counts as an error; the stream is reopened. */
  ackTimeoutMs: number;
  /** Delay before a failed stream is reopened, multiplied by U(1, 2). */
  reconnectDelayMs: number;
  keepaliveTimeMs: number;
  keepaliveTimeoutMs: number;
  /** The worker exits by itself after this long, whatever happens to the parent. */
  maxLifetimeMs: number;
}

/**
 * - go: every agent opens its stream at once and sends its first heartbeat.
 * - speed: agents wait next_interval_ms / speedup between heartbeats from now on.
 * - window-start / window-end: count and time acks between the two; the worker answers window-end with a 'window'.
 */
export type HeartbeatsParentMessage =
  | HeartbeatsWorkerSetup
  | { type: 'go'; speedup: number }
  | { type: 'speed'; speedup: number }
  | { type: 'window-start'; id: number }
  | { type: 'window-end'; id: number }
  | { type: 'stop' };

/** What a worker saw during one measurement window. */
export interface WindowStats {
  id: number;
  /** Heartbeats acknowledged in the window. */
  acks: number;
  /** Latency histogram of those acks (see LATENCY_BUCKETS), counts per bucket. */
  histogram: number[];
  /** Exact largest latency, ms. */
  maxMs: number;
  /** Streams that ended with an error, by gRPC status code (and 'ack-timeout'). */
  errors: Record<string, number>;
  /** Heartbeats sent and still unanswered at the end of the window for longer than 1 s. */
  lateAcks: number;
  /** Agents with an established stream at the end of the window. */
  connected: number;
  /** The worker's own event-loop delay in the window (ms): its share of the measured latency. */
  loopP99Ms: number;
  loopMaxMs: number;
}

export interface ProgressReport {
  /** Agents whose current stream has been acknowledged at least once. */
  connected: number;
  /** Agents that have been connected at least once. */
  everConnected: number;
  /** Date.now() of the latest first ack of an agent's first stream; 0 before any. */
  lastFirstAckAt: number;
  /** Connect latency (go -> first ack) of every agent connected so far, histogram as LATENCY_BUCKETS. */
  connectHistogram: number[];
  /** Errors since the start, by code. */
  errors: Record<string, number>;
}

export type HeartbeatsWorkerMessage =
  | { type: 'ready' }
  | ({ type: 'progress' } & ProgressReport)
  | ({ type: 'window' } & WindowStats)
  | { type: 'stopped' };

/**
 * Log-spaced latency buckets: bucket i holds latencies up to LATENCY_MIN_MS x
 * LATENCY_GROWTH^i, so quantiles are exact to within 2 %; from 10 µs to over
 * 10 minutes, and everything above in the last bucket.
 */
export const LATENCY_MIN_MS = 0.01;
export const LATENCY_GROWTH = 1.02;
export const LATENCY_BUCKETS = 920;

export function latencyBucket(ms: number): number {
  if (ms <= LATENCY_MIN_MS) return 0;
  return Math.min(LATENCY_BUCKETS - 1, Math.ceil(Math.log(ms / LATENCY_MIN_MS) / Math.log(LATENCY_GROWTH)));
}

/** The upper bound of a bucket, ms. */
export function bucketUpperMs(bucket: number): number {
  return LATENCY_MIN_MS * LATENCY_GROWTH ** bucket;
}

/** The q-quantile of a histogram (upper bound of the bucket it falls in), NaN when empty. */
export function histogramQuantile(histogram: readonly number[], q: number): number {
  const total = histogram.reduce((a, b) => a + b, 0);
  if (total === 0) return Number.NaN;
  const rank = Math.max(1, Math.ceil(q * total));
  let seen = 0;
  for (let i = 0; i < histogram.length; i++) {
    seen += histogram[i]!;
    if (seen >= rank) return bucketUpperMs(i);
  }
  return bucketUpperMs(histogram.length - 1);
}

export function mergeHistograms(histograms: readonly (readonly number[])[]): number[] {
  const merged = new Array<number>(LATENCY_BUCKETS).fill(0);
  for (const h of histograms) for (let i = 0; i < h.length; i++) merged[i]! += h[i]!;
  return merged;
}
