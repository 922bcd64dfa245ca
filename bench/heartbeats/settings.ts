import { BenchUsageError, normaliseDurations, parseNumberOptions } from '../harness.js';

import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { NumberOptions } from '../harness.js';

import type { ProfileSummary } from './profile.js';

export const description =
  'heartbeat capacity of one controller process: agents at the normal interval, then faster, then more agents ' +
  '(also: --database sqlite|postgres|both|postgres://URL, --quick for a smoke run, --cpu-prof to profile the controller)';

export const options = {
  agents: { default: 10_000, integer: true, description: 'agents (one node each) in phases 1 and 2' },
  workers: { default: 4, integer: true, description: 'worker processes the agents are spread over' },
  channels: { default: 64, integer: true, description: 'HTTP/2 connections in all, spread over the workers' },
  interval: {
    default: 54,
    description: 'mean heartbeat interval in seconds, as the controller asks for (production: U(36 s, 72 s), mean 54 s, timeout 120 s)',
  },
  window: { default: 30, description: 'seconds measured in phase 1 and at each fleet size of phase 3' },
  'step-window': { default: 10, description: 'seconds measured at each rate step of phase 2' },
  settle: { default: 3, description: 'seconds between a change (connected, new rate) and its measurement' },
  'max-steps': { default: 10, integer: true, description: 'rate steps of phase 2, x2 each (0 skips phase 2)' },
  'max-agents': { default: 40_000, integer: true, description: 'largest fleet phase 3 tries, doubling from --agents (0 skips phase 3)' },
  'compare-rounds': {
    default: 2,
    integer: true,
    description: "rounds of the reads comparison (the conductor's heartbeat reads, per heartbeat vs batched; 0 skips it)",
  },
  'connect-timeout': { default: 120, description: 'seconds for every agent to have an open stream' },
  budget: { default: 600, description: 'seconds the whole run may take; steps that would not fit are skipped' },
} satisfies NumberOptions;

/** What --quick changes (flags given explicitly still win): about a minute and a half per database on this machine (the budget is for both, with --database both). */
export const QUICK: Partial<Record<keyof typeof options, number>> = {
  agents: 1000,
  workers: 2,
  channels: 8,
  interval: 10,
  window: 5,
  'step-window': 3,
  settle: 1,
  'max-steps': 3,
  'max-agents': 2000,
  'compare-rounds': 1,
  'connect-timeout': 30,
  budget: 240,
};

export const DURATION_FLAGS = new Set(['interval', 'window', 'step-window', 'settle', 'connect-timeout', 'budget']);

/** The goal: 10,000 agents on one controller, p99 under 50 ms. */
export const GOAL_AGENTS = 10_000;
export const GOAL_P99_MS = 50;
/**
 * Issue 18 item 15: how many times less CPU (controller and database) a heartbeat must cost with batched
 * reads than with a read each. On PostgreSQL each read was a query round trip and a backend's work (measured
 * 2.8x to 3.4x); on SQLite it was about 25 µs in-process of some 190 µs a heartbeat costs (measured 1.16x to 1.33x).
 */
export const READS_MIN_RATIO = { sqlite: 1.05, postgres: 1.5 };
/** Phase 2 stops at the first step whose p99 passes this. */
export const STEP_P99_MS = 100;
/** Phase 2 also stops when the fleet delivers less than this share of the rate asked for (the machine is saturated). */
export const MIN_DELIVERED_RATIO = 0.8;
/** Phase 3 stops when the controller's RSS passes this share of the machine's memory, or its CPU this share of a core. */
export const MAX_RSS_SHARE = 0.5;
export const MAX_CPU_CORES = 0.9;
/** A failing window measured while other processes used more than this share of a core is measured again. */
export const OTHERS_LIMIT = 0.25;
export const MAX_TRIES = 3;
/** Longest wait for a quiet machine before each window (at most twice the window). */
export const QUIET_WAIT_MS = 10_000;

export const REPO = fileURLToPath(new URL('../..', import.meta.url));
export const WORKER = join(dirname(fileURLToPath(import.meta.url)), 'worker.ts');
export const METALCAST = join(REPO, 'bin', 'metalcast.js');
/** The tests' default (test/helpers/postgres.ts). */
export const DEFAULT_POSTGRES_URL = 'postgres://postgres@127.0.0.1:5432/test';
/** Written by another change; loaded by path so that this file compiles without it. */
export const POSTGRES_STORE_MODULE = '../../controller/store/postgres.js';

export const CREATE_CONCURRENCY = 16;
/** How long the controller's idle CPU is measured before the agents connect. */
export const IDLE_MS = 3000;
export const CONTROLLER_READY_TIMEOUT_MS = 60_000;
export const CONTROLLER_STOP_TIMEOUT_MS = 20_000;
export const WORKER_STOP_TIMEOUT_MS = 15_000;
/** Production agent settings (agent/config/config.ts). */
export const AGENT = { ackTimeoutMs: 30_000, reconnectDelayMs: 5000, keepaliveTimeMs: 10_000, keepaliveTimeoutMs: 10_000 };
export const CLK_TCK = 100;
/**
 * prom-client samples the event loop every 10 ms (its default precision) and
 * records whole intervals: an idle loop shows ~10 ms. Subtracted, as the
 * workers subtract their own 1 ms, so that the figures are the delay alone.
 */
export const PROM_LOOP_RESOLUTION_MS = 10;

export type Options = ReturnType<typeof parseOptions>;
export type DatabaseKind = { kind: 'sqlite' } | { kind: 'postgres'; url: string };

// ---------------------------------------------------------------------------
// One database: nodes, controller, workers, the three phases.

export interface Window {
  agents: number;
  speedup: number;
  /** Mean interval the agents waited: the controller's mean over the speedup. */
  intervalMs: number;
  /** Heartbeats per second the fleet should send: agents x speedup / mean interval. */
  targetRate: number;
  windowMs: number;
  acks: number;
  rate: number;
  /** Heartbeats per second counted by the controller (metalcast_heartbeats_total). */
  serverRate: number;
  p50: number;
  p90: number;
  p99: number;
  p999: number;
  max: number;
  errors: Record<string, number>;
  errorCount: number;
  lateAcks: number;
  connected: number;
  /** CPU seconds per second: the controller, all workers, the whole machine. */
  controllerCpu: number;
  /** The PostgreSQL backends serving the controller's connections; NaN with SQLite (inside the controller). */
  databaseCpu: number;
  workersCpu: number;
  machineCpu: number;
  /** Everything else on the machine (other people's processes): machine minus controller, database, workers and this process. */
  otherCpu: number;
  /** Windows measured to get this one (see measureQuiet). */
  tries: number;
  /** /metrics did not answer at one end of the window: the controller-side figures are missing. */
  metricsMissing: boolean;
  rssBytes: number;
  hwmBytes: number;
  heapUsedBytes: number;
  /** Controller event-loop delay in the window (prom-client's monitor, reset at the window's start). */
  loopP99Ms: number;
  loopMaxMs: number;
  /** Worker event-loop delay: the largest p99 and max among the workers. */
  workerLoopP99Ms: number;
  workerLoopMaxMs: number;
  gcSeconds: number;
  flushes: number;
  flushAvgMs: number;
  openFds: number;
}

export interface Connect {
  agents: number;
  /** go -> last agent's first ack. */
  allMs: number;
  p50: number;
  p99: number;
  complete: boolean;
  errors: Record<string, number>;
  /** Controller CPU seconds spent while connecting. */
  controllerCpuSeconds: number;
  /** metalcast_agents_connected once all were connected. */
  serverConnected: number | undefined;
}

export interface FleetPoint {
  connect: Connect;
  window: Window | undefined;
  baselineRssBytes: number;
  idleCpu: number;
  createMs: number;
  created: number;
  stopReason?: string;
}

export interface DatabaseRun {
  label: string;
  skipped?: string;
  phase1?: FleetPoint;
  phase2: Window[];
  phase2Stop?: string;
  phase3: FleetPoint[];
  phase3Stop?: string;
  reads?: ReadsComparison;
  profile?: ProfileSummary;
}

/** The two ways the conductor reads nodes for heartbeats, compared by reads-comparison.ts. */
export const READ_MODES = [
  { key: 'each', name: 'a read per heartbeat (--heartbeat-check-window 0, as before)', flags: ['--heartbeat-check-window', '0'] },
  { key: 'batched', name: 'batched reads (the default window)', flags: [] },
] as const;

export type ReadModeKey = (typeof READ_MODES)[number]['key'];

export interface ReadsComparison {
  windows: Record<ReadModeKey, Window[]>;
  /** CPU per heartbeat by mode (µs), the controller's and its database's: see cpuPerHeartbeatUs. */
  cpuPerHeartbeatUs: Record<ReadModeKey, number | undefined>;
  /** CPU per heartbeat before over after: how many times cheaper a heartbeat became. */
  ratio: number | undefined;
  rounds: number;
  stop?: string;
}

export function parseOptions(args: string[]) {
  let quick = false;
  let cpuProf = false;
  let database = 'sqlite';
  const rest: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (arg === '--quick') quick = true;
    else if (arg === '--cpu-prof') cpuProf = true;
    else if (arg === '--database') {
      if (i + 1 >= args.length) throw new BenchUsageError('--database needs a value: sqlite, postgres, both or postgres://URL');
      database = args[++i]!;
    } else if (arg.startsWith('--database=')) database = arg.slice('--database='.length);
    else rest.push(arg);
  }
  const spec: NumberOptions = quick
    ? Object.fromEntries(Object.entries(options).map(([k, v]) => [k, { ...v, default: QUICK[k as keyof typeof options] ?? v.default }]))
    : options;
  const raw = parseNumberOptions(normaliseDurations(rest, DURATION_FLAGS), spec) as { [K in keyof typeof options]: number };
  const problems = [
    raw.agents < 1 && '--agents must be at least 1',
    raw.workers < 1 && '--workers must be at least 1',
    raw.workers > raw.agents && `--workers (${raw.workers}) cannot exceed --agents (${raw.agents})`,
    raw.channels < raw.workers && `--channels (${raw.channels}) must be at least --workers (${raw.workers})`,
    raw.interval < 0.1 && '--interval must be at least 100ms',
    raw.window < 1 && '--window must be at least 1s',
    raw['step-window'] < 1 && '--step-window must be at least 1s',
    raw['connect-timeout'] < 1 && '--connect-timeout must be at least 1s',
    raw.budget < 10 && '--budget must be at least 10s',
  ].filter((p): p is string => typeof p === 'string');
  const databases = parseDatabase(database);
  if (typeof databases === 'string') problems.push(databases);
  if (problems.length > 0) throw new BenchUsageError(problems.join('; '));
  // The controller's defaults keep min:max:timeout at 0.3:0.6:1 of the timeout; a mean of 54 s is its 36-72 s.
  const intervalMs = Math.round(raw.interval * 1000);
  return {
    quick,
    cpuProf,
    databases: databases as DatabaseKind[],
    agents: raw.agents,
    workers: raw.workers,
    channels: raw.channels,
    intervalMs,
    intervalMinMs: Math.round((intervalMs * 2) / 3),
    intervalMaxMs: Math.round((intervalMs * 4) / 3),
    timeoutMs: Math.round((intervalMs * 20) / 9),
    windowMs: Math.round(raw.window * 1000),
    stepWindowMs: Math.round(raw['step-window'] * 1000),
    settleMs: Math.round(raw.settle * 1000),
    maxSteps: raw['max-steps'],
    maxAgents: raw['max-agents'],
    compareRounds: raw['compare-rounds'],
    connectTimeoutMs: Math.round(raw['connect-timeout'] * 1000),
    budgetMs: Math.round(raw.budget * 1000),
  };
}

export function parseDatabase(value: string): DatabaseKind[] | string {
  if (value === 'sqlite') return [{ kind: 'sqlite' }];
  if (value === 'postgres') return [{ kind: 'postgres', url: DEFAULT_POSTGRES_URL }];
  if (value === 'both') return [{ kind: 'sqlite' }, { kind: 'postgres', url: DEFAULT_POSTGRES_URL }];
  if (/^postgres(ql)?:\/\//.test(value)) return [{ kind: 'postgres', url: value }];
  return `--database '${value}' is not one of sqlite, postgres, both or a postgres:// URL`;
}
