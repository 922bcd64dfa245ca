/**
 * The sweep benchmark: how long SqliteStore.sweepTimedOut takes in a large
 * fleet, and whether that grows with the fleet (it should not) or with the
 * number of timed-out nodes (it should).
 *
 * Two real SQLite stores (files in WAL mode, as in production) hold a small
 * and a large fleet: most nodes active or available, a share in wait states
 * with live agents, and a fixed number of wait nodes whose agents went
 * silent. Between measured sweeps a second connection re-arms those nodes
 * (puts them back in their wait state with an old liveness clock), so every
 * measured sweep fails exactly the same number of nodes.
 *
 * Baselines, measured in the same run and interleaved with ours because
 * these machines are noisy:
 * - naive: SELECT every node in a wait state, filter in JavaScript, fail the
 *   timed-out ones one UPDATE at a time (same writes and events as ours);
 * - full scan: the sweep's own WHERE clause with NOT INDEXED, read only; a
 *   lower bound for the sweep without its index, since it writes nothing.
 */
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { DatabaseSync, type StatementSync } from 'node:sqlite';
import { type ProvisionState, WAIT_STATE_FAILURES, WAIT_STATES, type WaitState } from '../controller/provisioning/states.js';
import { SqliteStore } from '../controller/store/sqlite.js';
import type { EpochMs } from '../controller/store/store.js';
import {
  type BenchCheck,
  type BenchResult,
  BenchUsageError,
  breathe,
  columns,
  formatCount,
  formatMs,
  formatRatio,
  type NumberOptions,
  parseNumberOptions,
  summarize,
  type Timings,
  withTempDir,
} from './harness.js';

export const description = 'sweep of timed-out nodes in a 10k and a 100k fleet, against a naive sweep and a full scan';

export const options = {
  nodes: { default: 100_000, integer: true, description: 'nodes in the large fleet' },
  'small-nodes': { default: 0, integer: true, description: 'nodes in the small fleet (0: a tenth of --nodes)' },
  'timed-out': { default: 100, integer: true, description: 'nodes each sweep finds timed out' },
  'many-timed-out': { default: 0, integer: true, description: 'timed-out nodes for the growth-with-timeouts case (0: 10 x --timed-out)' },
  'wait-percent': { default: 5, description: 'percent of the fleet in a wait state (live agents plus the timed-out ones)' },
  runs: { default: 60, integer: true, description: 'measured runs per case, interleaved across cases' },
  warmup: { default: 5, integer: true, description: 'unmeasured runs per case before those' },
} satisfies NumberOptions;

/** The controller's default --heartbeat-timeout. */
const TIMEOUT_MS = 120_000;

/** Names of the nodes a fleet can arm to time out sort together: `stale-0000` .. `stale-0999`. */
const STALE_PREFIX = 'stale-';
const STALE_END = 'stale.'; // '.' sorts right after '-'

const WAIT_LIST = WAIT_STATES.map((s) => `'${s}'`).join(', ');

interface Fleet {
  nodes: number;
  /** Wait-state nodes, live or timed out. */
  waiting: number;
  /** How many `stale-` nodes exist, that is the most this fleet can arm. */
  staleCapacity: number;
  staleNameWidth: number;
  buildMs: number;
  store: SqliteStore;
  /** Re-arms timed-out nodes between measurements; its write also resets every other connection's page cache, equally for all cases. */
  admin: DatabaseSync;
  rearmStatement: StatementSync;
  /** Runs the baselines, on its own connection as the store does. */
  baseline: DatabaseSync;
  naiveSelect: StatementSync;
  naiveFail: StatementSync;
  naiveEvent: StatementSync;
  scan: StatementSync;
}

type Kind = 'sweep' | 'naive' | 'scan';

interface Case {
  key: string;
  label: string;
  kind: Kind;
  fleet: Fleet;
  armed: number;
  samples: number[];
}

export async function run(args: string[]): Promise<BenchResult> {
  const o = parseOptions(args);
  return withTempDir('metalcast-bench-sweep-', async (dir) => {
    const now = Date.now();
    const cutoff = now - TIMEOUT_MS;
    const random = mulberry32(0x5eed);

    console.log(
      `sweep: fleets of ${formatCount(o.smallNodes)} and ${formatCount(o.nodes)} nodes, ${o.waitPercent}% in wait states, ` +
        `${formatCount(o.timedOut)} timed out per sweep (${formatCount(o.manyTimedOut)} for the growth case), heartbeat timeout ${TIMEOUT_MS / 1000}s`,
    );
    const fleets: Fleet[] = [];
    try {
      const small = buildFleet(join(dir, 'small.db'), o.smallNodes, o.timedOut, o.waitPercent, now, random);
      fleets.push(small);
      const large = buildFleet(join(dir, 'large.db'), o.nodes, o.manyTimedOut, o.waitPercent, now, random);
      fleets.push(large);
      const sqliteVersion = (small.admin.prepare('SELECT sqlite_version() AS v').get() as { v: string }).v;
      console.log(
        `  built in ${formatMs(small.buildMs)} and ${formatMs(large.buildMs)} (${small.waiting} and ${large.waiting} nodes waiting); ` +
          `SQLite ${sqliteVersion}, Node ${process.version}, files in ${dir}`,
      );

      // The first sweep of each store prepares its statement: record the SQL,
      // so that the plan below is the real statement's and not a copy.
      const checks: BenchCheck[] = [];
      let sweepSql = '';
      for (const fleet of fleets) {
        rearm(fleet, o.timedOut, now);
        const first = await captureSweepSql(fleet.store, now, cutoff);
        sweepSql = first.sql;
        checks.push({
          name: `first sweep of ${formatCount(fleet.nodes)} nodes fails exactly the timed-out nodes`,
          ok: first.failed === o.timedOut,
          detail: `failed ${first.failed} of ${o.timedOut} timed-out nodes`,
        });
      }
      const sweepPlan = explain(large.admin, sweepSql);
      const usesIndex = sweepPlan.some((line) => /\bUSING (COVERING )?INDEX nodes_state_liveness\b/.test(line));
      const scansTable = sweepPlan.some((line) => /\bSCAN nodes\b/.test(line));
      checks.push({
        name: "sweep's UPDATE searches nodes_state_liveness",
        ok: usesIndex && !scansTable,
        detail: sweepPlan.join(' / '),
      });
      console.log("\n  query plan of the sweep's UPDATE, as SqliteStore.sweepTimedOut prepares it:");
      for (const line of sweepPlan) console.log(`    ${line}`);
      console.log('  baselines:');
      console.log(`    naive:     ${explain(large.admin, naiveSelectSql()).join(' / ')}`);
      console.log(`    full scan: ${explain(large.admin, scanSql()).join(' / ')}`);
      console.log(`  ${usesIndex && !scansTable ? 'ok' : 'NOT OK'}: the sweep reads the index range of timed-out nodes, not the table`);

      const s = shortCount(small.nodes);
      const l = shortCount(large.nodes);
      const cases: Case[] = [
        newCase('sweep_small', `sweep     ${s} nodes, ${o.timedOut} timed out`, 'sweep', small, o.timedOut),
        newCase('sweep_large', `sweep     ${l} nodes, ${o.timedOut} timed out`, 'sweep', large, o.timedOut),
        newCase('sweep_large_many', `sweep     ${l} nodes, ${o.manyTimedOut} timed out`, 'sweep', large, o.manyTimedOut),
        newCase('naive_small', `naive     ${s} nodes, ${o.timedOut} timed out`, 'naive', small, o.timedOut),
        newCase('naive_large', `naive     ${l} nodes, ${o.timedOut} timed out`, 'naive', large, o.timedOut),
        newCase('scan_small', `full scan ${s} nodes, ${o.timedOut} timed out`, 'scan', small, o.timedOut),
        newCase('scan_large', `full scan ${l} nodes, ${o.timedOut} timed out`, 'scan', large, o.timedOut),
      ];

      console.log(`\n  measuring ${cases.length} cases x ${o.runs} runs (after ${o.warmup} warm-up runs), interleaved...`);
      const started = performance.now();
      for (let i = 0; i < o.warmup + o.runs; i++) {
        // Rotate the order so that no case always follows the same neighbour.
        for (let j = 0; j < cases.length; j++) {
          const c = cases[(i + j) % cases.length]!;
          const ms = await measure(c, now, cutoff);
          if (i >= o.warmup) c.samples.push(ms);
        }
      }
      console.log(`  measured in ${formatMs(performance.now() - started)}\n`);

      const t = Object.fromEntries(cases.map((c) => [c.key, summarize(c.samples)])) as Record<string, Timings>;
      const rows = [
        ['', 'median', 'p90', 'min', 'per timed-out node (median)'],
        ...cases.map((c) => {
          const x = t[c.key]!;
          return [c.label, formatMs(x.median), formatMs(x.p90), formatMs(x.min), formatMs(x.median / c.armed)];
        }),
      ];
      for (const line of columns(rows, [false, true, true, true, true])) console.log(`  ${line}`);

      const ratio = (a: string, b: string) => t[a]!.median / t[b]!.median;
      const fleetGrowth = ratio('sweep_large', 'sweep_small');
      const naiveFleetGrowth = ratio('naive_large', 'naive_small');
      const scanFleetGrowth = ratio('scan_large', 'scan_small');
      const timeoutGrowth = ratio('sweep_large_many', 'sweep_large');
      const naiveOverSweep = ratio('naive_large', 'sweep_large');
      const scanOverSweep = ratio('scan_large', 'sweep_large');
      const fleetFactor = large.nodes / small.nodes;
      const timeoutFactor = o.manyTimedOut / o.timedOut;

      console.log('\n  ratios of medians:');
      const ratioRows = [
        [
          `  fleet ${s} -> ${l} (${formatRatio(fleetFactor)}), ${o.timedOut} timed out:`,
          `sweep ${formatRatio(fleetGrowth)}`,
          `naive ${formatRatio(naiveFleetGrowth)}`,
          `full scan ${formatRatio(scanFleetGrowth)}`,
        ],
        [
          `  timed out ${o.timedOut} -> ${o.manyTimedOut} (${formatRatio(timeoutFactor)}), ${l} nodes:`,
          `sweep ${formatRatio(timeoutGrowth)}`,
        ],
        [`  baseline / sweep at ${l} nodes:`, `naive ${formatRatio(naiveOverSweep)}`, `full scan ${formatRatio(scanOverSweep)}`],
      ];
      for (const line of columns(ratioRows)) console.log(`  ${line}`);
      console.log(
        `\n  the sweep ${describeGrowth(fleetGrowth, fleetFactor)} as the fleet grows ${formatRatio(fleetFactor)} ` +
          `and grows ${formatRatio(timeoutGrowth)} with ${formatRatio(timeoutFactor)} the timed-out nodes; ` +
          `the naive sweep grows ${formatRatio(naiveFleetGrowth)} with the fleet`,
      );
      console.log(
        '  (each run follows a re-arm written by another connection, so SQLite page caches start cold, OS cache warm, for every case alike)',
      );

      const metrics: Record<string, number> = {
        nodes_count: large.nodes,
        small_nodes_count: small.nodes,
        wait_nodes_count: large.waiting,
        small_wait_nodes_count: small.waiting,
        timed_out_count: o.timedOut,
        many_timed_out_count: o.manyTimedOut,
        runs_count: o.runs,
        build_small_ms: round(small.buildMs),
        build_large_ms: round(large.buildMs),
      };
      for (const c of cases) {
        metrics[`${c.key}_median_ms`] = round(t[c.key]!.median);
        metrics[`${c.key}_p90_ms`] = round(t[c.key]!.p90);
      }
      Object.assign(metrics, {
        fleet_growth_ratio: round(fleetGrowth),
        naive_fleet_growth_ratio: round(naiveFleetGrowth),
        scan_fleet_growth_ratio: round(scanFleetGrowth),
        timeout_growth_ratio: round(timeoutGrowth),
        naive_over_sweep_ratio: round(naiveOverSweep),
        scan_over_sweep_ratio: round(scanOverSweep),
      });
      return {
        headline:
          `sweep ${formatMs(t.sweep_large!.median)} at ${l}; ${s}->${l} ${formatRatio(fleetGrowth)}, ` +
          `timeouts ${o.timedOut}->${o.manyTimedOut} ${formatRatio(timeoutGrowth)}, naive/sweep ${formatRatio(naiveOverSweep)}`,
        metrics,
        checks,
      };
    } finally {
      for (const fleet of fleets) {
        await fleet.store.close();
        fleet.admin.close();
        fleet.baseline.close();
      }
    }
  });
}

function parseOptions(args: string[]) {
  const raw = parseNumberOptions(args, options);
  const smallNodes = raw['small-nodes'] || Math.round(raw.nodes / 10);
  const timedOut = raw['timed-out'];
  const manyTimedOut = raw['many-timed-out'] || timedOut * 10;
  const problems = [
    raw.nodes < 1 && '--nodes must be at least 1',
    smallNodes >= raw.nodes && `--small-nodes (${smallNodes}) must be smaller than --nodes (${raw.nodes})`,
    timedOut < 1 && '--timed-out must be at least 1',
    timedOut > smallNodes && `--timed-out (${timedOut}) cannot exceed the small fleet (${smallNodes} nodes)`,
    manyTimedOut <= timedOut && `--many-timed-out (${manyTimedOut}) must be larger than --timed-out (${timedOut})`,
    manyTimedOut > raw.nodes && `--many-timed-out (${manyTimedOut}) cannot exceed --nodes (${raw.nodes})`,
    raw['wait-percent'] > 100 && `--wait-percent (${raw['wait-percent']}) is a percentage, at most 100`,
    raw.runs < 1 && '--runs must be at least 1',
  ].filter((p): p is string => typeof p === 'string');
  if (problems.length > 0) throw new BenchUsageError(problems.join('; '));
  return { nodes: raw.nodes, smallNodes, timedOut, manyTimedOut, waitPercent: raw['wait-percent'], runs: raw.runs, warmup: raw.warmup };
}

function newCase(key: string, label: string, kind: Kind, fleet: Fleet, armed: number): Case {
  return { key, label, kind, fleet, armed, samples: [] };
}

/** Fills a store in `path` with a shuffled fleet; its `stale-` nodes start in a wait state with live agents. */
function buildFleet(path: string, nodes: number, staleCapacity: number, waitPercent: number, now: EpochMs, random: () => number): Fleet {
  const started = performance.now();
  const waiting = Math.max(staleCapacity, Math.round((nodes * waitPercent) / 100));
  const staleNameWidth = String(staleCapacity).length;
  const live = () => now - Math.floor(random() * TIMEOUT_MS * 0.9);
  const rows: { uuid: string; name: string; state: ProvisionState; livenessAt: EpochMs | null }[] = [];
  for (let i = 0; i < waiting; i++) {
    const name = i < staleCapacity ? staleName(i, staleNameWidth) : `wait-${i}`;
    rows.push({ uuid: randomUUID(), name, state: WAIT_STATES[i % WAIT_STATES.length]!, livenessAt: live() });
  }
  for (let i = waiting; i < nodes; i++) {
    const r = random();
    const state: ProvisionState = r < 0.75 ? 'active' : r < 0.95 ? 'available' : 'manageable';
    rows.push({ uuid: randomUUID(), name: `node-${i}`, state, livenessAt: null });
  }
  // Shuffle, so that the timed-out nodes are scattered over the table as in life.
  for (let i = rows.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [rows[i], rows[j]] = [rows[j]!, rows[i]!];
  }
  const store = SqliteStore.open(path);
  store.bulkInsertForBench(rows);

  const admin = openConnection(path);
  const failedToWait = Object.entries(WAIT_STATE_FAILURES)
    .map(([wait, failed]) => `WHEN '${failed}' THEN '${wait}'`)
    .join(' ');
  const rearmStatement = admin.prepare(
    `UPDATE nodes SET
       provision_state = CASE provision_state ${failedToWait} ELSE provision_state END,
       liveness_at = CASE WHEN name < ? THEN ? - abs(random() % 3600000) ELSE ? END,
       last_error = ''
     WHERE name >= '${STALE_PREFIX}' AND name < '${STALE_END}'`,
  );
  const baseline = openConnection(path);
  return {
    nodes,
    waiting,
    staleCapacity,
    staleNameWidth,
    buildMs: performance.now() - started,
    store,
    admin,
    rearmStatement,
    baseline,
    naiveSelect: baseline.prepare(naiveSelectSql()),
    naiveFail: baseline.prepare(
      `UPDATE nodes SET provision_state = ?, target_provision_state = NULL, agent_token_hash = NULL, last_error = ?,
         updated_at = ?, provision_updated_at = ?
       WHERE uuid = ? AND provision_state = ?`,
    ),
    naiveEvent: baseline.prepare(
      `INSERT INTO node_events (node_uuid, time, kind, message, actor, from_state, to_state) VALUES (?, ?, 'timeout', ?, 'sweep', ?, ?)`,
    ),
    scan: baseline.prepare(scanSql()),
  };
}

function openConnection(path: string): DatabaseSync {
  const db = new DatabaseSync(path);
  db.exec('PRAGMA busy_timeout = 5000');
  return db;
}

function staleName(i: number, width: number): string {
  return `${STALE_PREFIX}${String(i).padStart(width, '0')}`;
}

/** Puts the first `armed` stale nodes back in their wait state, silent for longer than the timeout; the other stale nodes live. */
function rearm(fleet: Fleet, armed: number, now: EpochMs): void {
  if (armed > fleet.staleCapacity) throw new Error(`cannot arm ${armed} nodes in a fleet built with ${fleet.staleCapacity} stale nodes`);
  fleet.rearmStatement.run(staleName(armed, fleet.staleNameWidth), now - TIMEOUT_MS - 1000, now - 1000);
}

async function measure(c: Case, now: EpochMs, cutoff: EpochMs): Promise<number> {
  rearm(c.fleet, c.armed, now);
  await breathe();
  let found: number;
  const started = performance.now();
  switch (c.kind) {
    case 'sweep':
      found = (await c.fleet.store.sweepTimedOut(now, cutoff, TIMEOUT_MS)).length;
      break;
    case 'naive':
      found = naiveSweep(c.fleet, now, cutoff);
      break;
    case 'scan':
      found = c.fleet.scan.all(cutoff).length;
      break;
  }
  const ms = performance.now() - started;
  if (found !== c.armed) throw new Error(`${c.label}: found ${found} timed-out nodes, expected ${c.armed}; the re-arm is broken`);
  return ms;
}

function naiveSelectSql(): string {
  return `SELECT uuid, name, provision_state, liveness_at, last_heartbeat_at, reservation, maintenance
          FROM nodes WHERE provision_state IN (${WAIT_LIST})`;
}

function scanSql(): string {
  return `SELECT uuid FROM nodes NOT INDEXED
          WHERE provision_state IN (${WAIT_LIST}) AND liveness_at < ? AND reservation IS NULL AND maintenance = 0`;
}

/** The sweep as one might first write it: load every waiting node, decide in JavaScript, fail them one by one. */
function naiveSweep(fleet: Fleet, now: EpochMs, cutoff: EpochMs): number {
  const rows = fleet.naiveSelect.all() as {
    uuid: string;
    name: string;
    provision_state: WaitState;
    liveness_at: number | null;
    last_heartbeat_at: number | null;
    reservation: string | null;
    maintenance: number;
  }[];
  const timedOut = rows.filter((r) => r.liveness_at !== null && r.liveness_at < cutoff && r.reservation === null && r.maintenance === 0);
  const timeoutS = Math.round(TIMEOUT_MS / 1000);
  let failed = 0;
  fleet.baseline.exec('BEGIN IMMEDIATE');
  try {
    for (const node of timedOut) {
      const silentS = Math.floor((now - (node.liveness_at ?? now)) / 1000);
      const to = WAIT_STATE_FAILURES[node.provision_state];
      const message =
        node.last_heartbeat_at === null
          ? `no heartbeat from the agent since the node entered ${node.provision_state.replace('_', ' ')} ${silentS}s ago (timeout ${timeoutS}s)`
          : `no heartbeat from the agent for ${silentS}s (timeout ${timeoutS}s)`;
      const { changes } = fleet.naiveFail.run(to, message, now, now, node.uuid, node.provision_state);
      if (Number(changes) === 0) continue;
      fleet.naiveEvent.run(node.uuid, now, message, node.provision_state, to);
      failed++;
    }
    fleet.baseline.exec('COMMIT');
  } catch (error) {
    fleet.baseline.exec('ROLLBACK');
    throw error;
  }
  return failed;
}

/** Runs one sweep while recording every SQL statement prepared on any connection; returns the sweep's UPDATE. */
async function captureSweepSql(store: SqliteStore, now: EpochMs, cutoff: EpochMs): Promise<{ sql: string; failed: number }> {
  const prepared: string[] = [];
  const original = DatabaseSync.prototype.prepare;
  DatabaseSync.prototype.prepare = function (this: DatabaseSync, sql: string, ...rest: unknown[]) {
    prepared.push(sql);
    return Reflect.apply(original, this, [sql, ...rest]) as StatementSync;
  };
  let failed: number;
  try {
    failed = (await store.sweepTimedOut(now, cutoff, TIMEOUT_MS)).length;
  } finally {
    DatabaseSync.prototype.prepare = original;
  }
  const sql = prepared.find((s) => /^\s*UPDATE\s+nodes\b/i.test(s) && /\bRETURNING\b/i.test(s));
  if (!sql) {
    throw new Error(
      `the first sweepTimedOut prepared no "UPDATE nodes ... RETURNING" (it prepared ${prepared.length} statements); ` +
        'has SqliteStore changed how it sweeps, or was its statement already cached?',
    );
  }
  return { sql, failed };
}

/** EXPLAIN QUERY PLAN of `sql`, as indented lines; parameters stay unbound, which does not change the plan. */
function explain(db: DatabaseSync, sql: string): string[] {
  const rows = db.prepare(`EXPLAIN QUERY PLAN ${sql}`).all() as { id: number; parent: number; detail: string }[];
  const depth = new Map<number, number>([[0, 0]]);
  return rows.map((row) => {
    const d = (depth.get(row.parent) ?? 0) + 1;
    depth.set(row.id, d);
    return `${'  '.repeat(d - 1)}${row.detail}`;
  });
}

/** How a time that grew `ratio` while its input grew `factor` scales with that input. */
function describeGrowth(ratio: number, factor: number): string {
  if (ratio < 1 + Math.log10(factor) / 2) return 'stays nearly flat (only b-tree depth grows, logarithmically)';
  if (ratio < factor / 2) return 'grows, though less than linearly,';
  return 'GROWS LINEARLY';
}

function shortCount(n: number): string {
  return n % 1000 === 0 ? `${n / 1000}k` : formatCount(n);
}

function round(x: number): number {
  return Math.round(x * 1000) / 1000;
}

/** A small seeded PRNG, so that every run builds a fleet of the same shape. */
function mulberry32(seed: number): () => number {
  let a = seed;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
