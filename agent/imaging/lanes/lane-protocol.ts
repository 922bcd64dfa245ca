import type { KeepaliveOptions } from '../../../common/grpc-options.js';
import type { FetchRange } from './receive-range.js';

/*
 * What the agent's thread (fetch-lanes.ts) and a lane worker (lane-worker.ts)
 * say to each other. Plain data only: it crosses a MessagePort.
 */

/** How a lane reaches the controller on its own connection: what the agent's ControllerLink uses, as data. */
export interface LaneEndpoint {
  address: string;
  /** PEM CA bundle for TLS; undefined: plaintext (--insecure). */
  caPem: string | undefined;
  keepalive: KeepaliveOptions;
}

/** A lane's start-up data (workerData). */
export interface LaneSetup {
  endpoint: LaneEndpoint;
  /** Names the lane's thread and its connection (each lane its own HTTP/2 connection). */
  lane: number;
  image: string;
  devicePath: string;
  chunkSize: number;
  sizeBytes: number;
  /** The root-checked manifest's chunk digests, 32 bytes each. */
  digests: Uint8Array;
  stallTimeoutMs: number;
}

/** Agent thread → lane. */
export type ToLane =
  /** Fetch this range with this call metadata (the token of the moment). */
  | { type: 'fetch'; range: FetchRange; metadata: Record<string, string> }
  /** No more ranges: close the connection and the disk, then say 'closed'. */
  | { type: 'close' }
  /** Stop the call in flight at once (the deploy is cancelled or failed), then close. */
  | { type: 'abort' };

/** Why a lane's range failed, rebuilt as the error the agent's own thread would have caught. */
export type LaneFailure =
  | { kind: 'grpc'; code: number; details: string; path: string }
  | { kind: 'stall'; message: string }
  | { kind: 'disk'; message: string; code: string | undefined }
  | { kind: 'other'; message: string };

/** Lane → agent thread. */
export type FromLane =
  /** Bytes of one message, queued for the disk. */
  | { type: 'received'; bytes: number }
  /** A chunk whose last byte arrived; `digest` (hex) only when it failed. */
  | { type: 'chunk'; index: number; ok: boolean; digest?: string }
  /** The range was received to its end and every write of it settled. */
  | { type: 'fetched' }
  | { type: 'failed'; failure: LaneFailure }
  | { type: 'closed' };
