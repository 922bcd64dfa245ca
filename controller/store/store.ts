import type { ChunkManifest } from '../../common/chunk-manifest.js';
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
  /**
   * The node's secrets (BMC passwords), by name (power.redfish.password),
   * each sealed by the controller's SecretBox (controller/secrets/): the
   * store keeps them opaque. Never returned by the API: only the names are.
   */
  secrets: Record<string, string>;
  agentAddress: string;
  agentVersion: string;
  agentStatus: string;
  /** sha256 of the current agent token, hex; null when no agent may talk for this node. */
  agentTokenHash: string | null;
  /**
   * The credential any controller presents when it calls this node's agent
   * (derived from the agent token, see common/agent-credentials.ts); null
   * whenever agentTokenHash is null.
   */
  agentApiToken: string | null;
  /**
   * PEM of the self-signed certificate the agent serves its API with, pinned
   * from the first heartbeat that carried one after a lookup; the controller
   * calls the agent only over TLS with exactly this certificate. Wiped with
   * the agent token, so that the next lookup lets a (restarted) agent pin anew.
   */
  agentCertificatePem: string | null;
  lastHeartbeatAt: EpochMs | null;
  /** Last evidence the agent is alive or since when it is awaited: the sweep's clock. */
  livenessAt: EpochMs | null;
  reservation: string | null;
  reservationOperation: string | null;
  /** JSON of the proto Inventory; null before inspection. */
  inventoryJson: string | null;
  /** JSON of the deploy spec; null when nothing is deployed. */
  deployJson: string | null;
  /**
   * JSON of the progress of the agent's running command in the node's
   * current step; null when no command of this step runs or reported yet.
   * Every provision state change clears it: an earlier step's progress is
   * history, never shown as the node's (issue 18 item 6).
   */
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
  /** Sealed secrets by name (see NodeRecord.secrets); none when left out. */
  secrets?: Record<string, string>;
}

/** A change of a node's properties and secrets, made in one write: sets first, then unsets. */
export interface NodeSettingsChange {
  setProperties: Record<string, string>;
  unsetProperties: readonly string[];
  /** Sealed values, by name. */
  setSecrets: Record<string, string>;
  unsetSecrets: readonly string[];
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
  /**
   * JSON of the progress of the agent's RUNNING command; '' when the agent
   * reports a command that is no longer running (clears the node's
   * progress); null when the heartbeat says nothing about a command (keeps
   * it). Stores write a progress only onto a node still in the step the
   * heartbeat was received in (an agent state entered at or before `time`),
   * so that a late flush cannot put one step's progress on the next.
   */
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
  /**
   * Fencing: the transition happens only while this holder has the node's
   * lock, so a controller that lost its lock (declared dead, taken over)
   * cannot write over the one that took the node.
   */
  holder?: string;
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
  /** The format of the file as uploaded or imported ('raw' for images stored before formats were recorded). */
  format: 'raw' | 'qcow2';
  /** sha256 and size of the file as uploaded or imported (the qcow2 itself); '' and 0 until it arrived, or when not recorded. */
  sourceSha256: string;
  sourceSizeBytes: number;
  /** Bytes of the raw image that hold data (the sum of its extents); null when not recorded. */
  allocatedBytes: number | null;
  /** How many allocated extents are recorded (0 when none are). */
  extentCount: number;
  createdAt: EpochMs;
  updatedAt: EpochMs;
}

/** What an upload or import reserves; the format fields are set when the content is committed. */
export type NewImage = Omit<
  ImageRecord,
  'createdAt' | 'updatedAt' | 'format' | 'sourceSha256' | 'sourceSizeBytes' | 'allocatedBytes' | 'extentCount'
>;

/** [offset, length] in bytes of a range of a raw image that holds data. */
export type ImageExtent = [number, number];

/** What updateImage may change. `extents` also sets allocatedBytes and extentCount. */
export type ImagePatch = Partial<
  Pick<ImageRecord, 'state' | 'sha256' | 'sizeBytes' | 'error' | 'format' | 'sourceSha256' | 'sourceSizeBytes'>
> & {
  extents?: ImageExtent[];
};

/**
 * The config drive of a node's deployment: the ISO 9660 image the agent
 * writes into a partition at the end of the disk, gzip-compressed. It holds
 * the user data, which may carry secrets: kept from the deploy request until
 * the node is cleaned, and served only to the node's own agent.
 */
export interface ConfigDriveRecord {
  nodeUuid: string;
  /** gzip of the ISO image. */
  gzip: Buffer;
  /** sha256 (hex) and size of the ISO image itself. */
  sha256: string;
  sizeBytes: number;
  createdAt: EpochMs;
}

/** A controller registered in the database (one row per live process). */
export interface ControllerRecord {
  id: string;
  /** host:port other controllers reach its gRPC API at. */
  address: string;
  startedAt: EpochMs;
  lastSeenAt: EpochMs;
}

/** What an operator token may do: a reader reads, an admin also changes state. */
export type OperatorRole = 'admin' | 'reader';

/** An operator API token (controller/auth/operator-auth.ts); the token itself is never stored, only its hash. */
export interface OperatorTokenRecord {
  /** Public id, safe to show and log: `tok_` and 8 hex digits. */
  id: string;
  /** sha256 of the token, lower-case hex. */
  tokenHash: string;
  role: OperatorRole;
  description: string;
  createdAt: EpochMs;
  /** Last time a controller accepted it, to within a minute or so; null when never used. */
  lastUsedAt: EpochMs | null;
}

/**
 * A half-open range [from, to) of ring hashes (unsigned 32-bit, see
 * controller/cluster/hash-ring.ts); a controller owns the nodes whose
 * ring hash falls in one of its ranges. An empty list owns nothing; the
 * range [0, 2^32) owns everything.
 */
export interface HashRange {
  from: number;
  to: number;
}

/** What taking over a dead holder's nodes did. */
export interface TakeoverResult {
  /** Nodes whose reservation was cleared (including the failed ones); each gets a lock_released event. */
  released: number;
  /** Nodes left in an active (non-wait) state under the holder's lock, now failed with a reason. */
  failed: TimedOutNode[];
}

/** What the controller knows of a node's power (controller/power/sync.ts). */
export interface PowerStatusRecord {
  /** The last state seen by the power sync or set by a power action; '' when not known yet. */
  powerState: 'on' | 'off' | '';
  /** When the sync last read it, or an action set it; null never. */
  checkedAt: EpochMs | null;
  /** Reads of the power state that failed in a row (0 after a success). */
  failures: number;
  /** The last failure's message; '' after a success. */
  error: string;
}

/** Notification channels shared by every controller on one database. */
export type StoreChannel =
  /** payload: node uuid; a node's lock was released. */
  | 'lock_released'
  /** payload: node uuid; a heartbeat landed on a controller that does not own the node, which is due for a step. */
  | 'node_due'
  /** payload: controller id; a controller joined or left. */
  | 'membership'
  /** payload: image name; an image became ready (other controllers fetch its content). */
  | 'image_ready'
  /** payload: JSON {from, node, deleted}; a controller changed a node (for other controllers' watchers). */
  | 'node_changed';

/**
 * What the conductor needs to act on a heartbeat: whether the node waits for
 * its agent, and whether the agent's token is still the node's.
 */
export interface NodeHeartbeatView {
  uuid: string;
  provisionState: ProvisionState;
  maintenance: boolean;
  agentTokenHash: string | null;
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
  /**
   * The heartbeat views of those of these nodes (by uuid) that exist, in any
   * order: one narrow read for a batch of heartbeats (see Conductor).
   */
  getHeartbeatViews(uuids: readonly string[]): Promise<NodeHeartbeatView[]>;
  /** The nodes owning any of these MACs (normally zero or one). */
  findNodesByMacs(macs: readonly string[]): Promise<NodeRecord[]>;
  listNodes(query: ListNodesQuery): Promise<NodeRecord[]>;
  deleteNode(uuid: string): Promise<boolean>;
  addPort(uuid: string, mac: string, event: NewNodeEvent): Promise<NodeRecord>;
  removePort(uuid: string, mac: string, event: NewNodeEvent): Promise<NodeRecord>;
  setMaintenance(uuid: string, enabled: boolean, reason: string, event: NewNodeEvent): Promise<NodeRecord | undefined>;
  /**
   * Changes properties and secrets in one transaction with its event;
   * unsetting a name that is not set is no error. Undefined when the node is gone.
   */
  updateNodeSettings(uuid: string, change: NodeSettingsChange, event: NewNodeEvent): Promise<NodeRecord | undefined>;
  /** Compare-and-set on the provision state; undefined when the node was not in `from`. */
  transition(uuid: string, transition: Transition): Promise<NodeRecord | undefined>;
  /** Stores a new agent token hash and the matching API credential, and forgets the pinned agent certificate; also resets the liveness clock. */
  setAgentToken(uuid: string, tokenHash: string | null, apiToken: string | null): Promise<void>;
  /**
   * Pins the agent's certificate (compare-and-set): stored only if none is
   * pinned and the node's agent token hash is still `tokenHash`. 'pinned'
   * when stored now, 'same' when this very PEM was pinned already,
   * 'different' when another one is, 'stale' when the token is no longer
   * the node's (or the node is gone).
   */
  pinAgentCertificate(uuid: string, tokenHash: string, pem: string): Promise<'pinned' | 'same' | 'different' | 'stale'>;
  /** Writes a batch of heartbeats in one transaction; returns the uuids that no longer exist. */
  recordHeartbeats(batch: readonly HeartbeatRecord[]): Promise<string[]>;
  /**
   * Fails every unreserved, non-maintenance node in a wait state whose
   * liveness clock is older than `cutoff`, in one statement, with an event.
   * With `ranges`, only nodes whose ring hash is in them (the caller's share).
   */
  sweepTimedOut(now: EpochMs, cutoff: EpochMs, timeoutMs: number, ranges?: readonly HashRange[]): Promise<TimedOutNode[]>;
  /**
   * Nodes in one of `states`, unreserved, not in maintenance, heard from at
   * or after `heardSince`, with a ring hash in `ranges`: the work a
   * controller owns and should act on. Oldest heartbeat first, at most `limit`.
   */
  listDueNodes(states: readonly ProvisionState[], heardSince: EpochMs, ranges: readonly HashRange[], limit: number): Promise<string[]>;
  countByProvisionState(): Promise<Map<ProvisionState, number>>;
  /** The power status of these nodes; a node without one is absent from the map. */
  getPowerStatuses(uuids: readonly string[]): Promise<Map<string, PowerStatusRecord>>;
  /** Writes a node's power status (insert or replace); nothing when the node no longer exists. */
  savePowerStatus(uuid: string, status: PowerStatusRecord): Promise<void>;
  listEvents(uuid: string, afterId: number, limit: number): Promise<NodeEventRecord[]>;
  addEvent(uuid: string, event: NewNodeEvent): Promise<void>;
  /**
   * Takes the node's lock for `holder` if nobody holds it and nobody queues
   * for it (compare-and-set on the reservation column); false otherwise.
   */
  tryLock(uuid: string, holder: string, operation: string): Promise<boolean>;
  /**
   * Joins the node's queue of patient waiters (shared by every controller);
   * returns the ticket. Tickets are served in the order they were issued.
   */
  enqueueLockWaiter(uuid: string, holder: string, operation: string): Promise<number>;
  /**
   * Takes the lock for the ticket's holder if the lock is free and the ticket
   * is first in the node's queue; the ticket is used up when it succeeds.
   */
  tryLockWithTicket(uuid: string, ticket: number): Promise<boolean>;
  /** Leaves the queue (gave up, or aborted); a no-op for a used ticket. */
  dequeueLockWaiter(ticket: number): Promise<void>;
  /** Releases the lock if `holder` has it; false when it did not. */
  unlock(uuid: string, holder: string): Promise<boolean>;
  /**
   * Lets go of everything a holder that is gone left behind (a crashed
   * controller, or this one restarted), in one transaction: nodes it left in
   * an active (non-wait) state are failed with `reason`, its reservations
   * are cleared and its queued tickets removed.
   */
  releaseHolder(holder: string, reason: string, now: EpochMs): Promise<TakeoverResult>;
  /** Adds or refreshes this controller's row. */
  /**
   * The database's clock, in epoch milliseconds: the one clock every
   * controller sharing the database agrees on. Membership stamps and
   * compares controller rows with it, so that a controller whose own clock
   * is off does not look dead (or make the others look dead).
   */
  clock(): Promise<EpochMs>;
  registerController(id: string, address: string, now: EpochMs): Promise<void>;
  /** Touches this controller's row; false when the row is gone (others declared it dead). */
  touchController(id: string, now: EpochMs): Promise<boolean>;
  listControllers(): Promise<ControllerRecord[]>;
  /** Removes a controller's row only if it was last seen before `seenBefore`; true when removed. */
  removeController(id: string, seenBefore: EpochMs): Promise<boolean>;
  /** Tells every controller on this database (this one included) about something; best effort. */
  notify(channel: StoreChannel, payload: string): Promise<void>;
  /** Calls `handler` for each notification on `channel`; returns a function that stops it. */
  listen(channel: StoreChannel, handler: (payload: string) => void): () => void;
  /** Adds an image row; ALREADY_EXISTS when the name is taken. */
  createImage(image: NewImage): Promise<ImageRecord>;
  getImage(name: string): Promise<ImageRecord | undefined>;
  listImages(): Promise<ImageRecord[]>;
  /** Updates an image's state, content and format fields; undefined when it no longer exists. */
  updateImage(name: string, patch: ImagePatch): Promise<ImageRecord | undefined>;
  /** The allocated extents of an image's raw content, sorted; undefined when the image is unknown or none are recorded. */
  getImageExtents(name: string): Promise<ImageExtent[] | undefined>;
  /**
   * Stores the chunk manifest of an image's content, keyed by the content's
   * sha256 (images with the same content share it); a second put for the
   * same content replaces it.
   */
  putImageManifest(sha256: string, manifest: ChunkManifest): Promise<void>;
  /** The chunk manifest of the content with this sha256; undefined when none is stored (images stored before manifests). */
  getImageManifest(sha256: string): Promise<ChunkManifest | undefined>;
  /** Forgets the manifest of content no image uses any more; true when there was one. */
  deleteImageManifest(sha256: string): Promise<boolean>;
  /** Stores (or replaces) a node's config drive. */
  putConfigDrive(record: ConfigDriveRecord): Promise<void>;
  getConfigDrive(nodeUuid: string): Promise<ConfigDriveRecord | undefined>;
  /** True when there was one. */
  deleteConfigDrive(nodeUuid: string): Promise<boolean>;
  /**
   * Deletes an image row unless a node in deploying or deploy wait uses it
   * (FAILED_PRECONDITION naming the node). Returns whether other images
   * still share its content, so that the caller keeps the blob.
   */
  deleteImage(name: string): Promise<{ deleted: boolean; contentStillUsed: boolean }>;
  /** Adds an operator token; ALREADY_EXISTS when its id or hash is taken. */
  createOperatorToken(record: OperatorTokenRecord): Promise<void>;
  /**
   * Adds the token only if there is no operator token at all, atomically
   * (several controllers starting on one empty database make one); true when added.
   */
  createFirstOperatorToken(record: OperatorTokenRecord): Promise<boolean>;
  findOperatorTokenByHash(tokenHash: string): Promise<OperatorTokenRecord | undefined>;
  /** Oldest first. */
  listOperatorTokens(): Promise<OperatorTokenRecord[]>;
  /** True when a token with this id existed. */
  deleteOperatorToken(id: string): Promise<boolean>;
  /** Sets last_used_at (never backwards); best effort, callers throttle it. */
  touchOperatorToken(id: string, now: EpochMs): Promise<void>;
  /**
   * The cluster secret every controller on this database shares (for calls
   * between controllers): stores `candidate` if there is none yet and
   * returns the stored one, so that all agree whoever came first.
   */
  ensureClusterSecret(candidate: string): Promise<string>;
  close(): Promise<void>;
}

/**
 * The image a transition into deploying names (its deployJson), which `transition`
 * checks in its own transaction: a deploy and deleteImage are exclusive.
 * deleteImage refuses an image a deploying node names; the transition that
 * starts a deploy refuses an image that is gone, not ready, or whose content
 * changed since the deploy was checked. On PostgreSQL the image row is
 * locked (FOR SHARE against deleteImage's FOR UPDATE), so that of the two,
 * whichever comes second sees the other's outcome.
 */
export function deployImageOf(t: Pick<Transition, 'to' | 'deployJson'>): { name: string; sha256: string } | undefined {
  // Only the move into deploying starts a deploy (deleteImage looks at deploying and deploy_wait nodes).
  if (t.to !== 'deploying' || !t.deployJson) return undefined;
  const spec = JSON.parse(t.deployJson) as { image?: unknown; imageSha256?: unknown };
  if (typeof spec.image !== 'string' || spec.image === '') return undefined;
  return { name: spec.image, sha256: typeof spec.imageSha256 === 'string' ? spec.imageSha256 : '' };
}

/** Why a deploy cannot start on `image` as the transition found it (undefined: it can). */
export function deployImageProblem(
  wanted: { name: string; sha256: string },
  found: { state: string; sha256: string } | undefined,
): string | undefined {
  if (!found) return `image '${wanted.name}' was deleted while the deploy started; upload it again or deploy another image`;
  if (found.state !== 'ready') return `image '${wanted.name}' is ${found.state}, not ready`;
  if (wanted.sha256 !== '' && found.sha256 !== wanted.sha256) {
    return `image '${wanted.name}' was replaced while the deploy started; deploy again`;
  }
  return undefined;
}
