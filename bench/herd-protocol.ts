/** Messages between bench/herd.ts and its worker processes (bench/herd-worker.ts). */

/** What a worker reports about its agents, as event codes. */
export const EVENT = {
  /** A Lookup call goes out. */
  lookupAttempt: 0,
  /** A Lookup call answered with a node and token. */
  lookupOk: 1,
  /** A Lookup call failed (the agent backs off and retries). */
  lookupFailed: 2,
  /** A heartbeat stream is opened: a connect or reconnect attempt. */
  streamAttempt: 3,
  /** The first ack arrived on a stream: the agent is connected. */
  streamEstablished: 4,
  /** A stream that had been established ended (the controller went away, say). */
  streamDropped: 5,
  /** A stream ended before its first ack: the attempt failed. */
  streamFailed: 6,
} as const;

/** [event code, agent index, Date.now() in the worker]. */
export type HerdEvent = [code: number, agent: number, time: number];

export interface WorkerSetup {
  type: 'setup';
  controller: string;
  /** The agents this worker runs: global index and the one MAC each looks itself up by. */
  agents: { index: number; mac: string }[];
  /** HTTP/2 connections the worker's agents spread over. */
  groups: number;
  jitter: boolean;
  reconnectDelayMs: number;
  lookupBackoffStartMs: number;
  lookupBackoffMaxMs: number;
  lookupBudgetMs: number;
  callTimeoutMs: number;
  keepaliveTimeMs: number;
  keepaliveTimeoutMs: number;
  minHeartbeatGapMs: number;
  /** The worker exits by itself after this long, whatever happens to the parent. */
  maxLifetimeMs: number;
}

export type ParentMessage = WorkerSetup | { type: 'go' } | { type: 'stop' };

export type WorkerMessage =
  | { type: 'ready' }
  | { type: 'events'; events: HerdEvent[] }
  | { type: 'agent-failed'; index: number; message: string }
  | { type: 'stopped' };
