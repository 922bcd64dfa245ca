import type { ProvisionState } from '../provisioning/states.js';

/** Milliseconds since the epoch; every time in the store is one of these. */
export type EpochMs = number;

/** A node as the controller sees it (the proto Node is made from this at the edge). */
export interface NodeRecord {
  uuid: string;
  name: string;
  provisionState: ProvisionState;
  targetProvisionState: ProvisionState | null;
  maintenance: boolean;
  maintenanceReason: string;
  lastError: string;
  macAddresses: string[];
  properties: Record<string, string>;
  agentAddress: string;
  agentVersion: string;
  agentStatus: string;
  /** sha256 of the current agent token, hex; null when no agent may talk for this node. */
  agentTokenHash: string | null;
  lastHeartbeatAt: EpochMs | null;
  /** Last evidence the agent is alive or since when it is awaited: the sweep's clock. */
  livenessAt: EpochMs | null;
  reservation: string | null;
  reservationOperation: string | null;
  /** JSON of the proto Inventory; null before inspection. */
  inventoryJson: string | null;
  /** JSON of the deploy spec; null when nothing is deployed. */
  deployJson: string | null;
  /** JSON of the agent's latest command progress. */
  progressJson: string | null;
  createdAt: EpochMs;
  updatedAt: EpochMs;
  provisionUpdatedAt: EpochMs;
}

export interface NodeEventRecord {
  id: number;
  nodeUuid: string;
  time: EpochMs;
  kind: string;
  message: string;
  actor: string;
  fromState: ProvisionState | null;
  toState: ProvisionState | null;
}

export type NewNodeEvent = Omit<NodeEventRecord, 'id' | 'nodeUuid' | 'time'>;

export interface NewNode {
  name: string;
  macAddresses: string[];
  properties: Record<string, string>;
}

export interface ListNodesQuery {
  provisionState?: ProvisionState;
  maintenance?: boolean;
  /** Return nodes whose name sorts after this (pagination). */
  afterName?: string;
  limit: number;
}

/** One agent heartbeat, as batched by the recorder. */
export interface HeartbeatRecord {
  nodeUuid: string;
  time: EpochMs;
  agentAddress: string;
  agentVersion: string;
  agentStatus: string;
  progressJson: string | null;
}

/** A node the sweep failed. */
export interface TimedOutNode {
  uuid: string;
  name: string;
  fromState: ProvisionState;
  toState: ProvisionState;
  lastError: string;
}

/** A compare-and-set transition of a node's provision state. */
export interface Transition {
  /** The transition happens only if the node is in one of these states. */
  from: readonly ProvisionState[];
  to: ProvisionState;
  target: ProvisionState | null;
  /** Sets last_error; undefined leaves it, '' clears it. */
  lastError?: string;
  /** Whether the agent token survives; false wipes it. */
  keepAgentToken: boolean;
  /** Other columns to change in the same write. */
  deployJson?: string | null;
  inventoryJson?: string | null;
  event: NewNodeEvent;
}

export type ImageState = 'importing' | 'ready' | 'failed';

/** An image's metadata; its bytes live in the image store, addressed by sha256. */
export interface ImageRecord {
  name: string;
  state: ImageState;
  /** Lower-case hex; '' until an import has finished. */
  sha256: string;
  sizeBytes: number;
  /** For imports: where it came from, and the checksum the operator gave ("sha256:…" or "sha512:…"). */
  sourceUrl: string;
  expectedChecksum: string;
  error: string;
  createdAt: EpochMs;
  updatedAt: EpochMs;
}

/**
 * The node database. Two implementations (SQLite now, PostgreSQL later)
 * pass one contract suite, test/controller/store-contract.ts.
 *
 * Conflicts surface as MetalcastError with ALREADY_EXISTS (name, MAC) or
 * NOT_FOUND; lost compare-and-sets return false or undefined rather than
 * throwing, because the caller decides what they mean.
 */
export interface Store {
  createNode(node: NewNode, event: NewNodeEvent): Promise<NodeRecord>;
  /** By uuid or by name. */
  getNode(uuidOrName: string): Promise<NodeRecord | undefined>;
  /** The nodes owning any of these MACs (normally zero or one). */
  findNodesByMacs(macs: readonly string[]): Promise<NodeRecord[]>;
  listNodes(query: ListNodesQuery): Promise<NodeRecord[]>;
  deleteNode(uuid: string): Promise<boolean>;
  addPort(uuid: string, mac: string, event: NewNodeEvent): Promise<NodeRecord>;
  removePort(uuid: string, mac: string, event: NewNodeEvent): Promise<NodeRecord>;
  setMaintenance(uuid: string, enabled: boolean, reason: string, event: NewNodeEvent): Promise<NodeRecord | undefined>;
  /** Compare-and-set on the provision state; undefined when the node was not in `from`. */
  transition(uuid: string, transition: Transition): Promise<NodeRecord | undefined>;
  /** Stores a new agent token hash; also resets the liveness clock. */
  setAgentToken(uuid: string, tokenHash: string | null): Promise<void>;
  /** Writes a batch of heartbeats in one transaction; returns the uuids that no longer exist. */
  recordHeartbeats(batch: readonly HeartbeatRecord[]): Promise<string[]>;
  /**
   * Fails every unreserved, non-maintenance node in a wait state whose
   * liveness clock is older than `cutoff`, in one statement, with an event.
   */
  sweepTimedOut(now: EpochMs, cutoff: EpochMs, timeoutMs: number): Promise<TimedOutNode[]>;
  countByProvisionState(): Promise<Map<ProvisionState, number>>;
  listEvents(uuid: string, afterId: number, limit: number): Promise<NodeEventRecord[]>;
  addEvent(uuid: string, event: NewNodeEvent): Promise<void>;
  /**
   * Takes the node's lock for `holder` if nobody holds it (compare-and-set on
   * the reservation column); false when it is held.
   */
  tryLock(uuid: string, holder: string, operation: string): Promise<boolean>;
  /** Releases the lock if `holder` has it; false when it did not. */
  unlock(uuid: string, holder: string): Promise<boolean>;
  /** Clears every reservation a holder left behind (a restarted controller). */
  clearReservations(holder: string): Promise<number>;
  /** Adds an image row; ALREADY_EXISTS when the name is taken. */
  createImage(image: Omit<ImageRecord, 'createdAt' | 'updatedAt'>): Promise<ImageRecord>;
  getImage(name: string): Promise<ImageRecord | undefined>;
  listImages(): Promise<ImageRecord[]>;
  /** Updates state, sha256, size and error of an image; undefined when it no longer exists. */
  updateImage(
    name: string,
    patch: Partial<Pick<ImageRecord, 'state' | 'sha256' | 'sizeBytes' | 'error'>>,
  ): Promise<ImageRecord | undefined>;
  /**
   * Deletes an image row unless a node in deploying or deploy wait uses it
   * (FAILED_PRECONDITION naming the node). Returns whether other images
   * still share its content, so that the caller keeps the blob.
   */
  deleteImage(name: string): Promise<{ deleted: boolean; contentStillUsed: boolean }>;
  close(): Promise<void>;
}
