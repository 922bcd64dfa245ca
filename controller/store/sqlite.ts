import { randomUUID } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { DatabaseSync, type SQLInputValue, type StatementSync } from 'node:sqlite';
import { Status } from 'nice-grpc-common';
import type { ChunkManifest } from '../../common/chunk-manifest.js';
import { MetalcastError } from '../../common/errors.js';
import { EventEmitter } from 'node:events';
import { setImmediate as yieldToEventLoop } from 'node:timers/promises';
import { ringHash } from '../cluster/hash-ring.js';
import {
  ACTIVE_STATE_FAILURES,
  AGENT_STATES,
  PROVISION_STATES,
  type ProvisionState,
  WAIT_STATE_FAILURES,
  WAIT_STATES,
} from '../provisioning/states.js';
import { SQLITE_MIGRATIONS } from './sqlite-migrations.js';
import { applySettings } from './settings.js';
import type {
  PowerStatusRecord,
  ControllerRecord,
  EpochMs,
  HashRange,
  HeartbeatRecord,
  ConfigDriveRecord,
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
import { deployImageOf, deployImageProblem } from './store.js';
import { powerStatusFromRow } from './power-rows.js';

type Row = Record<string, SQLInputValue>;

/** Heartbeats written by one transaction of recordHeartbeats: a few milliseconds of the event loop at a time. */
const HEARTBEAT_WRITE_SLICE = 250;
/** Nodes read by one statement of getHeartbeatViews (SQLite allows 32,766 parameters). */
const HEARTBEAT_VIEW_SLICE = 1000;

/**
 * The embedded store: one SQLite file in WAL mode, through node:sqlite (no
 * native build step). Calls are synchronous underneath; they are short, and
 * heartbeats reach it in batches, so the event loop is never held for long.
 */
/**
 * The heartbeat's progress (HeartbeatRecord.progressJson): null keeps the
 * node's, '' clears it, a progress is written only onto a node in an agent
 * state entered at or before the heartbeat; parameters: progress, progress,
 * time, progress.
 */
const PROGRESS_UPDATE = `CASE WHEN ? IS NULL THEN progress WHEN ? = '' THEN NULL
             WHEN provision_updated_at <= ? AND provision_state IN (${AGENT_STATES.map((s) => `'${s}'`).join(',')}) THEN ?
             ELSE progress END`;

export class SqliteStore implements Store {
  private readonly db: DatabaseSync;
  private readonly statements = new Map<string, StatementSync>();
  /**
   * Notifications reach only this process: SQLite is the single-controller
   * store. Several processes on one file still work, because every waiter
   * also re-checks on a timer.
   */
  private readonly notifications = new EventEmitter().setMaxListeners(0);

  private constructor(path: string) {
    if (path !== ':memory:') mkdirSync(dirname(path), { recursive: true });
    this.db = new DatabaseSync(path);
    this.db.exec('PRAGMA journal_mode = WAL');
    this.db.exec('PRAGMA synchronous = NORMAL');
    this.db.exec('PRAGMA foreign_keys = ON');
    this.db.exec('PRAGMA busy_timeout = 5000');
  }

  /** Opens (creating if needed) and migrates the database at `path`. */
  static open(path: string): SqliteStore {
    const store = new SqliteStore(path);
    store.migrate();
    return store;
  }

  private migrate(): void {
    this.db.exec(
      'CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at INTEGER NOT NULL)',
    );
    this.inTransaction(() => {
      const row = this.db.prepare('SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations').get() as { v: number };
      const known = SQLITE_MIGRATIONS.at(-1)?.version ?? 0;
      if (row.v > known) {
        throw new Error(`database schema version ${row.v} is newer than this controller understands (${known}); upgrade the controller`);
      }
      for (const migration of SQLITE_MIGRATIONS) {
        if (migration.version <= row.v) continue;
        this.db.exec(migration.sql);
        this.db
          .prepare('INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)')
          .run(migration.version, migration.description, Date.now());
      }
      // Version 3 added the ring hash; rows from before it get theirs here.
      const unhashed = this.db.prepare('SELECT uuid FROM nodes WHERE ring_hash IS NULL').all() as { uuid: string }[];
      const setHash = this.db.prepare('UPDATE nodes SET ring_hash = ? WHERE uuid = ?');
      for (const { uuid } of unhashed) setHash.run(ringHash(uuid), uuid);
    });
  }

  private stmt(sql: string): StatementSync {
    let statement = this.statements.get(sql);
    if (!statement) {
      statement = this.db.prepare(sql);
      this.statements.set(sql, statement);
    }
    return statement;
  }

  private inTransaction<T>(fn: () => T): T {
    this.db.exec('BEGIN IMMEDIATE');
    try {
      const result = fn();
      this.db.exec('COMMIT');
      return result;
    } catch (error) {
      this.db.exec('ROLLBACK');
      throw error;
    }
  }

  private insertEvent(uuid: string, event: NewNodeEvent, time: EpochMs): void {
    this.stmt('INSERT INTO node_events (node_uuid, time, kind, message, actor, from_state, to_state) VALUES (?, ?, ?, ?, ?, ?, ?)').run(
      uuid,
      time,
      event.kind,
      event.message,
      event.actor,
      event.fromState,
      event.toState,
    );
  }

  private loadNode(where: 'uuid' | 'name', value: string): NodeRecord | undefined {
    const row = this.stmt(`SELECT * FROM nodes WHERE ${where} = ?`).get(value) as Row | undefined;
    if (!row) return undefined;
    const macs = this.stmt('SELECT mac_address FROM ports WHERE node_uuid = ? ORDER BY mac_address').all(row.uuid as string) as {
      mac_address: string;
    }[];
    return toNodeRecord(
      row,
      macs.map((m) => m.mac_address),
    );
  }

  private requireNode(uuid: string): NodeRecord {
    const node = this.loadNode('uuid', uuid);
    if (!node) throw new MetalcastError(Status.NOT_FOUND, `node ${uuid} no longer exists`);
    return node;
  }

  private assertMacsFree(macs: readonly string[]): void {
    for (const mac of macs) {
      const owner = this.stmt('SELECT n.name FROM ports p JOIN nodes n ON n.uuid = p.node_uuid WHERE p.mac_address = ?').get(mac) as
        | { name: string }
        | undefined;
      if (owner) throw new MetalcastError(Status.ALREADY_EXISTS, `MAC address ${mac} already belongs to node '${owner.name}'`);
    }
  }

  async createNode(node: NewNode, event: NewNodeEvent): Promise<NodeRecord> {
    return this.inTransaction(() => {
      if (this.stmt('SELECT 1 FROM nodes WHERE name = ?').get(node.name)) {
        throw new MetalcastError(Status.ALREADY_EXISTS, `a node named '${node.name}' already exists`);
      }
      this.assertMacsFree(node.macAddresses);
      const uuid = randomUUID();
      const now = Date.now();
      this.stmt(
        `INSERT INTO nodes (uuid, name, provision_state, properties, secrets, ring_hash, created_at, updated_at, provision_updated_at)
         VALUES (?, ?, 'enroll', ?, ?, ?, ?, ?, ?)`,
      ).run(uuid, node.name, JSON.stringify(node.properties), JSON.stringify(node.secrets ?? {}), ringHash(uuid), now, now, now);
      for (const mac of node.macAddresses) this.stmt('INSERT INTO ports (mac_address, node_uuid) VALUES (?, ?)').run(mac, uuid);
      this.insertEvent(uuid, event, now);
      return this.requireNode(uuid);
    });
  }

  async getNode(uuidOrName: string): Promise<NodeRecord | undefined> {
    return this.loadNode('uuid', uuidOrName) ?? this.loadNode('name', uuidOrName);
  }

  async getHeartbeatViews(uuids: readonly string[]): Promise<NodeHeartbeatView[]> {
    const views: NodeHeartbeatView[] = [];
    // A statement per slice: SQLite caps the parameters of one statement.
    for (let from = 0; from < uuids.length; from += HEARTBEAT_VIEW_SLICE) {
      const slice = uuids.slice(from, from + HEARTBEAT_VIEW_SLICE);
      const rows = this.db
        .prepare(`SELECT uuid, provision_state, maintenance, agent_token_hash FROM nodes WHERE uuid IN (${slice.map(() => '?').join(',')})`)
        .all(...slice) as { uuid: string; provision_state: ProvisionState; maintenance: number; agent_token_hash: string | null }[];
      for (const row of rows) {
        views.push({
          uuid: row.uuid,
          provisionState: row.provision_state,
          maintenance: row.maintenance === 1,
          agentTokenHash: row.agent_token_hash,
        });
      }
    }
    return views;
  }

  async findNodesByMacs(macs: readonly string[]): Promise<NodeRecord[]> {
    if (macs.length === 0) return [];
    const rows = this.db
      .prepare(`SELECT DISTINCT node_uuid FROM ports WHERE mac_address IN (${macs.map(() => '?').join(',')})`)
      .all(...macs) as { node_uuid: string }[];
    return rows.map((r) => this.loadNode('uuid', r.node_uuid)).filter((n): n is NodeRecord => n !== undefined);
  }

  async listNodes(query: ListNodesQuery): Promise<NodeRecord[]> {
    const where: string[] = [];
    const params: SQLInputValue[] = [];
    if (query.provisionState) {
      where.push('provision_state = ?');
      params.push(query.provisionState);
    }
    if (query.maintenance !== undefined) {
      where.push('maintenance = ?');
      params.push(query.maintenance ? 1 : 0);
    }
    if (query.afterName !== undefined) {
      where.push('name > ?');
      params.push(query.afterName);
    }
    const sql = `SELECT * FROM nodes ${where.length ? `WHERE ${where.join(' AND ')}` : ''} ORDER BY name LIMIT ?`;
    const rows = this.stmt(sql).all(...params, query.limit) as Row[];
    if (rows.length === 0) return [];
    const ports = this.db
      .prepare(`SELECT node_uuid, mac_address FROM ports WHERE node_uuid IN (${rows.map(() => '?').join(',')}) ORDER BY mac_address`)
      .all(...rows.map((r) => r.uuid as string)) as { node_uuid: string; mac_address: string }[];
    const macsByNode = new Map<string, string[]>();
    for (const p of ports) macsByNode.set(p.node_uuid, [...(macsByNode.get(p.node_uuid) ?? []), p.mac_address]);
    return rows.map((row) => toNodeRecord(row, macsByNode.get(row.uuid as string) ?? []));
  }

  async deleteNode(uuid: string): Promise<boolean> {
    return Number(this.stmt('DELETE FROM nodes WHERE uuid = ?').run(uuid).changes) > 0;
  }

  async addPort(uuid: string, mac: string, event: NewNodeEvent): Promise<NodeRecord> {
    return this.inTransaction(() => {
      this.requireNode(uuid);
      this.assertMacsFree([mac]);
      const now = Date.now();
      this.stmt('INSERT INTO ports (mac_address, node_uuid) VALUES (?, ?)').run(mac, uuid);
      this.stmt('UPDATE nodes SET updated_at = ? WHERE uuid = ?').run(now, uuid);
      this.insertEvent(uuid, event, now);
      return this.requireNode(uuid);
    });
  }

  async removePort(uuid: string, mac: string, event: NewNodeEvent): Promise<NodeRecord> {
    return this.inTransaction(() => {
      const node = this.requireNode(uuid);
      if (!node.macAddresses.includes(mac)) {
        throw new MetalcastError(Status.NOT_FOUND, `node '${node.name}' has no port with MAC address ${mac}`);
      }
      if (node.macAddresses.length === 1) {
        throw new MetalcastError(Status.FAILED_PRECONDITION, `${mac} is the last port of node '${node.name}'; a node needs at least one`);
      }
      const now = Date.now();
      this.stmt('DELETE FROM ports WHERE mac_address = ?').run(mac);
      this.stmt('UPDATE nodes SET updated_at = ? WHERE uuid = ?').run(now, uuid);
      this.insertEvent(uuid, event, now);
      return this.requireNode(uuid);
    });
  }

  async setMaintenance(uuid: string, enabled: boolean, reason: string, event: NewNodeEvent): Promise<NodeRecord | undefined> {
    return this.inTransaction(() => {
      const now = Date.now();
      // Leaving maintenance restarts the liveness clock: the sweep skipped the
      // node meanwhile, and its agent deserves a full timeout from now.
      const changes = this.stmt(
        `UPDATE nodes SET maintenance = ?, maintenance_reason = ?, updated_at = ?,
           liveness_at = CASE WHEN ? = 0 AND liveness_at IS NOT NULL THEN ? ELSE liveness_at END
         WHERE uuid = ?`,
      ).run(enabled ? 1 : 0, enabled ? reason : '', now, enabled ? 1 : 0, now, uuid).changes;
      if (Number(changes) === 0) return undefined;
      this.insertEvent(uuid, event, now);
      return this.requireNode(uuid);
    });
  }

  async updateNodeSettings(uuid: string, change: NodeSettingsChange, event: NewNodeEvent): Promise<NodeRecord | undefined> {
    return this.inTransaction(() => {
      const row = this.stmt('SELECT properties, secrets FROM nodes WHERE uuid = ?').get(uuid) as
        | { properties: string; secrets: string }
        | undefined;
      if (!row) return undefined;
      const properties = applySettings(JSON.parse(row.properties), change.setProperties, change.unsetProperties);
      const secrets = applySettings(JSON.parse(row.secrets), change.setSecrets, change.unsetSecrets);
      const now = Date.now();
      this.stmt('UPDATE nodes SET properties = ?, secrets = ?, updated_at = ? WHERE uuid = ?').run(
        JSON.stringify(properties),
        JSON.stringify(secrets),
        now,
        uuid,
      );
      this.insertEvent(uuid, event, now);
      return this.requireNode(uuid);
    });
  }

  async transition(uuid: string, t: Transition): Promise<NodeRecord | undefined> {
    return this.inTransaction(() => {
      // In the transaction that names the image: deleteImage cannot come between (see deployImageOf).
      const image = deployImageOf(t);
      if (image) {
        const found = this.stmt('SELECT state, sha256 FROM images WHERE name = ?').get(image.name) as
          | { state: string; sha256: string }
          | undefined;
        const problem = deployImageProblem(image, found);
        if (problem) throw new MetalcastError(Status.FAILED_PRECONDITION, problem);
      }
      const now = Date.now();
      const sets = [
        'provision_state = ?',
        'target_provision_state = ?',
        'updated_at = ?',
        'provision_updated_at = ?',
        // Entering a state that waits for an agent starts the sweep's clock.
        'liveness_at = ?',
        // The progress shown is the running step's: a new state starts without one.
        'progress = NULL',
      ];
      const params: SQLInputValue[] = [t.to, t.target, now, now, (WAIT_STATES as string[]).includes(t.to) ? now : null];
      if (t.lastError !== undefined) {
        sets.push('last_error = ?');
        params.push(t.lastError);
      }
      if (!t.keepAgentToken) sets.push('agent_token_hash = NULL', 'agent_api_token = NULL', 'agent_certificate = NULL');
      if (t.deployJson !== undefined) {
        sets.push('deploy = ?');
        params.push(t.deployJson);
      }
      if (t.inventoryJson !== undefined) {
        sets.push('inventory = ?');
        params.push(t.inventoryJson);
      }
      const fence = t.holder === undefined ? '' : ' AND reservation = ?';
      const changes = this.db
        .prepare(`UPDATE nodes SET ${sets.join(', ')} WHERE uuid = ? AND provision_state IN (${t.from.map(() => '?').join(',')})${fence}`)
        .run(...params, uuid, ...t.from, ...(t.holder === undefined ? [] : [t.holder])).changes;
      if (Number(changes) === 0) return undefined;
      this.insertEvent(uuid, t.event, now);
      return this.requireNode(uuid);
    });
  }

  async setAgentToken(uuid: string, tokenHash: string | null, apiToken: string | null): Promise<void> {
    const now = Date.now();
    this.stmt(
      `UPDATE nodes SET agent_token_hash = ?, agent_api_token = ?, agent_certificate = NULL, updated_at = ?,
         liveness_at = CASE WHEN liveness_at IS NULL THEN NULL ELSE MAX(liveness_at, ?) END
       WHERE uuid = ?`,
    ).run(tokenHash, tokenHash === null ? null : apiToken, now, now, uuid);
  }

  async pinAgentCertificate(uuid: string, tokenHash: string, pem: string): Promise<'pinned' | 'same' | 'different' | 'stale'> {
    return this.inTransaction(() => {
      const { changes } = this.stmt(
        'UPDATE nodes SET agent_certificate = ? WHERE uuid = ? AND agent_token_hash = ? AND agent_certificate IS NULL',
      ).run(pem, uuid, tokenHash);
      if (Number(changes) === 1) return 'pinned';
      const row = this.stmt('SELECT agent_token_hash, agent_certificate FROM nodes WHERE uuid = ?').get(uuid) as
        | { agent_token_hash: string | null; agent_certificate: string | null }
        | undefined;
      if (row?.agent_token_hash !== tokenHash) return 'stale';
      return row.agent_certificate === pem ? 'same' : 'different';
    });
  }

  async recordHeartbeats(batch: readonly HeartbeatRecord[]): Promise<string[]> {
    const missing: string[] = [];
    // node:sqlite is synchronous: one transaction for a large fleet's second of heartbeats held every
    // call on the controller for tens of milliseconds. Slices, each its own transaction, with the
    // event loop served between them; heartbeats of different nodes need no common transaction.
    for (let from = 0; from < batch.length; from += HEARTBEAT_WRITE_SLICE) {
      if (from > 0) await yieldToEventLoop();
      this.inTransaction(() => {
        const update = this.stmt(
          `UPDATE nodes SET last_heartbeat_at = ?, agent_address = ?, agent_version = ?, agent_status = ?,
             progress = ${PROGRESS_UPDATE},
             liveness_at = CASE WHEN liveness_at IS NULL THEN NULL ELSE MAX(liveness_at, ?) END
           WHERE uuid = ?`,
        );
        for (const hb of batch.slice(from, from + HEARTBEAT_WRITE_SLICE)) {
          const p = hb.progressJson;
          const { changes } = update.run(hb.time, hb.agentAddress, hb.agentVersion, hb.agentStatus, p, p, hb.time, p, hb.time, hb.nodeUuid);
          if (Number(changes) === 0) missing.push(hb.nodeUuid);
        }
      });
    }
    return missing;
  }

  async sweepTimedOut(now: EpochMs, cutoff: EpochMs, timeoutMs: number, ranges?: readonly HashRange[]): Promise<TimedOutNode[]> {
    if (ranges?.length === 0) return [];
    const share = ranges === undefined ? { sql: '', params: [] } : rangeFilter(ranges);
    const failures = Object.entries(WAIT_STATE_FAILURES)
      .map(([wait, failed]) => `WHEN '${wait}' THEN '${failed}'`)
      .join(' ');
    const waitList = WAIT_STATES.map((s) => `'${s}'`).join(',');
    const timeoutS = Math.round(timeoutMs / 1000);
    return this.inTransaction(() => {
      // One statement: the index on (provision_state, liveness_at) makes it
      // read only the rows that timed out, however large the fleet.
      // node:sqlite binds every JS number as REAL, hence the CASTs: whole seconds in the message.
      const rows = this.stmt(
        `UPDATE nodes SET
           provision_state = CASE provision_state ${failures} END,
           target_provision_state = NULL,
           agent_token_hash = NULL,
           agent_api_token = NULL,
           agent_certificate = NULL,
           last_error = CASE WHEN last_heartbeat_at IS NULL
             THEN 'no heartbeat from the agent since the node entered ' || replace(provision_state, '_', ' ') || ' ' || CAST((? - liveness_at) / 1000 AS INTEGER) || 's ago (timeout ' || CAST(? AS INTEGER) || 's)'
             ELSE 'no heartbeat from the agent for ' || CAST((? - liveness_at) / 1000 AS INTEGER) || 's (timeout ' || CAST(? AS INTEGER) || 's)' END,
           updated_at = ?, provision_updated_at = ?
         WHERE provision_state IN (${waitList}) AND liveness_at < ? AND reservation IS NULL AND maintenance = 0${share.sql}
         RETURNING uuid, name, provision_state, last_error`,
      ).all(now, timeoutS, now, timeoutS, now, now, cutoff, ...share.params) as {
        uuid: string;
        name: string;
        provision_state: ProvisionState;
        last_error: string;
      }[];
      const failedToWait = Object.fromEntries(Object.entries(WAIT_STATE_FAILURES).map(([w, f]) => [f, w])) as Record<
        string,
        ProvisionState
      >;
      return rows.map((row) => {
        const fromState = failedToWait[row.provision_state] as ProvisionState;
        this.insertEvent(
          row.uuid,
          { kind: 'timeout', message: row.last_error, actor: 'sweep', fromState, toState: row.provision_state },
          now,
        );
        return { uuid: row.uuid, name: row.name, fromState, toState: row.provision_state, lastError: row.last_error };
      });
    });
  }

  async listDueNodes(
    states: readonly ProvisionState[],
    heardSince: EpochMs,
    ranges: readonly HashRange[],
    limit: number,
  ): Promise<string[]> {
    if (states.length === 0 || ranges.length === 0) return [];
    const share = rangeFilter(ranges);
    const rows = this.stmt(
      `SELECT uuid FROM nodes
       WHERE provision_state IN (${states.map(() => '?').join(',')}) AND reservation IS NULL AND maintenance = 0
         AND last_heartbeat_at >= ?${share.sql}
       ORDER BY last_heartbeat_at LIMIT ?`,
    ).all(...states, heardSince, ...share.params, limit) as { uuid: string }[];
    return rows.map((r) => r.uuid);
  }

  async countByProvisionState(): Promise<Map<ProvisionState, number>> {
    const rows = this.stmt('SELECT provision_state, COUNT(*) AS n FROM nodes GROUP BY provision_state').all() as {
      provision_state: ProvisionState;
      n: number;
    }[];
    const counts = new Map<ProvisionState, number>(PROVISION_STATES.map((s) => [s, 0]));
    for (const row of rows) counts.set(row.provision_state, row.n);
    return counts;
  }

  async listEvents(uuid: string, afterId: number, limit: number): Promise<NodeEventRecord[]> {
    const rows = this.stmt('SELECT * FROM node_events WHERE node_uuid = ? AND id > ? ORDER BY id LIMIT ?').all(
      uuid,
      afterId,
      limit,
    ) as Row[];
    return rows.map((r) => ({
      id: r.id as number,
      nodeUuid: r.node_uuid as string,
      time: r.time as number,
      kind: r.kind as string,
      message: r.message as string,
      actor: r.actor as string,
      fromState: (r.from_state as ProvisionState | null) ?? null,
      toState: (r.to_state as ProvisionState | null) ?? null,
    }));
  }

  async getPowerStatuses(uuids: readonly string[]): Promise<Map<string, PowerStatusRecord>> {
    const found = new Map<string, PowerStatusRecord>();
    if (uuids.length === 0) return found;
    const rows = this.db.prepare(`SELECT * FROM node_power WHERE node_uuid IN (${uuids.map(() => '?').join(',')})`).all(...uuids) as Row[];
    for (const row of rows) found.set(row.node_uuid as string, powerStatusFromRow(row));
    return found;
  }

  async savePowerStatus(uuid: string, status: PowerStatusRecord): Promise<void> {
    this.stmt(
      `INSERT INTO node_power (node_uuid, power_state, checked_at, failures, error)
       SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM nodes WHERE uuid = ?)
       ON CONFLICT (node_uuid) DO UPDATE SET power_state = excluded.power_state, checked_at = excluded.checked_at,
         failures = excluded.failures, error = excluded.error`,
    ).run(uuid, status.powerState, status.checkedAt, status.failures, status.error, uuid);
  }

  async addEvent(uuid: string, event: NewNodeEvent): Promise<void> {
    this.insertEvent(uuid, event, Date.now());
  }

  async tryLock(uuid: string, holder: string, operation: string): Promise<boolean> {
    // A queued patient waiter goes first: short holders must not starve a hand-off.
    const { changes } = this.stmt(
      `UPDATE nodes SET reservation = ?, reservation_operation = ?
       WHERE uuid = ? AND reservation IS NULL AND NOT EXISTS (SELECT 1 FROM node_lock_waiters WHERE node_uuid = ?)`,
    ).run(holder, operation, uuid, uuid);
    return Number(changes) === 1;
  }

  async enqueueLockWaiter(uuid: string, holder: string, operation: string): Promise<number> {
    try {
      const { lastInsertRowid } = this.stmt(
        'INSERT INTO node_lock_waiters (node_uuid, holder, operation, created_at) VALUES (?, ?, ?, ?)',
      ).run(uuid, holder, operation, Date.now());
      return Number(lastInsertRowid);
    } catch (error) {
      if ((error as { code?: string }).code === 'ERR_SQLITE_ERROR' && /FOREIGN KEY/.test((error as Error).message)) {
        throw new MetalcastError(Status.NOT_FOUND, `node ${uuid} no longer exists`);
      }
      throw error;
    }
  }

  async tryLockWithTicket(uuid: string, ticket: number): Promise<boolean> {
    return this.inTransaction(() => {
      const first = this.stmt('SELECT ticket, holder, operation FROM node_lock_waiters WHERE node_uuid = ? ORDER BY ticket LIMIT 1').get(
        uuid,
      ) as { ticket: number; holder: string; operation: string } | undefined;
      if (first?.ticket !== ticket) return false;
      const { changes } = this.stmt(
        'UPDATE nodes SET reservation = ?, reservation_operation = ? WHERE uuid = ? AND reservation IS NULL',
      ).run(first.holder, first.operation, uuid);
      if (Number(changes) === 0) return false;
      this.stmt('DELETE FROM node_lock_waiters WHERE ticket = ?').run(ticket);
      return true;
    });
  }

  async dequeueLockWaiter(ticket: number): Promise<void> {
    this.stmt('DELETE FROM node_lock_waiters WHERE ticket = ?').run(ticket);
  }

  async unlock(uuid: string, holder: string): Promise<boolean> {
    const { changes } = this.stmt(
      'UPDATE nodes SET reservation = NULL, reservation_operation = NULL WHERE uuid = ? AND reservation = ?',
    ).run(uuid, holder);
    return Number(changes) === 1;
  }

  async releaseHolder(holder: string, reason: string, now: EpochMs): Promise<TakeoverResult> {
    return this.inTransaction(() => {
      const stranded = this.stmt(
        `SELECT uuid, name, provision_state FROM nodes
         WHERE reservation = ? AND provision_state IN (${Object.keys(ACTIVE_STATE_FAILURES)
           .map((s) => `'${s}'`)
           .join(',')})`,
      ).all(holder) as { uuid: string; name: string; provision_state: keyof typeof ACTIVE_STATE_FAILURES }[];
      const failed: TimedOutNode[] = [];
      for (const row of stranded) {
        const toState = ACTIVE_STATE_FAILURES[row.provision_state];
        this.stmt(
          `UPDATE nodes SET provision_state = ?, target_provision_state = NULL, last_error = ?, agent_token_hash = NULL,
             agent_api_token = NULL, agent_certificate = NULL, liveness_at = NULL, updated_at = ?, provision_updated_at = ?
           WHERE uuid = ?`,
        ).run(toState, reason, now, now, row.uuid);
        this.insertEvent(row.uuid, { kind: 'takeover', message: reason, actor: 'takeover', fromState: row.provision_state, toState }, now);
        failed.push({ uuid: row.uuid, name: row.name, fromState: row.provision_state, toState, lastError: reason });
      }
      // Every lock let go leaves a trace, so that a node's history shows where one controller's work ended.
      const held = this.stmt('SELECT uuid, reservation_operation FROM nodes WHERE reservation = ?').all(holder) as {
        uuid: string;
        reservation_operation: string | null;
      }[];
      for (const row of held) {
        this.insertEvent(
          row.uuid,
          {
            kind: 'lock_released',
            message: `lock of ${holder} for ${row.reservation_operation ?? 'an operation'} released: ${reason}`,
            actor: 'takeover',
            fromState: null,
            toState: null,
          },
          now,
        );
      }
      const released = Number(
        this.stmt('UPDATE nodes SET reservation = NULL, reservation_operation = NULL WHERE reservation = ?').run(holder).changes,
      );
      this.stmt('DELETE FROM node_lock_waiters WHERE holder = ?').run(holder);
      return { released, failed };
    });
  }

  /** One controller on a local file: its clock is the database's. */
  async clock(): Promise<EpochMs> {
    return Date.now();
  }

  async registerController(id: string, address: string, now: EpochMs): Promise<void> {
    this.stmt(
      `INSERT INTO controllers (id, address, started_at, last_seen_at) VALUES (?, ?, ?, ?)
       ON CONFLICT (id) DO UPDATE SET address = excluded.address, started_at = excluded.started_at, last_seen_at = excluded.last_seen_at`,
    ).run(id, address, now, now);
  }

  async touchController(id: string, now: EpochMs): Promise<boolean> {
    return Number(this.stmt('UPDATE controllers SET last_seen_at = ? WHERE id = ?').run(now, id).changes) === 1;
  }

  async listControllers(): Promise<ControllerRecord[]> {
    const rows = this.stmt('SELECT * FROM controllers ORDER BY id').all() as Row[];
    return rows.map((r) => ({
      id: r.id as string,
      address: r.address as string,
      startedAt: r.started_at as number,
      lastSeenAt: r.last_seen_at as number,
    }));
  }

  async removeController(id: string, seenBefore: EpochMs): Promise<boolean> {
    return Number(this.stmt('DELETE FROM controllers WHERE id = ? AND last_seen_at < ?').run(id, seenBefore).changes) === 1;
  }

  async notify(channel: StoreChannel, payload: string): Promise<void> {
    // Delivered asynchronously, like a database notification: never inside the caller's stack.
    setImmediate(() => this.notifications.emit(channel, payload));
  }

  listen(channel: StoreChannel, handler: (payload: string) => void): () => void {
    const safe = (payload: string) => {
      try {
        handler(payload);
      } catch {
        // A listener's failure is its own; other listeners still hear the notification.
      }
    };
    this.notifications.on(channel, safe);
    return () => this.notifications.off(channel, safe);
  }

  async createImage(image: NewImage): Promise<ImageRecord> {
    return this.inTransaction(() => {
      if (this.stmt('SELECT 1 FROM images WHERE name = ?').get(image.name)) {
        throw new MetalcastError(Status.ALREADY_EXISTS, `an image named '${image.name}' already exists`);
      }
      const now = Date.now();
      this.stmt(
        `INSERT INTO images (name, state, sha256, size_bytes, source_url, expected_checksum, error, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      ).run(image.name, image.state, image.sha256, image.sizeBytes, image.sourceUrl, image.expectedChecksum, image.error, now, now);
      return this.loadImage(image.name) as ImageRecord;
    });
  }

  async getImage(name: string): Promise<ImageRecord | undefined> {
    return this.loadImage(name);
  }

  async listImages(): Promise<ImageRecord[]> {
    return (this.stmt(`SELECT ${IMAGE_COLUMNS} FROM images ORDER BY name`).all() as Row[]).map(toImageRecord);
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
    const sets = ['updated_at = ?'];
    const params: SQLInputValue[] = [Date.now()];
    for (const [key, value] of Object.entries(patch)) {
      if (value === undefined || key === 'extents') continue;
      sets.push(`${columns[key]} = ?`);
      params.push(value as SQLInputValue);
    }
    if (patch.extents) {
      sets.push('extents = ?', 'allocated_bytes = ?', 'extent_count = ?');
      params.push(JSON.stringify(patch.extents), sumExtents(patch.extents), patch.extents.length);
    }
    this.db.prepare(`UPDATE images SET ${sets.join(', ')} WHERE name = ?`).run(...params, name);
    return this.loadImage(name);
  }

  async getImageExtents(name: string): Promise<ImageExtent[] | undefined> {
    const row = this.stmt('SELECT extents FROM images WHERE name = ?').get(name) as { extents: string | null } | undefined;
    return row?.extents ? (JSON.parse(row.extents) as ImageExtent[]) : undefined;
  }

  async putImageManifest(sha256: string, manifest: ChunkManifest): Promise<void> {
    this.stmt(
      `INSERT INTO image_manifests (sha256, size_bytes, chunk_size, chunk_count, root_sha256, digests, zero_bitmap, created_at)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?)
       ON CONFLICT (sha256) DO UPDATE SET size_bytes = excluded.size_bytes, chunk_size = excluded.chunk_size, chunk_count = excluded.chunk_count,
         root_sha256 = excluded.root_sha256, digests = excluded.digests, zero_bitmap = excluded.zero_bitmap, created_at = excluded.created_at`,
    ).run(
      sha256,
      manifest.sizeBytes,
      manifest.chunkSize,
      manifest.digests.length / 32,
      manifest.rootSha256,
      manifest.digests,
      manifest.zeroBitmap,
      Date.now(),
    );
  }

  async getImageManifest(sha256: string): Promise<ChunkManifest | undefined> {
    const row = this.stmt('SELECT * FROM image_manifests WHERE sha256 = ?').get(sha256) as Row | undefined;
    if (!row) return undefined;
    return {
      sizeBytes: row.size_bytes as number,
      chunkSize: row.chunk_size as number,
      rootSha256: row.root_sha256 as string,
      digests: Buffer.from(row.digests as Uint8Array),
      zeroBitmap: Buffer.from(row.zero_bitmap as Uint8Array),
    };
  }

  async deleteImageManifest(sha256: string): Promise<boolean> {
    return Number(this.stmt('DELETE FROM image_manifests WHERE sha256 = ?').run(sha256).changes) > 0;
  }

  async putConfigDrive(record: ConfigDriveRecord): Promise<void> {
    this.stmt(
      `INSERT INTO node_config_drives (node_uuid, gzip, sha256, size_bytes, created_at) VALUES (?, ?, ?, ?, ?)
       ON CONFLICT (node_uuid) DO UPDATE SET gzip = excluded.gzip, sha256 = excluded.sha256, size_bytes = excluded.size_bytes, created_at = excluded.created_at`,
    ).run(record.nodeUuid, record.gzip, record.sha256, record.sizeBytes, record.createdAt);
  }

  async getConfigDrive(nodeUuid: string): Promise<ConfigDriveRecord | undefined> {
    const row = this.stmt('SELECT * FROM node_config_drives WHERE node_uuid = ?').get(nodeUuid) as Row | undefined;
    if (!row) return undefined;
    return {
      nodeUuid: row.node_uuid as string,
      gzip: Buffer.from(row.gzip as Uint8Array),
      sha256: row.sha256 as string,
      sizeBytes: row.size_bytes as number,
      createdAt: row.created_at as number,
    };
  }

  async deleteConfigDrive(nodeUuid: string): Promise<boolean> {
    return Number(this.stmt('DELETE FROM node_config_drives WHERE node_uuid = ?').run(nodeUuid).changes) > 0;
  }

  async deleteImage(name: string): Promise<{ deleted: boolean; contentStillUsed: boolean }> {
    return this.inTransaction(() => {
      const image = this.loadImage(name);
      if (!image) return { deleted: false, contentStillUsed: false };
      // The deploy spec is JSON; the image name is compared exactly after extraction.
      const user = this.stmt(
        `SELECT name FROM nodes WHERE provision_state IN ('deploying', 'deploy_wait') AND json_extract(deploy, '$.image') = ? LIMIT 1`,
      ).get(name) as { name: string } | undefined;
      if (user) {
        throw new MetalcastError(
          Status.FAILED_PRECONDITION,
          `image '${name}' is being deployed to node '${user.name}'; delete it after that deploy ends`,
        );
      }
      this.stmt('DELETE FROM images WHERE name = ?').run(name);
      const shared = image.sha256 !== '' && this.stmt('SELECT 1 FROM images WHERE sha256 = ? LIMIT 1').get(image.sha256) !== undefined;
      return { deleted: true, contentStillUsed: shared };
    });
  }

  private loadImage(name: string): ImageRecord | undefined {
    const row = this.stmt(`SELECT ${IMAGE_COLUMNS} FROM images WHERE name = ?`).get(name) as Row | undefined;
    return row ? toImageRecord(row) : undefined;
  }

  async createOperatorToken(record: OperatorTokenRecord): Promise<void> {
    try {
      this.insertOperatorToken(record);
    } catch (error) {
      if ((error as { code?: string }).code === 'ERR_SQLITE_ERROR' && /UNIQUE/.test((error as Error).message)) {
        throw new MetalcastError(Status.ALREADY_EXISTS, `an operator token with id ${record.id} or the same hash already exists`);
      }
      throw error;
    }
  }

  async createFirstOperatorToken(record: OperatorTokenRecord): Promise<boolean> {
    return this.inTransaction(() => {
      if (this.stmt('SELECT 1 FROM operator_tokens LIMIT 1').get()) return false;
      this.insertOperatorToken(record);
      return true;
    });
  }

  private insertOperatorToken(record: OperatorTokenRecord): void {
    this.stmt('INSERT INTO operator_tokens (id, token_hash, role, description, created_at, last_used_at) VALUES (?, ?, ?, ?, ?, ?)').run(
      record.id,
      record.tokenHash,
      record.role,
      record.description,
      record.createdAt,
      record.lastUsedAt,
    );
  }

  async findOperatorTokenByHash(tokenHash: string): Promise<OperatorTokenRecord | undefined> {
    const row = this.stmt('SELECT * FROM operator_tokens WHERE token_hash = ?').get(tokenHash) as Row | undefined;
    return row ? toOperatorTokenRecord(row) : undefined;
  }

  async listOperatorTokens(): Promise<OperatorTokenRecord[]> {
    return (this.stmt('SELECT * FROM operator_tokens ORDER BY created_at, id').all() as Row[]).map(toOperatorTokenRecord);
  }

  async deleteOperatorToken(id: string): Promise<boolean> {
    return Number(this.stmt('DELETE FROM operator_tokens WHERE id = ?').run(id).changes) > 0;
  }

  async touchOperatorToken(id: string, now: EpochMs): Promise<void> {
    this.stmt('UPDATE operator_tokens SET last_used_at = ? WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)').run(now, id, now);
  }

  async ensureClusterSecret(candidate: string): Promise<string> {
    this.stmt('INSERT INTO cluster_secret (id, secret, created_at) VALUES (1, ?, ?) ON CONFLICT (id) DO NOTHING').run(
      candidate,
      Date.now(),
    );
    return (this.stmt('SELECT secret FROM cluster_secret WHERE id = 1').get() as { secret: string }).secret;
  }

  async close(): Promise<void> {
    this.statements.clear();
    if (this.db.isOpen) this.db.close();
  }

  /** For benchmarks and tests that need many rows fast; not part of Store. */
  bulkInsertForBench(rows: { uuid: string; name: string; state: ProvisionState; livenessAt: EpochMs | null }[]): void {
    this.inTransaction(() => {
      const insert = this.stmt(
        `INSERT INTO nodes (uuid, name, provision_state, liveness_at, last_heartbeat_at, ring_hash, created_at, updated_at, provision_updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      );
      const now = Date.now();
      for (const r of rows) insert.run(r.uuid, r.name, r.state, r.livenessAt, r.livenessAt, ringHash(r.uuid), now, now, now);
    });
  }
}

/** SQL that keeps only rows whose ring hash lies in one of the ranges. */
function rangeFilter(ranges: readonly HashRange[]): { sql: string; params: number[] } {
  return {
    sql: ` AND (${ranges.map(() => '(ring_hash >= ? AND ring_hash < ?)').join(' OR ')})`,
    params: ranges.flatMap((r) => [r.from, r.to]),
  };
}

function toOperatorTokenRecord(row: Row): OperatorTokenRecord {
  return {
    id: row.id as string,
    tokenHash: row.token_hash as string,
    role: row.role as OperatorRole,
    description: row.description as string,
    createdAt: row.created_at as number,
    lastUsedAt: (row.last_used_at as number | null) ?? null,
  };
}

function toImageRecord(row: Row): ImageRecord {
  return {
    name: row.name as string,
    state: row.state as ImageState,
    sha256: row.sha256 as string,
    sizeBytes: row.size_bytes as number,
    sourceUrl: row.source_url as string,
    expectedChecksum: row.expected_checksum as string,
    error: row.error as string,
    format: row.format as ImageRecord['format'],
    sourceSha256: row.source_sha256 as string,
    sourceSizeBytes: row.source_size_bytes as number,
    allocatedBytes: (row.allocated_bytes as number | null) ?? null,
    extentCount: row.extent_count as number,
    createdAt: row.created_at as number,
    updatedAt: row.updated_at as number,
  };
}

/** Every image column but the (possibly large) extents, which only getImageExtents reads. */
const IMAGE_COLUMNS =
  'name, state, sha256, size_bytes, source_url, expected_checksum, error, format, source_size_bytes, source_sha256, allocated_bytes, extent_count, created_at, updated_at';

function sumExtents(extents: readonly ImageExtent[]): number {
  return extents.reduce((sum, [, length]) => sum + length, 0);
}

function toNodeRecord(row: Row, macAddresses: string[]): NodeRecord {
  return {
    uuid: row.uuid as string,
    name: row.name as string,
    provisionState: row.provision_state as ProvisionState,
    targetProvisionState: (row.target_provision_state as ProvisionState | null) ?? null,
    maintenance: row.maintenance === 1,
    maintenanceReason: row.maintenance_reason as string,
    lastError: row.last_error as string,
    macAddresses,
    properties: JSON.parse(row.properties as string) as Record<string, string>,
    secrets: JSON.parse(row.secrets as string) as Record<string, string>,
    agentAddress: row.agent_address as string,
    agentVersion: row.agent_version as string,
    agentStatus: row.agent_status as string,
    agentTokenHash: (row.agent_token_hash as string | null) ?? null,
    agentApiToken: (row.agent_api_token as string | null) ?? null,
    agentCertificatePem: (row.agent_certificate as string | null) ?? null,
    lastHeartbeatAt: (row.last_heartbeat_at as number | null) ?? null,
    livenessAt: (row.liveness_at as number | null) ?? null,
    reservation: (row.reservation as string | null) ?? null,
    reservationOperation: (row.reservation_operation as string | null) ?? null,
    inventoryJson: (row.inventory as string | null) ?? null,
    deployJson: (row.deploy as string | null) ?? null,
    progressJson: (row.progress as string | null) ?? null,
    createdAt: row.created_at as number,
    updatedAt: row.updated_at as number,
    provisionUpdatedAt: row.provision_updated_at as number,
  };
}
