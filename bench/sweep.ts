/**
 * The sweep benchmark: how long Store.sweepTimedOut takes in a large
 * fleet, and whether that grows with the fleet (it should not) or with the
 * number of timed-out nodes (it should).
 *
 * Two real stores hold a small and a large fleet: most nodes active or
 * available, a share in wait states with live agents, and a fixed number of
 * wait nodes whose agents went silent. Between measured sweeps a second
 * connection re-arms those nodes (puts them back in their wait state with
 * an old liveness clock), so every measured sweep fails exactly the same
 * number of nodes.
 *
 * `--database sqlite` (the default) uses SqliteStore on files in WAL mode,
 * as in production; `--database postgres` uses PostgresStore, each fleet in
 * a fresh schema of `--database-url` that is dropped at the end; `both`
 * builds all four fleets, interleaves all their cases and prints the two
 * databases side by side.
 *
 * Baselines, measured in the same run and interleaved with ours because
 * these machines are noisy:
 * - naive: SELECT every node in a wait state, filter in JavaScript, fail the
 *   timed-out ones one UPDATE at a time (same writes and events as ours);
 * - full scan: the sweep's own WHERE clause read without its index (SQLite:
 *   NOT INDEXED; PostgreSQL: a connection with index scans turned off), read
 *   only; a lower bound for the sweep without its index, since it writes nothing.
 */
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { DatabaseSync, type StatementSync } from 'node:sqlite';
import { Client, Pool } from 'pg';
import { type ProvisionState, WAIT_STATE_FAILURES, WAIT_STATES, type WaitState } from '../controller/provisioning/states.js';
import { PostgresStore } from '../controller/store/postgres.js';
import { SqliteStore } from '../controller/store/sqlite.js';
import type { EpochMs } from '../controller/store/store.js';
import { type TestSchema, withPostgresSchema } from '../test/helpers/postgres.js';
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

const DATABASES = ['sqlite', 'postgres', 'both'] as const;
const DEFAULT_DATABASE_URL = 'postgres://postgres@127.0.0.1:5432/test';

export const description =
  'sweep of timed-out nodes in a 10k and a 100k fleet, against a naive sweep and a full scan ' +
  `(--database sqlite|postgres|both, default sqlite; --database-url, default ${DEFAULT_DATABASE_URL})`;

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

/** Back from a failed state to the wait state it came from, for the re-arm. */
const FAILED_TO_WAIT = Object.entries(WAIT_STATE_FAILURES)
  .map(([wait, failed]) => `WHEN '${failed}' THEN '${wait}'`)
  .join(' ');

type Kind = 'sweep' | 'naive' | 'scan';

/** One fleet in one database, with the work of each case on it. */
interface Fleet {
  nodes: number;
  /** Wait-state nodes, live or timed out. */
  waiting: number;
  /** How many `stale-` nodes exist, that is the most this fleet can arm. */
  staleCapacity: number;
  staleNameWidth: number;
  buildMs: number;
  /** Puts the first `armed` stale nodes back in their wait state, silent for longer than the timeout, from a connection of its own. */
  rearm(armed: number): Promise<void>;
  /** Each case's work; returns how many timed-out nodes it found. */
  work: Record<Kind, () => Promise<number>>;
  close(): Promise<void>;
}

/** The fleets of one database and how its report differs. */
interface Engine {
  name: 'SQLite' | 'PostgreSQL';
  /** Before each metric's name: '' for SQLite (the names the benchmark always had), 'pg_' for PostgreSQL. */
  metricPrefix: string;
  small: Fleet;
  large: Fleet;
  /** What the re-arm between runs does to caches, for the reader of the numbers. */
  cacheNote: string;
}

interface Case {
  key: string;
  label: string;
  kind: Kind;
  engine: Engine;
  fleet: Fleet;
  armed: number;
  samples: number[];
}

type Options = ReturnType<typeof parseOptions>;

interface FleetRow {
  uuid: string;
  name: string;
  state: ProvisionState;
  livenessAt: EpochMs | null;
}

export async function run(args: string[]): Promise<BenchResult> {
  const o = parseOptions(args);
  return withTempDir('metalcast-bench-sweep-', async (dir) => {
    const now = Date.now();
    const cutoff = now - TIMEOUT_MS;

    console.log(
      `sweep: fleets of ${formatCount(o.smallNodes)} and ${formatCount(o.nodes)} nodes, ${o.waitPercent}% in wait states, ` +
        `${formatCount(o.timedOut)} timed out per sweep (${formatCount(o.manyTimedOut)} for the growth case), heartbeat timeout ${TIMEOUT_MS / 1000}s`,
    );
    const checks: BenchCheck[] = [];
    const fleets: Fleet[] = [];
    const engines: Engine[] = [];
    try {
      if (o.database !== 'postgres') engines.push(await openSqlite(dir, o, now, cutoff, checks, fleets));
      if (o.database !== 'sqlite') engines.push(await openPostgres(o.databaseUrl, o, now, cutoff, checks, fleets));

      const cases = engines.flatMap((engine) => casesOf(engine, o));
      console.log(`\n  measuring ${cases.length} cases x ${o.runs} runs (after ${o.warmup} warm-up runs), interleaved...`);
      const started = performance.now();
      for (let i = 0; i < o.warmup + o.runs; i++) {
        // Rotate the order so that no case always follows the same neighbour.
        for (let j = 0; j < cases.length; j++) {
          const c = cases[(i + j) % cases.length]!;
          const ms = await measure(c);
          if (i >= o.warmup) c.samples.push(ms);
        }
      }
      console.log(`  measured in ${formatMs(performance.now() - started)}`);

      const metrics: Record<string, number> = {};
      const headlines: string[] = [];
      const medians = new Map<string, number>();
      for (const engine of engines) {
        if (engines.length > 1 || engine.name !== 'SQLite') console.log(`\n  ${engine.name}:`);
        const report = reportEngine(
          engine,
          cases.filter((c) => c.engine === engine),
          o,
        );
        Object.assign(metrics, report.metrics);
        headlines.push(engines.length > 1 || engine.name !== 'SQLite' ? `${engine.name} ${report.headline}` : report.headline);
        for (const [key, median] of report.medians) medians.set(`${engine.name}:${key}`, median);
      }
      if (engines.length > 1) printSideBySide(cases, engines, medians);
      return { headline: headlines.join('; '), metrics, checks };
    } finally {
      for (const fleet of fleets) await fleet.close();
    }
  });
}

function parseOptions(args: string[]) {
  const { database, databaseUrl, rest } = takeDatabaseFlags(args);
  const raw = parseNumberOptions(rest, options);
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
  return {
    nodes: raw.nodes,
    smallNodes,
    timedOut,
    manyTimedOut,
    waitPercent: raw['wait-percent'],
    runs: raw.runs,
    warmup: raw.warmup,
    database,
    databaseUrl,
  };
}

/** Takes `--database` and `--database-url` (strings) out of `args`, leaving the numeric flags to the harness. */
function takeDatabaseFlags(args: string[]): { database: (typeof DATABASES)[number]; databaseUrl: string; rest: string[] } {
  const strings: Record<string, string> = {};
  const rest: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i] as string;
    const [flag, inline] = arg.split(/=(.*)/s, 2) as [string, string | undefined];
    if (flag !== '--database' && flag !== '--database-url') {
      rest.push(arg);
      continue;
    }
    const value = inline ?? args[++i];
    if (value === undefined || value.startsWith('--')) throw new BenchUsageError(`${flag} needs a value`);
    strings[flag] = value;
  }
  const database = strings['--database'] ?? 'sqlite';
  if (!(DATABASES as readonly string[]).includes(database)) {
    throw new BenchUsageError(`--database '${database}' is not one of ${DATABASES.join(', ')}`);
  }
  return { database: database as (typeof DATABASES)[number], databaseUrl: strings['--database-url'] ?? DEFAULT_DATABASE_URL, rest };
}

function casesOf(engine: Engine, o: Options): Case[] {
  const { small, large } = engine;
  const s = shortCount(small.nodes);
  const l = shortCount(large.nodes);
  const newCase = (key: string, label: string, kind: Kind, fleet: Fleet, armed: number): Case => ({
    key,
    label,
    kind,
    engine,
    fleet,
    armed,
    samples: [],
  });
  return [
    newCase('sweep_small', `sweep     ${s} nodes, ${o.timedOut} timed out`, 'sweep', small, o.timedOut),
    newCase('sweep_large', `sweep     ${l} nodes, ${o.timedOut} timed out`, 'sweep', large, o.timedOut),
    newCase('sweep_large_many', `sweep     ${l} nodes, ${o.manyTimedOut} timed out`, 'sweep', large, o.manyTimedOut),
    newCase('naive_small', `naive     ${s} nodes, ${o.timedOut} timed out`, 'naive', small, o.timedOut),
    newCase('naive_large', `naive     ${l} nodes, ${o.timedOut} timed out`, 'naive', large, o.timedOut),
    newCase('scan_small', `full scan ${s} nodes, ${o.timedOut} timed out`, 'scan', small, o.timedOut),
    newCase('scan_large', `full scan ${l} nodes, ${o.timedOut} timed out`, 'scan', large, o.timedOut),
  ];
}

async function measure(c: Case): Promise<number> {
  await c.fleet.rearm(c.armed);
  await breathe();
  const started = performance.now();
  const found = await c.fleet.work[c.kind]();
  const ms = performance.now() - started;
  if (found !== c.armed) throw new Error(`${c.label}: found ${found} timed-out nodes, expected ${c.armed}; the re-arm is broken`);
  return ms;
}

/** One database's table of timings, ratios and verdict; its metrics and headline. */
function reportEngine(engine: Engine, cases: Case[], o: Options) {
  const { small, large } = engine;
  const s = shortCount(small.nodes);
  const l = shortCount(large.nodes);
  const t = Object.fromEntries(cases.map((c) => [c.key, summarize(c.samples)])) as Record<string, Timings>;
  console.log('');
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
    [`  timed out ${o.timedOut} -> ${o.manyTimedOut} (${formatRatio(timeoutFactor)}), ${l} nodes:`, `sweep ${formatRatio(timeoutGrowth)}`],
    [`  baseline / sweep at ${l} nodes:`, `naive ${formatRatio(naiveOverSweep)}`, `full scan ${formatRatio(scanOverSweep)}`],
  ];
  for (const line of columns(ratioRows)) console.log(`  ${line}`);
  console.log(
    `\n  the sweep ${describeGrowth(fleetGrowth, fleetFactor)} as the fleet grows ${formatRatio(fleetFactor)} ` +
      `and grows ${formatRatio(timeoutGrowth)} with ${formatRatio(timeoutFactor)} the timed-out nodes; ` +
      `the naive sweep grows ${formatRatio(naiveFleetGrowth)} with the fleet`,
  );
  console.log(`  ${engine.cacheNote}`);

  const p = engine.metricPrefix;
  const metrics: Record<string, number> = {
    [`${p}nodes_count`]: large.nodes,
    [`${p}small_nodes_count`]: small.nodes,
    [`${p}wait_nodes_count`]: large.waiting,
    [`${p}small_wait_nodes_count`]: small.waiting,
    [`${p}timed_out_count`]: o.timedOut,
    [`${p}many_timed_out_count`]: o.manyTimedOut,
    [`${p}runs_count`]: o.runs,
    [`${p}build_small_ms`]: round(small.buildMs),
    [`${p}build_large_ms`]: round(large.buildMs),
  };
  for (const c of cases) {
    metrics[`${p}${c.key}_median_ms`] = round(t[c.key]!.median);
    metrics[`${p}${c.key}_p90_ms`] = round(t[c.key]!.p90);
  }
  Object.assign(metrics, {
    [`${p}fleet_growth_ratio`]: round(fleetGrowth),
    [`${p}naive_fleet_growth_ratio`]: round(naiveFleetGrowth),
    [`${p}scan_fleet_growth_ratio`]: round(scanFleetGrowth),
    [`${p}timeout_growth_ratio`]: round(timeoutGrowth),
    [`${p}naive_over_sweep_ratio`]: round(naiveOverSweep),
    [`${p}scan_over_sweep_ratio`]: round(scanOverSweep),
  });
  const headline =
    `sweep ${formatMs(t.sweep_large!.median)} at ${l}; ${s}->${l} ${formatRatio(fleetGrowth)}, ` +
    `timeouts ${o.timedOut}->${o.manyTimedOut} ${formatRatio(timeoutGrowth)}, naive/sweep ${formatRatio(naiveOverSweep)}`;
  return { metrics, headline, medians: new Map(cases.map((c) => [c.key, t[c.key]!.median])) };
}

function printSideBySide(cases: Case[], engines: Engine[], medians: Map<string, number>): void {
  const [first, second] = engines as [Engine, Engine];
  console.log(`\n  side by side (medians; measured interleaved in the same run):`);
  const rows = [
    ['', first.name, second.name, `${second.name} / ${first.name}`],
    ...cases
      .filter((c) => c.engine === first)
      .map((c) => {
        const a = medians.get(`${first.name}:${c.key}`)!;
        const b = medians.get(`${second.name}:${c.key}`)!;
        return [c.label, formatMs(a), formatMs(b), formatRatio(b / a)];
      }),
  ];
  for (const line of columns(rows, [false, true, true, true])) console.log(`  ${line}`);
}

/** The nodes of a fleet, shuffled; its `stale-` nodes start in a wait state with live agents. */
function fleetRows(nodes: number, staleCapacity: number, waitPercent: number, now: EpochMs, random: () => number) {
  const waiting = Math.max(staleCapacity, Math.round((nodes * waitPercent) / 100));
  const staleNameWidth = String(staleCapacity).length;
  const live = () => now - Math.floor(random() * TIMEOUT_MS * 0.9);
  const rows: FleetRow[] = [];
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
  return { rows, waiting, staleNameWidth };
}

/** A wait-state node as the naive sweep reads it, whatever the database. */
interface NaiveRow {
  uuid: string;
  provision_state: WaitState;
  liveness_at: number | null;
  last_heartbeat_at: number | null;
  reservation: string | null;
  maintenance: boolean;
}

/** The naive sweep's decisions, in JavaScript: which nodes timed out, and each one's failure. */
function naiveFailures(rows: NaiveRow[], now: EpochMs, cutoff: EpochMs) {
  const timeoutS = Math.round(TIMEOUT_MS / 1000);
  return rows
    .filter((r) => r.liveness_at !== null && r.liveness_at < cutoff && r.reservation === null && !r.maintenance)
    .map((node) => {
      const silentS = Math.floor((now - (node.liveness_at ?? now)) / 1000);
      const message =
        node.last_heartbeat_at === null
          ? `no heartbeat from the agent since the node entered ${node.provision_state.replace('_', ' ')} ${silentS}s ago (timeout ${timeoutS}s)`
          : `no heartbeat from the agent for ${silentS}s (timeout ${timeoutS}s)`;
      return { uuid: node.uuid, from: node.provision_state, to: WAIT_STATE_FAILURES[node.provision_state], message };
    });
}

function naiveSelectSql(): string {
  return `SELECT uuid, name, provision_state, liveness_at, last_heartbeat_at, reservation, maintenance
          FROM nodes WHERE provision_state IN (${WAIT_LIST})`;
}

// ---------------------------------------------------------------- SQLite

/** Builds the SQLite fleets (files in `dir`) and prints what the store's sweep plan is. */
async function openSqlite(dir: string, o: Options, now: EpochMs, cutoff: EpochMs, checks: BenchCheck[], fleets: Fleet[]): Promise<Engine> {
  const random = mulberry32(0x5eed);
  const sqlite: SqliteFleet[] = [];
  const small = buildSqliteFleet(join(dir, 'small.db'), o.smallNodes, o.timedOut, o.waitPercent, now, cutoff, random);
  fleets.push(small);
  sqlite.push(small);
  const large = buildSqliteFleet(join(dir, 'large.db'), o.nodes, o.manyTimedOut, o.waitPercent, now, cutoff, random);
  fleets.push(large);
  sqlite.push(large);
  const sqliteVersion = (small.admin.prepare('SELECT sqlite_version() AS v').get() as { v: string }).v;
  console.log(
    `  built in ${formatMs(small.buildMs)} and ${formatMs(large.buildMs)} (${small.waiting} and ${large.waiting} nodes waiting); ` +
      `SQLite ${sqliteVersion}, Node ${process.version}, files in ${dir}`,
  );

  // The first sweep of each store prepares its statement: record the SQL,
  // so that the plan below is the real statement's and not a copy.
  let sweepSql = '';
  for (const fleet of sqlite) {
    await fleet.rearm(o.timedOut);
    const first = await captureSqliteSweep(fleet.store, now, cutoff);
    sweepSql = first.sql;
    checks.push({
      name: `first sweep of ${formatCount(fleet.nodes)} nodes fails exactly the timed-out nodes`,
      ok: first.failed === o.timedOut,
      detail: `failed ${first.failed} of ${o.timedOut} timed-out nodes`,
    });
  }
  const sweepPlan = explainSqlite(large.admin, sweepSql);
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
  console.log(`    naive:     ${explainSqlite(large.admin, naiveSelectSql()).join(' / ')}`);
  console.log(`    full scan: ${explainSqlite(large.admin, sqliteScanSql()).join(' / ')}`);
  console.log(`  ${usesIndex && !scansTable ? 'ok' : 'NOT OK'}: the sweep reads the index range of timed-out nodes, not the table`);
  return {
    name: 'SQLite',
    metricPrefix: '',
    small,
    large,
    cacheNote:
      '(each run follows a re-arm written by another connection, so SQLite page caches start cold, OS cache warm, for every case alike)',
  };
}

interface SqliteFleet extends Fleet {
  store: SqliteStore;
  /** Re-arms timed-out nodes between measurements; its write also resets every other connection's page cache, equally for all cases. */
  admin: DatabaseSync;
}

/** Fills a SQLite store in `path` with a fleet; baselines run on a connection of their own, as the store has one. */
function buildSqliteFleet(
  path: string,
  nodes: number,
  staleCapacity: number,
  waitPercent: number,
  now: EpochMs,
  cutoff: EpochMs,
  random: () => number,
): SqliteFleet {
  const started = performance.now();
  const { rows, waiting, staleNameWidth } = fleetRows(nodes, staleCapacity, waitPercent, now, random);
  const store = SqliteStore.open(path);
  store.bulkInsertForBench(rows);

  const admin = openConnection(path);
  const rearmStatement = admin.prepare(
    `UPDATE nodes SET
       provision_state = CASE provision_state ${FAILED_TO_WAIT} ELSE provision_state END,
       liveness_at = CASE WHEN name < ? THEN ? - abs(random() % 3600000) ELSE ? END,
       last_error = ''
     WHERE name >= '${STALE_PREFIX}' AND name < '${STALE_END}'`,
  );
  const baseline = openConnection(path);
  const naiveSelect = baseline.prepare(naiveSelectSql());
  const naiveFail = baseline.prepare(
    `UPDATE nodes SET provision_state = ?, target_provision_state = NULL, agent_token_hash = NULL, last_error = ?,
       updated_at = ?, provision_updated_at = ?
     WHERE uuid = ? AND provision_state = ?`,
  );
  const naiveEvent = baseline.prepare(
    `INSERT INTO node_events (node_uuid, time, kind, message, actor, from_state, to_state) VALUES (?, ?, 'timeout', ?, 'sweep', ?, ?)`,
  );
  const scan = baseline.prepare(sqliteScanSql());

  /** The sweep as one might first write it: load every waiting node, decide in JavaScript, fail them one by one. */
  const naiveSweep = (): number => {
    const read = (naiveSelect.all() as (Omit<NaiveRow, 'maintenance'> & { maintenance: number })[]).map((r) => ({
      ...r,
      maintenance: r.maintenance !== 0,
    }));
    let failed = 0;
    baseline.exec('BEGIN IMMEDIATE');
    try {
      for (const node of naiveFailures(read, now, cutoff)) {
        const { changes } = naiveFail.run(node.to, node.message, now, now, node.uuid, node.from);
        if (Number(changes) === 0) continue;
        naiveEvent.run(node.uuid, now, node.message, node.from, node.to);
        failed++;
      }
      baseline.exec('COMMIT');
    } catch (error) {
      baseline.exec('ROLLBACK');
      throw error;
    }
    return failed;
  };

  return {
    nodes,
    waiting,
    staleCapacity,
    staleNameWidth,
    buildMs: performance.now() - started,
    store,
    admin,
    async rearm(armed) {
      checkArmable(staleCapacity, armed);
      rearmStatement.run(staleName(armed, staleNameWidth), now - TIMEOUT_MS - 1000, now - 1000);
    },
    work: {
      sweep: async () => (await store.sweepTimedOut(now, cutoff, TIMEOUT_MS)).length,
      naive: async () => naiveSweep(),
      scan: async () => scan.all(cutoff).length,
    },
    async close() {
      await store.close();
      admin.close();
      baseline.close();
    },
  };
}

function openConnection(path: string): DatabaseSync {
  const db = new DatabaseSync(path);
  db.exec('PRAGMA busy_timeout = 5000');
  return db;
}

function sqliteScanSql(): string {
  return `SELECT uuid FROM nodes NOT INDEXED
          WHERE provision_state IN (${WAIT_LIST}) AND liveness_at < ? AND reservation IS NULL AND maintenance = 0`;
}

/** Runs one sweep while recording every SQL statement prepared on any connection; returns the sweep's UPDATE. */
async function captureSqliteSweep(store: SqliteStore, now: EpochMs, cutoff: EpochMs): Promise<{ sql: string; failed: number }> {
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
function explainSqlite(db: DatabaseSync, sql: string): string[] {
  const rows = db.prepare(`EXPLAIN QUERY PLAN ${sql}`).all() as { id: number; parent: number; detail: string }[];
  const depth = new Map<number, number>([[0, 0]]);
  return rows.map((row) => {
    const d = (depth.get(row.parent) ?? 0) + 1;
    depth.set(row.id, d);
    return `${'  '.repeat(d - 1)}${row.detail}`;
  });
}

// ---------------------------------------------------------------- PostgreSQL

/** Builds the PostgreSQL fleets (a fresh schema each) and prints what the store's sweep plan is. */
async function openPostgres(
  baseUrl: string,
  o: Options,
  now: EpochMs,
  cutoff: EpochMs,
  checks: BenchCheck[],
  fleets: Fleet[],
): Promise<Engine> {
  const random = mulberry32(0x5eed);
  const small = await buildPostgresFleet(baseUrl, o.smallNodes, o.timedOut, o.waitPercent, now, cutoff, random);
  fleets.push(small);
  const large = await buildPostgresFleet(baseUrl, o.nodes, o.manyTimedOut, o.waitPercent, now, cutoff, random);
  fleets.push(large);
  const version = (await small.admin.query<{ server_version: string }>('SHOW server_version')).rows[0]?.server_version;
  console.log(
    `\n  PostgreSQL: built in ${formatMs(small.buildMs)} and ${formatMs(large.buildMs)} (${small.waiting} and ${large.waiting} nodes waiting); ` +
      `PostgreSQL ${version}, schemas ${small.schema.schema} and ${large.schema.schema} (dropped at the end)`,
  );

  let sweep: { sql: string; values: unknown[] } | undefined;
  for (const fleet of [small, large]) {
    await fleet.rearm(o.timedOut);
    const first = await capturePostgresSweep(fleet.store, now, cutoff);
    sweep = first;
    checks.push({
      name: `PostgreSQL: first sweep of ${formatCount(fleet.nodes)} nodes fails exactly the timed-out nodes`,
      ok: first.failed === o.timedOut,
      detail: `failed ${first.failed} of ${o.timedOut} timed-out nodes`,
    });
  }
  // EXPLAIN with the statement's own values: a custom plan, as the store gets for each sweep.
  const sweepPlan = await explainPostgres(large.admin, sweep?.sql ?? '', sweep?.values ?? []);
  const usesIndex = sweepPlan.some((line) =>
    /\b(Index Scan using|Index Only Scan using|Bitmap Index Scan on) nodes_state_liveness\b/.test(line),
  );
  const scansTable = sweepPlan.some((line) => /\bSeq Scan on nodes\b/.test(line));
  checks.push({
    name: "PostgreSQL: sweep's UPDATE searches nodes_state_liveness",
    ok: usesIndex && !scansTable,
    detail: sweepPlan.join(' / '),
  });
  console.log("\n  query plan of the sweep's UPDATE, as PostgresStore.sweepTimedOut sends it:");
  for (const line of sweepPlan) console.log(`    ${line}`);
  console.log('  baselines:');
  console.log(`    naive:     ${(await explainPostgres(large.admin, naiveSelectSql(), [])).join(' / ')}`);
  console.log(`    full scan: ${(await explainPostgres(large.scanner, postgresScanSql(), [cutoff])).join(' / ')}`);
  console.log(`  ${usesIndex && !scansTable ? 'ok' : 'NOT OK'}: the sweep reads the index range of timed-out nodes, not the table`);
  return {
    name: 'PostgreSQL',
    metricPrefix: 'pg_',
    small,
    large,
    cacheNote:
      '(each run follows a re-arm committed by another connection; shared buffers and OS cache stay warm, for every case alike; autovacuum runs as it would)',
  };
}

interface PostgresFleet extends Fleet {
  schema: TestSchema;
  store: PostgresStore;
  /** Re-arms timed-out nodes and explains plans. */
  admin: Client;
  /** Runs the full scan: index scans are turned off on this connection only. */
  scanner: Client;
}

async function buildPostgresFleet(
  baseUrl: string,
  nodes: number,
  staleCapacity: number,
  waitPercent: number,
  now: EpochMs,
  cutoff: EpochMs,
  random: () => number,
): Promise<PostgresFleet> {
  const started = performance.now();
  const { rows, waiting, staleNameWidth } = fleetRows(nodes, staleCapacity, waitPercent, now, random);
  const schema = await withPostgresSchema(baseUrl, { prefix: 'mc_bench_sweep' });
  let store: PostgresStore | undefined;
  const clients: Client[] = [];
  try {
    store = await PostgresStore.open(schema.url);
    await store.bulkInsertForBench(rows);
    for (let i = 0; i < 3; i++) clients.push(await connect(schema.url));
  } catch (error) {
    await store?.close();
    await Promise.all(clients.map((c) => c.end()));
    await schema.drop();
    throw error;
  }
  const [admin, baseline, scanner] = clients as [Client, Client, Client];
  // Statistics, as autovacuum would gather soon after a load this size; without them the planner guesses.
  await admin.query('ANALYZE nodes');
  await scanner.query('SET enable_indexscan = off; SET enable_indexonlyscan = off; SET enable_bitmapscan = off');

  /** The sweep as one might first write it: load every waiting node, decide in JavaScript, fail them one by one. */
  const naiveSweep = async (): Promise<number> => {
    const { rows: read } = await baseline.query<Omit<NaiveRow, 'liveness_at' | 'last_heartbeat_at'> & Record<string, string | null>>(
      naiveSelectSql(),
    );
    const waitingNodes = read.map((r) => ({
      ...r,
      liveness_at: r.liveness_at === null ? null : Number(r.liveness_at),
      last_heartbeat_at: r.last_heartbeat_at === null ? null : Number(r.last_heartbeat_at),
    }));
    let failed = 0;
    await baseline.query('BEGIN');
    try {
      for (const node of naiveFailures(waitingNodes, now, cutoff)) {
        const { rowCount } = await baseline.query(
          `UPDATE nodes SET provision_state = $1, target_provision_state = NULL, agent_token_hash = NULL, last_error = $2,
             updated_at = $3, provision_updated_at = $3
           WHERE uuid = $4 AND provision_state = $5`,
          [node.to, node.message, now, node.uuid, node.from],
        );
        if (!rowCount) continue;
        await baseline.query(
          `INSERT INTO node_events (node_uuid, time, kind, message, actor, from_state, to_state) VALUES ($1, $2, 'timeout', $3, 'sweep', $4, $5)`,
          [node.uuid, now, node.message, node.from, node.to],
        );
        failed++;
      }
      await baseline.query('COMMIT');
    } catch (error) {
      await baseline.query('ROLLBACK');
      throw error;
    }
    return failed;
  };

  return {
    nodes,
    waiting,
    staleCapacity,
    staleNameWidth,
    buildMs: performance.now() - started,
    schema,
    store,
    admin,
    scanner,
    async rearm(armed) {
      checkArmable(staleCapacity, armed);
      await admin.query(
        `UPDATE nodes SET
           provision_state = CASE provision_state ${FAILED_TO_WAIT} ELSE provision_state END,
           liveness_at = CASE WHEN name < $1 THEN $2 - floor(random() * 3600000)::bigint ELSE $3 END,
           last_error = ''
         WHERE name >= '${STALE_PREFIX}' AND name < '${STALE_END}'`,
        [staleName(armed, staleNameWidth), now - TIMEOUT_MS - 1000, now - 1000],
      );
    },
    work: {
      sweep: async () => (await store.sweepTimedOut(now, cutoff, TIMEOUT_MS)).length,
      naive: naiveSweep,
      scan: async () => (await scanner.query(postgresScanSql(), [cutoff])).rowCount ?? 0,
    },
    async close() {
      await store.close();
      await Promise.all([admin.end(), baseline.end(), scanner.end()]);
      await schema.drop();
    },
  };
}

async function connect(url: string): Promise<Client> {
  const client = new Client({ connectionString: url, application_name: 'metalcast bench sweep' });
  await client.connect();
  return client;
}

function postgresScanSql(): string {
  return `SELECT uuid FROM nodes
          WHERE provision_state IN (${WAIT_LIST}) AND liveness_at < $1 AND reservation IS NULL AND NOT maintenance`;
}

/** Runs one sweep while recording the statements the store's pool sends; returns the sweep's (the one that updates nodes). */
async function capturePostgresSweep(
  store: PostgresStore,
  now: EpochMs,
  cutoff: EpochMs,
): Promise<{ sql: string; values: unknown[]; failed: number }> {
  const sent: { sql: string; values: unknown[] }[] = [];
  const original = Pool.prototype.query;
  Pool.prototype.query = function (this: Pool, ...args: unknown[]) {
    if (typeof args[0] === 'string') sent.push({ sql: args[0], values: Array.isArray(args[1]) ? args[1] : [] });
    return Reflect.apply(original, this, args);
  } as typeof original;
  let failed: number;
  try {
    failed = (await store.sweepTimedOut(now, cutoff, TIMEOUT_MS)).length;
  } finally {
    Pool.prototype.query = original;
  }
  const sweep = sent.find((s) => /\bUPDATE\s+nodes\b/i.test(s.sql) && /\bRETURNING\b/i.test(s.sql));
  if (!sweep) {
    throw new Error(
      `the first sweepTimedOut sent no "UPDATE nodes ... RETURNING" through its pool (it sent ${sent.length} statements); ` +
        'has PostgresStore changed how it sweeps?',
    );
  }
  return { ...sweep, failed };
}

async function explainPostgres(client: Client, sql: string, values: unknown[]): Promise<string[]> {
  const { rows } = await client.query<{ 'QUERY PLAN': string }>(`EXPLAIN ${sql}`, values);
  return rows.map((r) => r['QUERY PLAN']);
}

// ---------------------------------------------------------------- shared

function checkArmable(staleCapacity: number, armed: number): void {
  if (armed > staleCapacity) throw new Error(`cannot arm ${armed} nodes in a fleet built with ${staleCapacity} stale nodes`);
}

function staleName(i: number, width: number): string {
  return `${STALE_PREFIX}${String(i).padStart(width, '0')}`;
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
