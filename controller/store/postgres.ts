import { createHash, randomUUID } from 'node:crypto';
import { Status } from 'nice-grpc-common';
import { Client, type ClientConfig, DatabaseError, escapeIdentifier, Pool, type PoolClient, TypeOverrides, types } from 'pg';
import type { ChunkManifest } from '../../common/chunk-manifest.js';
import { MetalcastError } from '../../common/errors.js';
import { ringHash } from '../cluster/hash-ring.js';
import {
  ACTIVE_STATE_FAILURES,
  type ActiveState,
  AGENT_STATES,
  isWaitState,
  PROVISION_STATES,
  type ProvisionState,
  WAIT_STATE_FAILURES,
  WAIT_STATES,
} from '../provisioning/states.js';
import { POSTGRES_MIGRATIONS } from './postgres-migrations.js';
import { applySettings } from './settings.js';
import type {
  PowerStatusRecord,
  ConfigDriveRecord,
  ControllerRecord,
  EpochMs,
  HashRange,
  HeartbeatRecord,
  ImageExtent,
  ImagePatch,
  ImageRecord,
  ImageState,
  NewImage,
  ListNodesQuery,
  NewNode,
  NewNodeEvent,
  NodeEventRecord,
  NodeHeartbeatView,
  NodeRecord,
  NodeSettingsChange,
  OperatorRole,
  OperatorTokenRecord,
  Store,
  StoreChannel,
  TakeoverResult,
  TimedOutNode,
  Transition,
} from './store.js';
import { powerStatusFromRow } from './power-rows.js';
import { deployImageOf, deployImageProblem } from './store.js';

/** The part of a pino logger the store uses; pass `logger.child({ component: 'store' })`. */
export interface StoreLogger {
  info(bindings: object, message: string): void;
  warn(bindings: object, message: string): void;
  error(bindings: object, message: string): void;
}

export interface PostgresStoreOptions {
  /** Where reconnects and lost notifications are reported. Default: silent. */
  logger?: StoreLogger;
  /** Connections in the pool, besides the one that listens for notifications. Default: 20 (--database-pool-size). */
  poolSize?: number;
  /**
   * The longest a query waits for a free connection of the pool (or for a
   * new one to connect); then it fails UNAVAILABLE, saying that the pool was
   * full. Default: 10 s (--database-pool-wait).
   */
  poolWaitMs?: number;
}

/** Default pool size: a connect storm of 1,000 agents on one controller gets in with it (docs/hardening-controller.md). */
export const DEFAULT_POOL_SIZE = 20;
const DEFAULT_POOL_WAIT_MS = 10_000;

const SILENT: StoreLogger = { info() {}, warn() {}, error() {} };

/** First key of the advisory lock that serialises migrations (the second is the schema's hash): "mcst". */
const MIGRATION_LOCK = 0x6d637374;

/** Multiranges (ring hash ranges in one parameter) arrived in PostgreSQL 14. */
const MIN_SERVER_VERSION = 140000;

const CONNECT_TIMEOUT_MS = 10_000;

/** A node row with its MACs, as NODE_COLUMNS selects it. */
interface NodeRow {
  uuid: string;
  name: string;
  provision_state: ProvisionState;
  target_provision_state: ProvisionState | null;
  maintenance: boolean;
  maintenance_reason: string;
  last_error: string;
  properties: string;
  secrets: string;
  agent_address: string;
  agent_version: string;
  agent_status: string;
  agent_token_hash: string | null;
  agent_api_token: string | null;
  agent_certificate: string | null;
  last_heartbeat_at: number | null;
  liveness_at: number | null;
  reservation: string | null;
  reservation_operation: string | null;
  inventory: string | null;
  deploy: string | null;
  progress: string | null;
  created_at: number;
  updated_at: number;
  provision_updated_at: number;
  mac_addresses: string[];
}

interface ImageRow {
  name: string;
  state: ImageState;
  sha256: string;
  size_bytes: number;
  source_url: string;
  expected_checksum: string;
  error: string;
  format: ImageRecord['format'];
  source_sha256: string;
  source_size_bytes: number;
  allocated_bytes: number | null;
  extent_count: number;
  created_at: number;
  updated_at: number;
}

/** Every image column but the (possibly large) extents, which only getImageExtents reads. */
const IMAGE_COLUMNS =
  'name, state, sha256, size_bytes, source_url, expected_checksum, error, format, source_size_bytes, source_sha256, allocated_bytes, extent_count, created_at, updated_at';

const NODE_COLUMNS = 'n.*, ARRAY(SELECT p.mac_address FROM ports p WHERE p.node_uuid = n.uuid ORDER BY p.mac_address) AS mac_addresses';

type Queryable = Pool | PoolClient;

/**
 * The shared store for several controllers: PostgreSQL through a pg.Pool,
 * plus one dedicated connection that LISTENs for notifications. The schema
 * is the first one on the connection's search_path, which a URL selects
 * with `?options=-c%20search_path%3Dmy_schema`; it is created if missing.
 *
 * Writes that touch several rows or tables run in one transaction; the
 * compare-and-sets are single UPDATEs whose WHERE PostgreSQL re-checks on
 * the latest row version, so two controllers never both win one.
 */
export class PostgresStore implements Store {
  private closed = false;

  private constructor(
    private readonly pool: Pool,
    /** The schema the tables live in. */
    readonly schema: string,
    private readonly listener: NotificationListener,
    private readonly logger: StoreLogger,
  ) {}

  /**
   * Connects to `url` (postgres:// or postgresql://), creates the schema if
   * needed and migrates it. Errors say what to fix, with the password masked.
   */
  static async open(url: string, options: PostgresStoreOptions = {}): Promise<PostgresStore> {
    const logger = options.logger ?? SILENT;
    const masked = maskPassword(url);
    assertPostgresUrl(url, masked);
    const connection: ClientConfig = {
      connectionString: url,
      types: int8AsNumber(),
      connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
      // The listening connection is idle for hours: TCP keepalive is what notices a server that vanished without a word.
      keepAlive: true,
    };
    const poolSize = options.poolSize ?? DEFAULT_POOL_SIZE;
    const poolWaitMs = options.poolWaitMs ?? DEFAULT_POOL_WAIT_MS;
    // pg-pool's connectionTimeoutMillis bounds both the wait for a free connection and the connect of a new one.
    const pool = new Pool({ ...connection, connectionTimeoutMillis: poolWaitMs, max: poolSize, application_name: 'metalcast' });
    // Without a listener, a connection that breaks while idle in the pool would crash the process.
    pool.on('error', (error) => logger.warn({ err: error }, 'an idle PostgreSQL connection broke; the pool will open another'));
    try {
      const schema = await prepareDatabase(pool, masked);
      // From here on, not at open: a server that cannot be reached at start is a configuration problem, explained above.
      unavailableWhenBusy(pool, { poolSize, poolWaitMs });
      const listener = new NotificationListener(
        () => new Client({ ...connection, application_name: `metalcast listen ${schema}`.slice(0, 63) }),
        logger,
      );
      return new PostgresStore(pool, schema, listener, logger);
    } catch (error) {
      await pool.end().catch(() => {});
      throw error;
    }
  }

  private withTransaction<T>(fn: (client: PoolClient) => Promise<T>): Promise<T> {
    return withTransaction(this.pool, fn);
  }

  async createNode(node: NewNode, event: NewNodeEvent): Promise<NodeRecord> {
    try {
      return await this.withTransaction(async (client) => {
        if ((await client.query('SELECT 1 FROM nodes WHERE name = $1', [node.name])).rowCount) throw nameTaken(node.name);
        await assertMacsFree(client, node.macAddresses);
        const uuid = randomUUID();
        const now = Date.now();
        await client.query(
          `INSERT INTO nodes (uuid, name, provision_state, properties, secrets, ring_hash, created_at, updated_at, provision_updated_at)
           VALUES ($1, $2, 'enroll', $3, $4, $5, $6, $6, $6)`,
          [uuid, node.name, JSON.stringify(node.properties), JSON.stringify(node.secrets ?? {}), ringHash(uuid), now],
        );
        await client.query('INSERT INTO ports (mac_address, node_uuid) SELECT unnest($1::text[]), $2', [node.macAddresses, uuid]);
        await insertEvent(client, uuid, event, now);
        return requireNode(client, uuid);
      });
    } catch (error) {
      throw await this.explainConflict(error, node.name);
    }
  }

  /**
   * The backstop for races the checks inside the transaction cannot see
   * (another controller inserting the same name or MAC at the same moment):
   * the unique violation becomes the error the check would have raised.
   */
  private async explainConflict(error: unknown, name: string): Promise<unknown> {
    if (!(error instanceof DatabaseError) || error.code !== '23505') return error;
    if (error.constraint === 'nodes_name_key') return nameTaken(name);
    const mac = /\(mac_address\)=\((.*)\)/.exec(error.detail ?? '')?.[1] ?? '';
    try {
      await assertMacsFree(this.pool, [mac]);
    } catch (explained) {
      return explained;
    }
    return new MetalcastError(Status.ALREADY_EXISTS, `MAC address ${mac} is listed more than once or was just taken`);
  }

  async getNode(uuidOrName: string): Promise<NodeRecord | undefined> {
    // A uuid match wins over a node that happens to be named like another's uuid.
    const { rows } = await this.pool.query<NodeRow>(
      `SELECT ${NODE_COLUMNS} FROM nodes n WHERE n.uuid = $1 OR n.name = $1 ORDER BY n.uuid = $1 DESC LIMIT 1`,
      [uuidOrName],
    );
    return rows[0] && toNodeRecord(rows[0]);
  }

  async getHeartbeatViews(uuids: readonly string[]): Promise<NodeHeartbeatView[]> {
    if (uuids.length === 0) return [];
    const { rows } = await this.pool.query<{
      uuid: string;
      provision_state: ProvisionState;
      maintenance: boolean;
      agent_token_hash: string | null;
    }>('SELECT uuid, provision_state, maintenance, agent_token_hash FROM nodes WHERE uuid = ANY($1::text[])', [uuids]);
    return rows.map((row) => ({
      uuid: row.uuid,
      provisionState: row.provision_state,
      maintenance: row.maintenance,
      agentTokenHash: row.agent_token_hash,
    }));
  }

  async findNodesByMacs(macs: readonly string[]): Promise<NodeRecord[]> {
    if (macs.length === 0) return [];
    const { rows } = await this.pool.query<NodeRow>(
      `SELECT ${NODE_COLUMNS} FROM nodes n
       WHERE n.uuid IN (SELECT node_uuid FROM ports WHERE mac_address = ANY($1::text[])) ORDER BY n.name`,
      [macs],
    );
    return rows.map(toNodeRecord);
  }

  async listNodes(query: ListNodesQuery): Promise<NodeRecord[]> {
    const p = new Params();
    const where: string[] = [];
    if (query.provisionState) where.push(`n.provision_state = ${p.add(query.provisionState)}`);
    if (query.maintenance !== undefined) where.push(`n.maintenance = ${p.add(query.maintenance)}`);
    if (query.afterName !== undefined) where.push(`n.name > ${p.add(query.afterName)}`);
    const { rows } = await this.pool.query<NodeRow>(
      `SELECT ${NODE_COLUMNS} FROM nodes n ${where.length ? `WHERE ${where.join(' AND ')}` : ''} ORDER BY n.name LIMIT ${p.add(query.limit)}`,
      p.values,
    );
    return rows.map(toNodeRecord);
  }

  async deleteNode(uuid: string): Promise<boolean> {
    return ((await this.pool.query('DELETE FROM nodes WHERE uuid = $1', [uuid])).rowCount ?? 0) > 0;
  }

  async addPort(uuid: string, mac: string, event: NewNodeEvent): Promise<NodeRecord> {
    try {
      return await this.withTransaction(async (client) => {
        await requireNode(client, uuid, { forUpdate: true });
        await assertMacsFree(client, [mac]);
        const now = Date.now();
        await client.query('INSERT INTO ports (mac_address, node_uuid) VALUES ($1, $2)', [mac, uuid]);
        await client.query('UPDATE nodes SET updated_at = $2 WHERE uuid = $1', [uuid, now]);
        await insertEvent(client, uuid, event, now);
        return requireNode(client, uuid);
      });
    } catch (error) {
      throw await this.explainConflict(error, '');
    }
  }

  async removePort(uuid: string, mac: string, event: NewNodeEvent): Promise<NodeRecord> {
    return this.withTransaction(async (client) => {
      // Locked, so that two removals cannot each see the other's port and leave the node with none.
      const node = await requireNode(client, uuid, { forUpdate: true });
      if (!node.macAddresses.includes(mac)) {
        throw new MetalcastError(Status.NOT_FOUND, `node '${node.name}' has no port with MAC address ${mac}`);
      }
      if (node.macAddresses.length === 1) {
        throw new MetalcastError(Status.FAILED_PRECONDITION, `${mac} is the last port of node '${node.name}'; a node needs at least one`);
      }
      const now = Date.now();
      await client.query('DELETE FROM ports WHERE mac_address = $1', [mac]);
      await client.query('UPDATE nodes SET updated_at = $2 WHERE uuid = $1', [uuid, now]);
      await insertEvent(client, uuid, event, now);
      return requireNode(client, uuid);
    });
  }

  async setMaintenance(uuid: string, enabled: boolean, reason: string, event: NewNodeEvent): Promise<NodeRecord | undefined> {
    return this.withTransaction(async (client) => {
      const now = Date.now();
      // Leaving maintenance restarts the liveness clock: the sweep skipped the
      // node meanwhile, and its agent deserves a full timeout from now.
      const { rowCount } = await client.query(
        `UPDATE nodes SET maintenance = $2, maintenance_reason = $3, updated_at = $4,
           liveness_at = CASE WHEN NOT $2 AND liveness_at IS NOT NULL THEN $4 ELSE liveness_at END
         WHERE uuid = $1`,
        [uuid, enabled, enabled ? reason : '', now],
      );
      if (!rowCount) return undefined;
      await insertEvent(client, uuid, event, now);
      return requireNode(client, uuid);
    });
  }

  async updateNodeSettings(uuid: string, change: NodeSettingsChange, event: NewNodeEvent): Promise<NodeRecord | undefined> {
    return this.withTransaction(async (client) => {
      const { rows } = await client.query<{ properties: string; secrets: string }>(
        'SELECT properties, secrets FROM nodes WHERE uuid = $1 FOR UPDATE',
        [uuid],
      );
      const row = rows[0];
      if (!row) return undefined;
      const properties = applySettings(JSON.parse(row.properties), change.setProperties, change.unsetProperties);
      const secrets = applySettings(JSON.parse(row.secrets), change.setSecrets, change.unsetSecrets);
      const now = Date.now();
      await client.query('UPDATE nodes SET properties = $2, secrets = $3, updated_at = $4 WHERE uuid = $1', [
        uuid,
        JSON.stringify(properties),
        JSON.stringify(secrets),
        now,
      ]);
      await insertEvent(client, uuid, event, now);
      return requireNode(client, uuid);
    });
  }

  async transition(uuid: string, t: Transition): Promise<NodeRecord | undefined> {
    return this.withTransaction(async (client) => {
      const image = deployImageOf(t);
      if (image) {
        // FOR SHARE against deleteImage's FOR UPDATE: whichever is second waits, then sees the other's outcome.
        const found = (
          await client.query<{ state: string; sha256: string }>('SELECT state, sha256 FROM images WHERE name = $1 FOR SHARE', [image.name])
        ).rows[0];
        const problem = deployImageProblem(image, found);
        if (problem) throw new MetalcastError(Status.FAILED_PRECONDITION, problem);
      }
      const now = Date.now();
      const p = new Params();
      const sets = [
        `provision_state = ${p.add(t.to)}`,
        `target_provision_state = ${p.add(t.target)}`,
        `updated_at = ${p.add(now)}`,
        `provision_updated_at = ${p.add(now)}`,
        // Entering a state that waits for an agent starts the sweep's clock.
        `liveness_at = ${p.add(isWaitState(t.to) ? now : null)}`,
        // The progress shown is the running step's: a new state starts without one.
        'progress = NULL',
      ];
      if (t.lastError !== undefined) sets.push(`last_error = ${p.add(t.lastError)}`);
      if (!t.keepAgentToken) sets.push('agent_token_hash = NULL', 'agent_api_token = NULL', 'agent_certificate = NULL');
      if (t.deployJson !== undefined) sets.push(`deploy = ${p.add(t.deployJson)}`);
      if (t.inventoryJson !== undefined) sets.push(`inventory = ${p.add(t.inventoryJson)}`);
      const where = [`uuid = ${p.add(uuid)}`, `provision_state = ANY(${p.add(t.from)}::text[])`];
      if (t.holder !== undefined) where.push(`reservation = ${p.add(t.holder)}`);
      const { rowCount } = await client.query(`UPDATE nodes SET ${sets.join(', ')} WHERE ${where.join(' AND ')}`, p.values);
      if (!rowCount) return undefined;
      await insertEvent(client, uuid, t.event, now);
      return requireNode(client, uuid);
    });
  }

  async setAgentToken(uuid: string, tokenHash: string | null, apiToken: string | null): Promise<void> {
    await this.pool.query(
      `UPDATE nodes SET agent_token_hash = $2, agent_api_token = $3, agent_certificate = NULL, updated_at = $4,
         liveness_at = CASE WHEN liveness_at IS NULL THEN NULL ELSE GREATEST(liveness_at, $4) END
       WHERE uuid = $1`,
      // The API credential is derived from the token: it never outlives it.
      [uuid, tokenHash, tokenHash === null ? null : apiToken, Date.now()],
    );
  }

  async pinAgentCertificate(uuid: string, tokenHash: string, pem: string): Promise<'pinned' | 'same' | 'different' | 'stale'> {
    // The WHERE is re-checked on the latest row version: of two controllers pinning at once, one wins.
    const pinned = await this.pool.query(
      'UPDATE nodes SET agent_certificate = $3 WHERE uuid = $1 AND agent_token_hash = $2 AND agent_certificate IS NULL',
      [uuid, tokenHash, pem],
    );
    if (pinned.rowCount === 1) return 'pinned';
    const { rows } = await this.pool.query<{ agent_token_hash: string | null; agent_certificate: string | null }>(
      'SELECT agent_token_hash, agent_certificate FROM nodes WHERE uuid = $1',
      [uuid],
    );
    const row = rows[0];
    if (row?.agent_token_hash !== tokenHash) return 'stale';
    return row.agent_certificate === pem ? 'same' : 'different';
  }

  async recordHeartbeats(batch: readonly HeartbeatRecord[]): Promise<string[]> {
    if (batch.length === 0) return [];
    // Several heartbeats of one node fold into what writing them in turn
    // would leave: the last one's fields, the last progress sent, the
    // latest time on the liveness clock. Then one UPDATE writes them all.
    const merged = new Map<string, HeartbeatRecord & { latest: EpochMs }>();
    for (const hb of batch) {
      const before = merged.get(hb.nodeUuid);
      merged.set(hb.nodeUuid, {
        ...hb,
        progressJson: hb.progressJson ?? before?.progressJson ?? null,
        latest: Math.max(hb.time, before?.latest ?? hb.time),
      });
    }
    const beats = [...merged.values()];
    const { rows } = await this.pool.query<{ uuid: string }>(
      `UPDATE nodes n SET last_heartbeat_at = b.time, agent_address = b.address, agent_version = b.version, agent_status = b.status,
         -- HeartbeatRecord.progressJson: null keeps, '' clears; a progress only onto the step it was received in.
         progress = CASE WHEN b.progress IS NULL THEN n.progress WHEN b.progress = '' THEN NULL
           WHEN n.provision_updated_at <= b.time AND n.provision_state = ANY($8::text[]) THEN b.progress
           ELSE n.progress END,
         liveness_at = CASE WHEN n.liveness_at IS NULL THEN NULL ELSE GREATEST(n.liveness_at, b.latest) END
       FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[])
         AS b (uuid, time, address, version, status, progress, latest)
       WHERE n.uuid = b.uuid
       RETURNING n.uuid`,
      [
        beats.map((b) => b.nodeUuid),
        beats.map((b) => b.time),
        beats.map((b) => b.agentAddress),
        beats.map((b) => b.agentVersion),
        beats.map((b) => b.agentStatus),
        beats.map((b) => b.progressJson),
        beats.map((b) => b.latest),
        AGENT_STATES,
      ],
    );
    const found = new Set(rows.map((r) => r.uuid));
    return beats.map((b) => b.nodeUuid).filter((uuid) => !found.has(uuid));
  }

  async sweepTimedOut(now: EpochMs, cutoff: EpochMs, timeoutMs: number, ranges?: readonly HashRange[]): Promise<TimedOutNode[]> {
    const cases = (pairs: [string, string][]) => pairs.map(([from, to]) => `WHEN '${from}' THEN '${to}'`).join(' ');
    const failures = Object.entries(WAIT_STATE_FAILURES);
    const params: unknown[] = [now, Math.round(timeoutMs / 1000), cutoff];
    if (ranges) params.push(multirange(ranges));
    // One statement: the index on (provision_state, liveness_at) makes it read
    // only the rows that timed out, however large the fleet; the events are
    // written by the same statement, so they cannot go missing.
    const { rows } = await this.pool.query<{
      uuid: string;
      name: string;
      from_state: ProvisionState;
      to_state: ProvisionState;
      last_error: string;
    }>(
      `WITH failed AS (
         UPDATE nodes SET
           provision_state = CASE provision_state ${cases(failures)} END,
           target_provision_state = NULL,
           agent_token_hash = NULL,
           agent_api_token = NULL,
           agent_certificate = NULL,
           last_error = CASE WHEN last_heartbeat_at IS NULL
             THEN 'no heartbeat from the agent since the node entered ' || replace(provision_state, '_', ' ') || ' ' || ($1::bigint - liveness_at) / 1000 || 's ago (timeout ' || $2::int || 's)'
             ELSE 'no heartbeat from the agent for ' || ($1::bigint - liveness_at) / 1000 || 's (timeout ' || $2::int || 's)' END,
           updated_at = $1, provision_updated_at = $1
         WHERE provision_state IN (${WAIT_STATES.map((s) => `'${s}'`).join(', ')}) AND liveness_at < $3
           AND reservation IS NULL AND NOT maintenance ${ranges ? 'AND ring_hash <@ $4::int8multirange' : ''}
         RETURNING uuid, name, last_error, provision_state AS to_state,
           CASE provision_state ${cases(failures.map(([wait, failed]) => [failed, wait]))} END AS from_state
       ), events AS (
         INSERT INTO node_events (node_uuid, time, kind, message, actor, from_state, to_state)
         SELECT uuid, $1, 'timeout', last_error, 'sweep', from_state, to_state FROM failed
       )
       SELECT * FROM failed`,
      params,
    );
    return rows.map((r) => ({ uuid: r.uuid, name: r.name, fromState: r.from_state, toState: r.to_state, lastError: r.last_error }));
  }

  async listDueNodes(
    states: readonly ProvisionState[],
    heardSince: EpochMs,
    ranges: readonly HashRange[],
    limit: number,
  ): Promise<string[]> {
    const { rows } = await this.pool.query<{ uuid: string }>(
      `SELECT uuid FROM nodes
       WHERE provision_state = ANY($1::text[]) AND reservation IS NULL AND NOT maintenance
         AND last_heartbeat_at >= $2 AND ring_hash <@ $3::int8multirange
       ORDER BY last_heartbeat_at LIMIT $4`,
      [states, heardSince, multirange(ranges), limit],
    );
    return rows.map((r) => r.uuid);
  }

  async countByProvisionState(): Promise<Map<ProvisionState, number>> {
    const { rows } = await this.pool.query<{ provision_state: ProvisionState; n: number }>(
      'SELECT provision_state, COUNT(*) AS n FROM nodes GROUP BY provision_state',
    );
    const counts = new Map<ProvisionState, number>(PROVISION_STATES.map((s) => [s, 0]));
    for (const row of rows) counts.set(row.provision_state, row.n);
    return counts;
  }

  async listEvents(uuid: string, afterId: number, limit: number): Promise<NodeEventRecord[]> {
    const { rows } = await this.pool.query<{
      id: number;
      node_uuid: string;
      time: number;
      kind: string;
      message: string;
      actor: string;
      from_state: ProvisionState | null;
      to_state: ProvisionState | null;
    }>('SELECT * FROM node_events WHERE node_uuid = $1 AND id > $2 ORDER BY id LIMIT $3', [uuid, afterId, limit]);
    return rows.map((r) => ({
      id: r.id,
      nodeUuid: r.node_uuid,
      time: r.time,
      kind: r.kind,
      message: r.message,
      actor: r.actor,
      fromState: r.from_state,
      toState: r.to_state,
    }));
  }

  async getPowerStatuses(uuids: readonly string[]): Promise<Map<string, PowerStatusRecord>> {
    const found = new Map<string, PowerStatusRecord>();
    if (uuids.length === 0) return found;
    const { rows } = await this.pool.query('SELECT * FROM node_power WHERE node_uuid = ANY($1::text[])', [[...uuids]]);
    for (const row of rows) found.set(row.node_uuid as string, powerStatusFromRow(row));
    return found;
  }

  async savePowerStatus(uuid: string, status: PowerStatusRecord): Promise<void> {
    await this.pool.query(
      `INSERT INTO node_power (node_uuid, power_state, checked_at, failures, error)
       SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM nodes WHERE uuid = $1)
       ON CONFLICT (node_uuid) DO UPDATE SET power_state = excluded.power_state, checked_at = excluded.checked_at,
         failures = excluded.failures, error = excluded.error`,
      [uuid, status.powerState, status.checkedAt, status.failures, status.error],
    );
  }

  async addEvent(uuid: string, event: NewNodeEvent): Promise<void> {
    await insertEvent(this.pool, uuid, event, Date.now());
  }

  async tryLock(uuid: string, holder: string, operation: string): Promise<boolean> {
    // Patient waiters queue first: a fast-failing tryLock must not jump the queue.
    const { rowCount } = await this.pool.query(
      `UPDATE nodes SET reservation = $2, reservation_operation = $3
       WHERE uuid = $1 AND reservation IS NULL AND NOT EXISTS (SELECT 1 FROM node_lock_waiters WHERE node_uuid = $1)`,
      [uuid, holder, operation],
    );
    return rowCount === 1;
  }

  async enqueueLockWaiter(uuid: string, holder: string, operation: string): Promise<number> {
    try {
      const { rows } = await this.pool.query<{ ticket: number }>(
        'INSERT INTO node_lock_waiters (node_uuid, holder, operation, created_at) VALUES ($1, $2, $3, $4) RETURNING ticket',
        [uuid, holder, operation, Date.now()],
      );
      return (rows[0] as { ticket: number }).ticket;
    } catch (error) {
      if (error instanceof DatabaseError && error.code === '23503')
        throw new MetalcastError(Status.NOT_FOUND, `node ${uuid} no longer exists`);
      throw error;
    }
  }

  async tryLockWithTicket(uuid: string, ticket: number): Promise<boolean> {
    return this.withTransaction(async (client) => {
      // The head of the queue, locked so that a concurrent dequeue of it waits for this transaction.
      const { rows } = await client.query<{ ticket: number; holder: string; operation: string }>(
        'SELECT ticket, holder, operation FROM node_lock_waiters WHERE node_uuid = $1 ORDER BY ticket LIMIT 1 FOR UPDATE',
        [uuid],
      );
      const head = rows[0];
      if (head?.ticket !== ticket) return false;
      const taken = await client.query(
        'UPDATE nodes SET reservation = $2, reservation_operation = $3 WHERE uuid = $1 AND reservation IS NULL',
        [uuid, head.holder, head.operation],
      );
      if (taken.rowCount !== 1) return false;
      await client.query('DELETE FROM node_lock_waiters WHERE ticket = $1', [ticket]);
      return true;
    });
  }

  async dequeueLockWaiter(ticket: number): Promise<void> {
    await this.pool.query('DELETE FROM node_lock_waiters WHERE ticket = $1', [ticket]);
  }

  async unlock(uuid: string, holder: string): Promise<boolean> {
    const { rowCount } = await this.pool.query(
      'UPDATE nodes SET reservation = NULL, reservation_operation = NULL WHERE uuid = $1 AND reservation = $2',
      [uuid, holder],
    );
    return rowCount === 1;
  }

  async releaseHolder(holder: string, reason: string, now: EpochMs): Promise<TakeoverResult> {
    return this.withTransaction(async (client) => {
      const { rows } = await client.query<{ uuid: string; name: string; provision_state: ActiveState }>(
        'SELECT uuid, name, provision_state FROM nodes WHERE reservation = $1 AND provision_state = ANY($2::text[]) ORDER BY name FOR UPDATE',
        [holder, Object.keys(ACTIVE_STATE_FAILURES)],
      );
      const failed: TimedOutNode[] = rows.map((r) => ({
        uuid: r.uuid,
        name: r.name,
        fromState: r.provision_state,
        toState: ACTIVE_STATE_FAILURES[r.provision_state],
        lastError: reason,
      }));
      if (failed.length > 0) {
        const uuids = failed.map((f) => f.uuid);
        const to = failed.map((f) => f.toState);
        await client.query(
          `UPDATE nodes n SET provision_state = f.to_state, target_provision_state = NULL, last_error = $3,
             agent_token_hash = NULL, agent_api_token = NULL, agent_certificate = NULL, liveness_at = NULL, updated_at = $4, provision_updated_at = $4
           FROM unnest($1::text[], $2::text[]) AS f (uuid, to_state) WHERE n.uuid = f.uuid`,
          [uuids, to, reason, now],
        );
        await client.query(
          `INSERT INTO node_events (node_uuid, time, kind, message, actor, from_state, to_state)
           SELECT f.uuid, $4, 'takeover', $5, 'takeover', f.from_state, f.to_state
           FROM unnest($1::text[], $2::text[], $3::text[]) AS f (uuid, from_state, to_state)`,
          [uuids, failed.map((f) => f.fromState), to, now, reason],
        );
      }
      // Every lock let go leaves a trace, so that a node's history shows where one controller's work ended.
      await client.query(
        // Locked first, as insertEvent does: the events of a node get their ids in commit order.
        `WITH held AS (SELECT uuid, name, reservation_operation FROM nodes WHERE reservation = $1 ORDER BY name FOR UPDATE)
         INSERT INTO node_events (node_uuid, time, kind, message, actor, from_state, to_state)
         SELECT uuid, $2, 'lock_released', format('lock of %s for %s released: %s', $1::text, COALESCE(reservation_operation, 'an operation'), $3::text),
           'takeover', NULL, NULL
         FROM held ORDER BY name`,
        [holder, now, reason],
      );
      const released = await client.query('UPDATE nodes SET reservation = NULL, reservation_operation = NULL WHERE reservation = $1', [
        holder,
      ]);
      await client.query('DELETE FROM node_lock_waiters WHERE holder = $1', [holder]);
      return { released: released.rowCount ?? 0, failed };
    });
  }

  async clock(): Promise<EpochMs> {
    const { rows } = await this.pool.query<{ now: number }>('SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now');
    return Number(rows[0]?.now);
  }

  async registerController(id: string, address: string, now: EpochMs): Promise<void> {
    await this.pool.query(
      `INSERT INTO controllers (id, address, started_at, last_seen_at) VALUES ($1, $2, $3, $3)
       ON CONFLICT (id) DO UPDATE SET address = EXCLUDED.address, started_at = EXCLUDED.started_at, last_seen_at = EXCLUDED.last_seen_at`,
      [id, address, now],
    );
  }

  async touchController(id: string, now: EpochMs): Promise<boolean> {
    return (await this.pool.query('UPDATE controllers SET last_seen_at = $2 WHERE id = $1', [id, now])).rowCount === 1;
  }

  async listControllers(): Promise<ControllerRecord[]> {
    const { rows } = await this.pool.query<{ id: string; address: string; started_at: number; last_seen_at: number }>(
      'SELECT * FROM controllers ORDER BY id',
    );
    return rows.map((r) => ({ id: r.id, address: r.address, startedAt: r.started_at, lastSeenAt: r.last_seen_at }));
  }

  async removeController(id: string, seenBefore: EpochMs): Promise<boolean> {
    return (await this.pool.query('DELETE FROM controllers WHERE id = $1 AND last_seen_at < $2', [id, seenBefore])).rowCount === 1;
  }

  async notify(channel: StoreChannel, payload: string): Promise<void> {
    try {
      // So that a listen() made before this notify() in this process hears it.
      await this.listener.settled();
      await this.pool.query('SELECT pg_notify($1, $2)', [this.channelName(channel), payload]);
    } catch (error) {
      this.logger.warn({ err: error, channel }, 'could not send a notification to the other controllers');
    }
  }

  listen(channel: StoreChannel, handler: (payload: string) => void): () => void {
    return this.listener.add(this.channelName(channel), handler);
  }

  /**
   * Settles once every listen() so far is in effect on the server (or has
   * failed and is being retried): for tests that notify from another store.
   */
  listening(): Promise<void> {
    return this.listener.settled();
  }

  /**
   * `metalcast_<schema>_<channel>`: every controller on one schema hears the
   * others, and other schemas on the same database hear nothing of them.
   * Channel names are identifiers, at most 63 bytes: long schema names are hashed.
   */
  private channelName(channel: StoreChannel): string {
    const name = `metalcast_${this.schema}_${channel}`;
    if (Buffer.byteLength(name) <= 63) return name;
    return `metalcast_${createHash('sha256').update(this.schema).digest('hex').slice(0, 16)}_${channel}`;
  }

  async createImage(image: NewImage): Promise<ImageRecord> {
    const taken = () => new MetalcastError(Status.ALREADY_EXISTS, `an image named '${image.name}' already exists`);
    try {
      return await this.withTransaction(async (client) => {
        if ((await client.query('SELECT 1 FROM images WHERE name = $1', [image.name])).rowCount) throw taken();
        const now = Date.now();
        const { rows } = await client.query<ImageRow>(
          `INSERT INTO images (name, state, sha256, size_bytes, source_url, expected_checksum, error, created_at, updated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) RETURNING ${IMAGE_COLUMNS}`,
          [image.name, image.state, image.sha256, image.sizeBytes, image.sourceUrl, image.expectedChecksum, image.error, now],
        );
        return toImageRecord(rows[0] as ImageRow);
      });
    } catch (error) {
      throw error instanceof DatabaseError && error.code === '23505' ? taken() : error;
    }
  }

  async getImage(name: string): Promise<ImageRecord | undefined> {
    const { rows } = await this.pool.query<ImageRow>(`SELECT ${IMAGE_COLUMNS} FROM images WHERE name = $1`, [name]);
    return rows[0] && toImageRecord(rows[0]);
  }

  async listImages(): Promise<ImageRecord[]> {
    return (await this.pool.query<ImageRow>(`SELECT ${IMAGE_COLUMNS} FROM images ORDER BY name`)).rows.map(toImageRecord);
  }

  async updateImage(name: string, patch: ImagePatch): Promise<ImageRecord | undefined> {
    const columns: Record<string, string> = {
      state: 'state',
      sha256: 'sha256',
      sizeBytes: 'size_bytes',
      error: 'error',
      format: 'format',
      sourceSha256: 'source_sha256',
      sourceSizeBytes: 'source_size_bytes',
    };
    const p = new Params();
    const sets = [`updated_at = ${p.add(Date.now())}`];
    for (const [key, value] of Object.entries(patch)) {
      if (value !== undefined && key !== 'extents') sets.push(`${columns[key]} = ${p.add(value)}`);
    }
    if (patch.extents) {
      sets.push(
        `extents = ${p.add(JSON.stringify(patch.extents))}`,
        `allocated_bytes = ${p.add(patch.extents.reduce((sum: number, [, length]: ImageExtent) => sum + length, 0))}`,
        `extent_count = ${p.add(patch.extents.length)}`,
      );
    }
    const { rows } = await this.pool.query<ImageRow>(
      `UPDATE images SET ${sets.join(', ')} WHERE name = ${p.add(name)} RETURNING ${IMAGE_COLUMNS}`,
      p.values,
    );
    return rows[0] && toImageRecord(rows[0]);
  }

  async getImageExtents(name: string): Promise<ImageExtent[] | undefined> {
    const { rows } = await this.pool.query<{ extents: string | null }>('SELECT extents FROM images WHERE name = $1', [name]);
    return rows[0]?.extents ? (JSON.parse(rows[0].extents) as ImageExtent[]) : undefined;
  }

  async putImageManifest(sha256: string, manifest: ChunkManifest): Promise<void> {
    await this.pool.query(
      `INSERT INTO image_manifests (sha256, size_bytes, chunk_size, chunk_count, root_sha256, digests, zero_bitmap, created_at)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
       ON CONFLICT (sha256) DO UPDATE SET size_bytes = excluded.size_bytes, chunk_size = excluded.chunk_size, chunk_count = excluded.chunk_count,
         root_sha256 = excluded.root_sha256, digests = excluded.digests, zero_bitmap = excluded.zero_bitmap, created_at = excluded.created_at`,
      [
        sha256,
        manifest.sizeBytes,
        manifest.chunkSize,
        manifest.digests.length / 32,
        manifest.rootSha256,
        manifest.digests,
        manifest.zeroBitmap,
        Date.now(),
      ],
    );
  }

  async getImageManifest(sha256: string): Promise<ChunkManifest | undefined> {
    const { rows } = await this.pool.query<{
      size_bytes: string | number;
      chunk_size: number;
      root_sha256: string;
      digests: Buffer;
      zero_bitmap: Buffer;
    }>('SELECT size_bytes, chunk_size, root_sha256, digests, zero_bitmap FROM image_manifests WHERE sha256 = $1', [sha256]);
    const row = rows[0];
    if (!row) return undefined;
    return {
      sizeBytes: Number(row.size_bytes),
      chunkSize: row.chunk_size,
      rootSha256: row.root_sha256,
      digests: row.digests,
      zeroBitmap: row.zero_bitmap,
    };
  }

  async deleteImageManifest(sha256: string): Promise<boolean> {
    return ((await this.pool.query('DELETE FROM image_manifests WHERE sha256 = $1', [sha256])).rowCount ?? 0) > 0;
  }

  async putConfigDrive(record: ConfigDriveRecord): Promise<void> {
    await this.pool.query(
      `INSERT INTO node_config_drives (node_uuid, gzip, sha256, size_bytes, created_at) VALUES ($1, $2, $3, $4, $5)
       ON CONFLICT (node_uuid) DO UPDATE SET gzip = excluded.gzip, sha256 = excluded.sha256, size_bytes = excluded.size_bytes, created_at = excluded.created_at`,
      [record.nodeUuid, record.gzip, record.sha256, record.sizeBytes, record.createdAt],
    );
  }

  async getConfigDrive(nodeUuid: string): Promise<ConfigDriveRecord | undefined> {
    const { rows } = await this.pool.query<{ node_uuid: string; gzip: Buffer; sha256: string; size_bytes: number; created_at: number }>(
      'SELECT * FROM node_config_drives WHERE node_uuid = $1',
      [nodeUuid],
    );
    const row = rows[0];
    if (!row) return undefined;
    return { nodeUuid: row.node_uuid, gzip: row.gzip, sha256: row.sha256, sizeBytes: row.size_bytes, createdAt: row.created_at };
  }

  async deleteConfigDrive(nodeUuid: string): Promise<boolean> {
    return ((await this.pool.query('DELETE FROM node_config_drives WHERE node_uuid = $1', [nodeUuid])).rowCount ?? 0) > 0;
  }

  async deleteImage(name: string): Promise<{ deleted: boolean; contentStillUsed: boolean }> {
    return this.withTransaction(async (client) => {
      const image = (await client.query<ImageRow>(`SELECT ${IMAGE_COLUMNS} FROM images WHERE name = $1 FOR UPDATE`, [name])).rows[0];
      if (!image) return { deleted: false, contentStillUsed: false };
      // The deploy spec is JSON text; the image name is compared exactly after extraction.
      const user = (
        await client.query<{ name: string }>(
          `SELECT name FROM nodes WHERE provision_state IN ('deploying', 'deploy_wait') AND deploy::jsonb ->> 'image' = $1 ORDER BY name LIMIT 1`,
          [name],
        )
      ).rows[0];
      if (user) {
        throw new MetalcastError(
          Status.FAILED_PRECONDITION,
          `image '${name}' is being deployed to node '${user.name}'; delete it after that deploy ends`,
        );
      }
      await client.query('DELETE FROM images WHERE name = $1', [name]);
      const shared =
        image.sha256 !== '' && ((await client.query('SELECT 1 FROM images WHERE sha256 = $1 LIMIT 1', [image.sha256])).rowCount ?? 0) > 0;
      return { deleted: true, contentStillUsed: shared };
    });
  }

  async createOperatorToken(record: OperatorTokenRecord): Promise<void> {
    try {
      await insertOperatorToken(this.pool, record);
    } catch (error) {
      if (error instanceof DatabaseError && error.code === '23505') {
        throw new MetalcastError(Status.ALREADY_EXISTS, `an operator token with id ${record.id} or the same hash already exists`);
      }
      throw error;
    }
  }

  async createFirstOperatorToken(record: OperatorTokenRecord): Promise<boolean> {
    return this.withTransaction(async (client) => {
      // Several controllers starting at once on an empty table: one of them makes the first token.
      await client.query('LOCK TABLE operator_tokens IN SHARE ROW EXCLUSIVE MODE');
      if ((await client.query('SELECT 1 FROM operator_tokens LIMIT 1')).rowCount) return false;
      await insertOperatorToken(client, record);
      return true;
    });
  }

  async findOperatorTokenByHash(tokenHash: string): Promise<OperatorTokenRecord | undefined> {
    const { rows } = await this.pool.query<OperatorTokenRow>('SELECT * FROM operator_tokens WHERE token_hash = $1', [tokenHash]);
    return rows[0] && toOperatorTokenRecord(rows[0]);
  }

  async listOperatorTokens(): Promise<OperatorTokenRecord[]> {
    return (await this.pool.query<OperatorTokenRow>('SELECT * FROM operator_tokens ORDER BY created_at, id')).rows.map(
      toOperatorTokenRecord,
    );
  }

  async deleteOperatorToken(id: string): Promise<boolean> {
    return ((await this.pool.query('DELETE FROM operator_tokens WHERE id = $1', [id])).rowCount ?? 0) > 0;
  }

  async touchOperatorToken(id: string, now: EpochMs): Promise<void> {
    await this.pool.query('UPDATE operator_tokens SET last_used_at = $2 WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $2)', [
      id,
      now,
    ]);
  }

  async ensureClusterSecret(candidate: string): Promise<string> {
    await this.pool.query('INSERT INTO cluster_secret (id, secret, created_at) VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING', [
      candidate,
      Date.now(),
    ]);
    const { rows } = await this.pool.query<{ secret: string }>('SELECT secret FROM cluster_secret WHERE id = 1');
    return (rows[0] as { secret: string }).secret;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.listener.close();
    await this.pool.end();
  }

  /** For benchmarks and tests that need many rows fast; not part of Store. */
  async bulkInsertForBench(
    rows: readonly { uuid: string; name: string; state: ProvisionState; livenessAt: EpochMs | null }[],
  ): Promise<void> {
    const CHUNK = 20_000;
    const now = Date.now();
    await this.withTransaction(async (client) => {
      for (let start = 0; start < rows.length; start += CHUNK) {
        const chunk = rows.slice(start, start + CHUNK);
        await client.query(
          `INSERT INTO nodes (uuid, name, provision_state, liveness_at, last_heartbeat_at, ring_hash, created_at, updated_at, provision_updated_at)
           SELECT uuid, name, state, liveness, liveness, ring, $6, $6, $6
           FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[]) AS r (uuid, name, state, liveness, ring)`,
          [
            chunk.map((r) => r.uuid),
            chunk.map((r) => r.name),
            chunk.map((r) => r.state),
            chunk.map((r) => r.livenessAt),
            chunk.map((r) => ringHash(r.uuid)),
            now,
          ],
        );
      }
    });
  }
}

/**
 * The one connection that LISTENs. It connects when the first handler
 * arrives, and when it drops it reconnects with backoff and LISTENs again
 * for every channel that still has handlers. Notifications sent while it is
 * down are lost: they are hints, and their receivers must not depend on
 * every one arriving.
 */
class NotificationListener {
  private readonly handlers = new Map<string, Set<(payload: string) => void>>();
  private client: Client | undefined;
  /** Channels LISTENed on the current connection. */
  private readonly active = new Set<string>();
  /** LISTENs, UNLISTENs and reconnects run one after the other on this chain. */
  private queue: Promise<void> = Promise.resolve();
  private retryTimer: NodeJS.Timeout | undefined;
  private failures = 0;
  private lost = false;
  private closed = false;

  constructor(
    private readonly newClient: () => Client,
    private readonly logger: StoreLogger,
  ) {}

  add(channel: string, handler: (payload: string) => void): () => void {
    let handlers = this.handlers.get(channel);
    if (!handlers) {
      handlers = new Set();
      this.handlers.set(channel, handlers);
      this.sync();
    }
    handlers.add(handler);
    const own = handlers;
    return () => {
      own.delete(handler);
      if (own.size === 0 && this.handlers.get(channel) === own) {
        this.handlers.delete(channel);
        this.sync();
      }
    };
  }

  settled(): Promise<void> {
    return this.queue;
  }

  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.retryTimer);
    this.handlers.clear();
    await this.queue;
    const client = this.client;
    this.client = undefined;
    await client?.end().catch(() => {});
  }

  /** Brings the server's LISTENs in line with the handlers, after whatever is already queued. */
  private sync(): void {
    this.queue = this.queue.then(() => this.reconcile()).catch((error: unknown) => this.failed(error));
  }

  private async reconcile(): Promise<void> {
    if (this.closed || (this.handlers.size === 0 && !this.client)) return;
    const client = this.client ?? (await this.connect());
    for (const channel of this.handlers.keys()) {
      if (this.active.has(channel)) continue;
      await client.query(`LISTEN ${escapeIdentifier(channel)}`);
      this.active.add(channel);
    }
    for (const channel of this.active) {
      if (this.handlers.has(channel)) continue;
      await client.query(`UNLISTEN ${escapeIdentifier(channel)}`);
      this.active.delete(channel);
    }
    if (this.lost) this.logger.info({ channels: [...this.active] }, 'listening for notifications again after a reconnect');
    this.lost = false;
    this.failures = 0;
  }

  private async connect(): Promise<Client> {
    const client = this.newClient();
    client.on('notification', (message) => this.deliver(message.channel, message.payload ?? ''));
    client.on('error', (error) => this.dropped(client, error));
    client.on('end', () => this.dropped(client));
    try {
      await client.connect();
    } catch (error) {
      await client.end().catch(() => {});
      throw error;
    }
    if (this.closed) {
      await client.end();
      throw new Error('store closed');
    }
    this.client = client;
    this.active.clear();
    return client;
  }

  private deliver(channel: string, payload: string): void {
    for (const handler of [...(this.handlers.get(channel) ?? [])]) {
      // A handler's failure is its own: the others, and later notifications, are still delivered.
      try {
        const result: unknown = handler(payload);
        if (result instanceof Promise) result.catch((error: unknown) => this.handlerFailed(channel, error));
      } catch (error) {
        this.handlerFailed(channel, error);
      }
    }
  }

  private handlerFailed(channel: string, error: unknown): void {
    this.logger.error({ err: error, channel }, 'a notification handler failed');
  }

  private dropped(client: Client, error?: Error): void {
    if (client !== this.client || this.closed) return;
    this.client = undefined;
    this.active.clear();
    this.lost = true;
    this.logger.warn({ err: error }, 'lost the PostgreSQL connection that listens for notifications; reconnecting');
    client.end().catch(() => {});
    this.scheduleRetry();
  }

  private failed(error: unknown): void {
    if (this.closed) return;
    this.logger.warn({ err: error, attempt: this.failures + 1 }, 'could not listen for notifications; retrying');
    // Start over on a fresh connection: whatever broke may have left this one half set up.
    const client = this.client;
    this.client = undefined;
    this.active.clear();
    this.lost = true;
    client?.end().catch(() => {});
    this.failures++;
    this.scheduleRetry();
  }

  private scheduleRetry(): void {
    if (this.retryTimer || this.closed || this.handlers.size === 0) return;
    // 100 ms doubling to 10 s, with jitter so that controllers restarted by one outage do not reconnect in step.
    const delay = Math.min(10_000, 100 * 2 ** this.failures) * (0.5 + Math.random() / 2);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      this.sync();
    }, delay);
  }
}

/** pg's ways of saying the database is busy or away, rather than that the query is wrong. */
const TRANSIENT_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EPIPE', '57P01', '57P02', '57P03', '53300', '08006', '08001']);
const TRANSIENT_MESSAGES =
  /timeout exceeded when trying to connect|Connection terminated|connection timeout|Client has encountered a connection error/i;

/**
 * Makes a busy or unreachable database an UNAVAILABLE answer (which callers,
 * agents included, retry) instead of an INTERNAL one (a bug, with an alert):
 * a connect storm of thousands of agents waits for the pool's few
 * connections, and the pool gives up on some of them after its timeout.
 */
function unavailableWhenBusy(pool: Pool, limits: { poolSize: number; poolWaitMs: number }): Pool {
  const translate = (error: unknown): unknown => {
    if (!(error instanceof Error) || error instanceof DatabaseError) {
      if (!(error instanceof DatabaseError) || !TRANSIENT_CODES.has(error.code ?? '')) return error;
    }
    const code = (error as { code?: string }).code ?? '';
    if (!TRANSIENT_CODES.has(code) && !TRANSIENT_MESSAGES.test(error.message)) return error;
    if (/timeout exceeded when trying to connect/i.test(error.message) && pool.totalCount >= limits.poolSize) {
      // Every connection was busy for the whole wait: say so, and what to change.
      return new MetalcastError(
        Status.UNAVAILABLE,
        `the database is busy: no connection of the pool was free within ${limits.poolWaitMs} ms (all ${limits.poolSize} in use, ${pool.waitingCount} more calls waiting); retry shortly, or raise --database-pool-size (within PostgreSQL's max_connections)`,
      );
    }
    return new MetalcastError(Status.UNAVAILABLE, `the database is busy or unreachable (${error.message}); retry shortly`);
  };
  const query = pool.query.bind(pool) as (...args: unknown[]) => Promise<unknown>;
  const connect = pool.connect.bind(pool) as (...args: unknown[]) => Promise<PoolClient> | undefined;
  return Object.assign(pool, {
    query: (...args: unknown[]) => query(...args).catch((error: unknown) => Promise.reject(translate(error))),
    // pg-pool's own query() calls connect with a callback: leave that form alone.
    connect: (...args: unknown[]) =>
      args.length > 0 ? connect(...args) : (connect() as Promise<PoolClient>).catch((error: unknown) => Promise.reject(translate(error))),
  }) as Pool;
}

/**
 * Runs `fn` in a transaction on a connection of the pool: committed when it
 * returns, rolled back when it throws. A connection that cannot even roll
 * back is discarded rather than handed to the next caller.
 */
async function withTransaction<T>(pool: Pool, fn: (client: PoolClient) => Promise<T>): Promise<T> {
  const client = await pool.connect();
  let broken: Error | undefined;
  try {
    await client.query('BEGIN');
    const result = await fn(client);
    await client.query('COMMIT');
    return result;
  } catch (error) {
    await client.query('ROLLBACK').catch((rollbackError: Error) => {
      broken = rollbackError;
    });
    throw error;
  } finally {
    client.release(broken);
  }
}

/** Connects, checks the server, creates the schema if needed and migrates it; returns the schema's name. */
async function prepareDatabase(pool: Pool, masked: string): Promise<string> {
  let version: number;
  try {
    version = Number((await pool.query<{ server_version_num: string }>('SHOW server_version_num')).rows[0]?.server_version_num);
  } catch (error) {
    throw connectError(error, masked);
  }
  if (version < MIN_SERVER_VERSION) {
    throw new Error(`PostgreSQL at ${masked} is version ${Math.floor(version / 10000)}; metalcast needs PostgreSQL 14 or newer`);
  }
  await migrate(pool, masked);
  const schema = (await pool.query<{ schema: string | null }>('SELECT current_schema() AS schema')).rows[0]?.schema;
  if (!schema) throw new Error(`no schema to use at ${masked}: choose one with ?options=-c%20search_path%3Dmetalcast in the URL`);
  return schema;
}

async function migrate(pool: Pool, masked: string): Promise<void> {
  const searchPath = (await pool.query<{ search_path: string }>('SHOW search_path')).rows[0]?.search_path ?? '';
  const target = firstSchemaOf(searchPath);
  const known = POSTGRES_MIGRATIONS.at(-1)?.version ?? 0;
  try {
    await withTransaction(pool, async (client) => {
      // Several controllers may start at once on a fresh database: one
      // migrates while the others wait here, then find the work done.
      await client.query("SELECT pg_advisory_xact_lock($1, hashtext(COALESCE($2::text, current_schema()::text, '')))", [
        MIGRATION_LOCK,
        target ?? null,
      ]);
      if (target !== undefined && !(await client.query('SELECT 1 FROM pg_namespace WHERE nspname = $1', [target])).rowCount) {
        await client.query(`CREATE SCHEMA ${escapeIdentifier(target)}`);
      }
      await client.query(
        'CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at BIGINT NOT NULL)',
      );
      const { rows } = await client.query<{ v: number }>('SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations');
      const current = rows[0]?.v ?? 0;
      if (current > known) {
        throw new Error(
          `the database schema at ${masked} is version ${current}, newer than this controller understands (${known}); upgrade the controller`,
        );
      }
      for (const migration of POSTGRES_MIGRATIONS) {
        if (migration.version <= current) continue;
        await client.query(migration.sql);
        await client.query('INSERT INTO schema_migrations (version, description, applied_at) VALUES ($1, $2, $3)', [
          migration.version,
          migration.description,
          Date.now(),
        ]);
      }
    });
  } catch (error) {
    if (!(error instanceof DatabaseError)) throw error;
    throw new Error(`could not create or migrate the metalcast tables at ${masked}: ${error.message}`, { cause: error });
  }
}

/**
 * The first schema a search_path setting names, as PostgreSQL reads it
 * (unquoted names fold to lower case); undefined when that is "$user" (the
 * default), so that a URL without a search_path creates nothing.
 */
export function firstSchemaOf(searchPath: string): string | undefined {
  const text = searchPath.trim();
  const quoted = /^"((?:[^"]|"")*)"/.exec(text);
  const name = quoted
    ? (quoted[1] ?? '').replaceAll('""', '"')
    : (text.split(',')[0] ?? '').trim().replace(/[A-Z]/g, (c) => c.toLowerCase());
  return name === '' || name === '$user' ? undefined : name;
}

/** The URL with its password (in the authority or as a parameter) replaced by ***. */
export function maskPassword(url: string): string {
  return url.replace(/^([a-z][a-z0-9+.-]*:\/\/[^:@/]*:).*@/i, '$1***@').replace(/([?&]password=)[^&#]*/gi, '$1***');
}

function assertPostgresUrl(url: string, masked: string): void {
  let protocol: string | undefined;
  try {
    protocol = new URL(url).protocol;
  } catch {
    // Reported below.
  }
  if (protocol !== 'postgres:' && protocol !== 'postgresql:') {
    throw new Error(
      `database URL '${masked}' is not a PostgreSQL URL; expected postgres://user:password@host:5432/database, ` +
        'optionally with ?options=-c%20search_path%3Dschema',
    );
  }
}

const CONNECT_HINTS: Record<string, string> = {
  ECONNREFUSED: 'nothing listens there: start PostgreSQL, or fix the host and port in the URL',
  ENOTFOUND: 'the host name does not resolve: fix the host in the URL',
  EAI_AGAIN: 'the host name does not resolve: fix the host in the URL',
  ETIMEDOUT: 'the server did not answer: check the host, the port and the firewall',
  '28P01': 'the server refused the password: fix the user or password in the URL',
  '28000': 'the server refused the user: fix the user in the URL, or the server’s pg_hba.conf',
  '3D000': 'the database does not exist: create it (createdb) or fix its name in the URL',
};

function connectError(error: unknown, masked: string): Error {
  const code = (error as { code?: unknown }).code;
  const hint = (typeof code === 'string' && CONNECT_HINTS[code]) || 'check that PostgreSQL is running and that the URL is right';
  const reason =
    error instanceof AggregateError
      ? error.errors.map((e: unknown) => (e instanceof Error ? e.message : String(e))).join(', ')
      : error instanceof Error
        ? error.message
        : String(error);
  return new Error(`cannot connect to PostgreSQL at ${masked}: ${reason || String(code)}; ${hint}`, { cause: error });
}

/** int8 columns (times in ms, ids, counts) as JS numbers, for this store's connections only. */
function int8AsNumber(): TypeOverrides {
  const overrides = new TypeOverrides();
  overrides.setTypeParser(types.builtins.INT8, (value: string) => Number(value));
  return overrides;
}

/** Ring hash ranges as an int8multirange literal; no ranges is the empty multirange, which contains nothing. */
function multirange(ranges: readonly HashRange[]): string {
  return `{${ranges
    .filter((r) => r.from < r.to)
    .map((r) => `[${r.from},${r.to})`)
    .join(',')}}`;
}

/** Numbered placeholders for SQL built piece by piece: `p.add(value)` returns "$n". */
class Params {
  readonly values: unknown[] = [];
  add(value: unknown): string {
    this.values.push(value);
    return `$${this.values.length}`;
  }
}

function nameTaken(name: string): MetalcastError {
  return new MetalcastError(Status.ALREADY_EXISTS, `a node named '${name}' already exists`);
}

async function assertMacsFree(db: Queryable, macs: readonly string[]): Promise<void> {
  if (macs.length === 0) return;
  const { rows } = await db.query<{ mac_address: string; name: string }>(
    'SELECT p.mac_address, n.name FROM ports p JOIN nodes n ON n.uuid = p.node_uuid WHERE p.mac_address = ANY($1::text[])',
    [macs],
  );
  // Report the first taken MAC in the caller's order, as a check one by one would.
  const owners = new Map(rows.map((r) => [r.mac_address, r.name]));
  const mac = macs.find((m) => owners.has(m));
  if (mac !== undefined) throw new MetalcastError(Status.ALREADY_EXISTS, `MAC address ${mac} already belongs to node '${owners.get(mac)}'`);
}

/**
 * Appends one event of a node. Ids come from an identity column, assigned
 * at insert and visible at commit, and ListNodeEvents pages by `id >
 * afterId`: were two transactions to write events of one node at once, the
 * later id could commit first and a reader between the two commits would
 * page past the earlier one for good. So every event insert locks its
 * node's row first (FOR UPDATE, held to commit; most callers hold it
 * already, from the UPDATE of the node), and the events of one node get
 * their ids in commit order. Listings are per node, so that is enough.
 */
async function insertEvent(db: Queryable, uuid: string, event: NewNodeEvent, time: EpochMs): Promise<void> {
  await db.query(
    `WITH node AS (SELECT uuid FROM nodes WHERE uuid = $1 FOR UPDATE)
     INSERT INTO node_events (node_uuid, time, kind, message, actor, from_state, to_state)
     SELECT node.uuid, $2, $3, $4, $5, $6, $7 FROM node`,
    [uuid, time, event.kind, event.message, event.actor, event.fromState, event.toState],
  );
}

async function requireNode(db: Queryable, uuid: string, options: { forUpdate?: boolean } = {}): Promise<NodeRecord> {
  const { rows } = await db.query<NodeRow>(
    `SELECT ${NODE_COLUMNS} FROM nodes n WHERE n.uuid = $1 ${options.forUpdate ? 'FOR UPDATE' : ''}`,
    [uuid],
  );
  if (!rows[0]) throw new MetalcastError(Status.NOT_FOUND, `node ${uuid} no longer exists`);
  return toNodeRecord(rows[0]);
}

function toNodeRecord(row: NodeRow): NodeRecord {
  return {
    uuid: row.uuid,
    name: row.name,
    provisionState: row.provision_state,
    targetProvisionState: row.target_provision_state,
    maintenance: row.maintenance,
    maintenanceReason: row.maintenance_reason,
    lastError: row.last_error,
    macAddresses: row.mac_addresses,
    properties: JSON.parse(row.properties) as Record<string, string>,
    secrets: JSON.parse(row.secrets) as Record<string, string>,
    agentAddress: row.agent_address,
    agentVersion: row.agent_version,
    agentStatus: row.agent_status,
    agentTokenHash: row.agent_token_hash,
    agentApiToken: row.agent_api_token,
    agentCertificatePem: row.agent_certificate,
    lastHeartbeatAt: row.last_heartbeat_at,
    livenessAt: row.liveness_at,
    reservation: row.reservation,
    reservationOperation: row.reservation_operation,
    inventoryJson: row.inventory,
    deployJson: row.deploy,
    progressJson: row.progress,
    createdAt: row.created_at,
    updatedAt: row.updated_at,
    provisionUpdatedAt: row.provision_updated_at,
  };
}

interface OperatorTokenRow {
  id: string;
  token_hash: string;
  role: OperatorRole;
  description: string;
  created_at: number;
  last_used_at: number | null;
}

async function insertOperatorToken(db: Queryable, record: OperatorTokenRecord): Promise<void> {
  await db.query(
    'INSERT INTO operator_tokens (id, token_hash, role, description, created_at, last_used_at) VALUES ($1, $2, $3, $4, $5, $6)',
    [record.id, record.tokenHash, record.role, record.description, record.createdAt, record.lastUsedAt],
  );
}

function toOperatorTokenRecord(row: OperatorTokenRow): OperatorTokenRecord {
  return {
    id: row.id,
    tokenHash: row.token_hash,
    role: row.role,
    description: row.description,
    createdAt: row.created_at,
    lastUsedAt: row.last_used_at,
  };
}

function toImageRecord(row: ImageRow): ImageRecord {
  return {
    name: row.name,
    state: row.state,
    sha256: row.sha256,
    sizeBytes: row.size_bytes,
    sourceUrl: row.source_url,
    expectedChecksum: row.expected_checksum,
    error: row.error,
    format: row.format,
    sourceSha256: row.source_sha256,
    sourceSizeBytes: row.source_size_bytes,
    allocatedBytes: row.allocated_bytes,
    extentCount: row.extent_count,
    createdAt: row.created_at,
    updatedAt: row.updated_at,
  };
}
