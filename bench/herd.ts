/**
 * The herd benchmark: a fleet of simulated agents connected to one real
 * controller process; the controller is stopped, kept down, and started
 * again on the same port and database. How hard do the agents come back,
 * with the production jitter, and with it turned off?
 *
 * Per mode (jitter on, then jitter off; each with a fresh controller and
 * data directory, so that nothing carries over):
 * - a controller process (bin/metalcast.js) on a temp SQLite database, with
 *   timeouts so long that nothing fails during the run;
 * - N nodes created through the operator API, each with its own MAC, put
 *   into inspect_wait (waiting for an agent) and into maintenance, so that
 *   the conductor never acts on them; lookup and heartbeats work as usual;
 * - W worker processes (bench/herd-worker.ts) with N/W agents each, on the
 *   real agent code (lookupWithBackoff, then HeartbeatLoop with a
 *   ControllerLink per agent), spread over G HTTP/2 connections per worker;
 * - all agents start at once: lookup, then heartbeat stream (the fleet-start
 *   herd); once all are connected (events, and metalcast_agents_connected),
 *   SIGTERM the controller, keep it down, start it again, and wait until
 *   every agent has a heartbeat stream again.
 *
 * Reconnect times are counted from the moment the new controller logged
 * 'controller started' (gRPC and /metrics listening), using its own log
 * timestamp; events carry the worker's Date.now() (same machine clock).
 */
import { type ChildProcess, fork, spawn } from 'node:child_process';
import { createWriteStream, mkdirSync, readFileSync, type WriteStream } from 'node:fs';
import { createServer, type Server } from 'node:net';
import type { AddressInfo } from 'node:net';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { connectOperator, readTokenFile } from '../cli/client.js';
import { ProvisionAction } from '../gen/metalcast/v1/node.js';
import {
  type BenchCheck,
  type BenchResult,
  BenchUsageError,
  breathe,
  columns,
  formatCount,
  formatMs,
  logTail,
  normaliseDurations,
  formatRatio,
  type NumberOptions,
  parseNumberOptions,
  withTempDir,
} from './harness.js';
import { EVENT, type HerdEvent, type ParentMessage, type WorkerMessage, type WorkerSetup } from './herd-protocol.js';

export const description = 'thundering herd: agents reconnecting after a controller outage, with and without jitter';

export const options = {
  agents: { default: 1000, integer: true, description: 'simulated agents (one node each)' },
  workers: { default: 4, integer: true, description: 'worker processes the agents are spread over' },
  groups: { default: 8, integer: true, description: 'HTTP/2 connections per worker that its agents share' },
  down: { default: 30, description: 'seconds the controller stays down (or a duration: 8s, 500ms, 1m)' },
  'reconnect-delay': { default: 5, description: "agents' base reconnect delay in seconds (x U(1,2) with jitter; production 5)" },
  timeout: { default: 120, description: 'seconds to wait for all agents to connect, at start and after the restart' },
} satisfies NumberOptions;

const DURATION_FLAGS = new Set(['down', 'reconnect-delay', 'timeout']);

const REPO = fileURLToPath(new URL('..', import.meta.url));
const WORKER = join(dirname(fileURLToPath(import.meta.url)), 'herd-worker.ts');
const METALCAST = join(REPO, 'bin', 'metalcast.js');

/** Nodes created concurrently through the operator API. */
const CREATE_CONCURRENCY = 32;
/** Pause between "all connected" and the stop, so that the fleet is in its steady state. */
const SETTLE_MS = 2000;
const CONTROLLER_READY_TIMEOUT_MS = 60_000;
const CONTROLLER_STOP_TIMEOUT_MS = 20_000;
const WORKER_STOP_TIMEOUT_MS = 15_000;
/** Production agent defaults (agent/config/config.ts). */
const AGENT = {
  lookupBackoffStartMs: 1000,
  lookupBackoffMaxMs: 60_000,
  lookupBudgetMs: 600_000,
  callTimeoutMs: 30_000,
  keepaliveTimeMs: 10_000,
  keepaliveTimeoutMs: 10_000,
  minHeartbeatGapMs: 5000,
};
/** Controller flags so that nothing fails or is acted on during the run. */
const CONTROLLER_FLAGS = [
  ['--heartbeat-timeout', '600s'],
  ['--heartbeat-interval-min', '20s'],
  ['--heartbeat-interval-max', '30s'],
  ['--startup-grace', '600s'],
  ['--shutdown-timeout', '10s'],
  ['--controller-id', 'bench-herd'],
  ['--log-level', 'info'],
  // Plaintext: the simulated agents (herd-worker.ts) measure reconnect timing, not TLS.
  ['--insecure', 'true'],
].flat();

type Options = ReturnType<typeof parseOptions>;

export async function run(args: string[]): Promise<BenchResult> {
  const o = parseOptions(args);
  return withTempDir('metalcast-bench-herd-', async (dir) => {
    console.log(
      `herd: ${formatCount(o.agents)} agents in ${o.workers} worker processes, ${o.groups} HTTP/2 connections per worker ` +
        `(${o.workers * o.groups} in all); controller down for ${formatMs(o.downMs)}; agent reconnect delay ` +
        `${formatMs(o.reconnectDelayMs)} x U(1,2) with jitter, x 1 without; lookup backoff 1 s doubling to 60 s; Node ${process.version}`,
    );
    const modes: ModeRun[] = [];
    for (const jitter of [true, false]) {
      modes.push(await runMode(jitter, o, join(dir, jitter ? 'jitter-on' : 'jitter-off')));
      await breathe();
    }
    return report(o, modes[0]!, modes[1]!);
  });
}

function parseOptions(args: string[]) {
  const raw = parseNumberOptions(normaliseDurations(args, DURATION_FLAGS), options);
  const problems = [
    raw.agents < 1 && '--agents must be at least 1',
    raw.workers < 1 && '--workers must be at least 1',
    raw.workers > raw.agents && `--workers (${raw.workers}) cannot exceed --agents (${raw.agents})`,
    raw.groups < 1 && '--groups must be at least 1',
    raw['reconnect-delay'] < 0.01 && '--reconnect-delay must be at least 10ms',
    raw.timeout < 1 && '--timeout must be at least 1s',
  ].filter((p): p is string => typeof p === 'string');
  if (problems.length > 0) throw new BenchUsageError(problems.join('; '));
  return {
    agents: raw.agents,
    workers: raw.workers,
    groups: raw.groups,
    downMs: Math.round(raw.down * 1000),
    reconnectDelayMs: Math.round(raw['reconnect-delay'] * 1000),
    timeoutMs: Math.round(raw.timeout * 1000),
  };
}

// ---------------------------------------------------------------------------
// One mode: controller, nodes, workers, start, outage, restart.

interface ModeRun {
  jitter: boolean;
  agents: number;
  /** Every event of every agent, in arrival order. */
  events: HerdEvent[];
  createMs: number;
  tGo: number;
  tStop: number;
  tExit: number;
  tReady: number;
  /** Set when every agent had reconnected within the time allowed. */
  tAllReconnected: number | undefined;
  connectedBeforeStop: number | undefined;
  connectedAfterRestart: number | undefined;
  inspectWaitAtEnd: number | undefined;
  agentFailures: string[];
  /** The controller's own log timestamps of 'agent looked up its node' and 'heartbeat stream opened', both runs. */
  serverLookups: number[];
  serverStreamOpens: number[];
}

async function runMode(jitter: boolean, o: Options, dir: string): Promise<ModeRun> {
  const label = `jitter ${jitter ? 'on' : 'off'}`;
  mkdirSync(dir, { recursive: true });
  const [grpcPort, httpPort] = await freePorts(2);
  const grpcAddress = `127.0.0.1:${grpcPort}`;
  const metricsUrl = `http://127.0.0.1:${httpPort}/metrics`;
  const logPath = join(dir, 'controller.log');
  const log = createWriteStream(logPath, { flags: 'a' });
  const controllerArgs = [
    METALCAST,
    'controller',
    '--listen',
    grpcAddress,
    '--metrics-listen',
    `127.0.0.1:${httpPort}`,
    '--data-dir',
    join(dir, 'data'),
    ...CONTROLLER_FLAGS,
  ];
  const fleet = new Fleet(o.agents);
  const workers: WorkerHandle[] = [];
  let controller: ControllerProcess | undefined;
  try {
    controller = await ControllerProcess.start(controllerArgs, log);
    const createStarted = performance.now();
    await createNodes(grpcAddress, o.agents, readTokenFile(join(dir, 'data', 'admin.token')));
    const createMs = performance.now() - createStarted;
    console.log(
      `\n  ${label}: controller on ${grpcAddress}; ${formatCount(o.agents)} nodes in inspect_wait + maintenance in ${formatMs(createMs)}`,
    );

    for (let w = 0; w < o.workers; w++) {
      const from = Math.floor((w * o.agents) / o.workers);
      const to = Math.floor(((w + 1) * o.agents) / o.workers);
      workers.push(
        startWorker(fleet, {
          type: 'setup',
          controller: grpcAddress,
          agents: Array.from({ length: to - from }, (_, k) => ({ index: from + k, mac: macOf(from + k) })),
          groups: o.groups,
          jitter,
          reconnectDelayMs: o.reconnectDelayMs,
          ...AGENT,
          maxLifetimeMs: 2 * o.timeoutMs + o.downMs + 300_000,
        }),
      );
    }
    await Promise.all(workers.map((w) => w.ready));

    // Fleet start: every agent looks up and opens its stream at once.
    const tGo = Date.now();
    for (const w of workers) w.send({ type: 'go' });
    await waitFor(() => fleet.connected === o.agents || fleet.failures.length > 0, o.timeoutMs);
    if (fleet.failures.length > 0) throw new Error(`agents failed at start: ${fleet.failures.slice(0, 3).join('; ')}`);
    if (fleet.connected !== o.agents) {
      throw new Error(`only ${fleet.connected} of ${o.agents} agents connected within ${formatMs(o.timeoutMs)} of the start`);
    }
    const connectedBeforeStop = await waitForMetric(metricsUrl, 'metalcast_agents_connected', o.agents);
    console.log(`  ${label}: all ${formatCount(o.agents)} agents connected ${formatMs(fleet.lastEstablished() - tGo)} after the start`);
    await sleep(SETTLE_MS);

    // The outage.
    const tStop = Date.now();
    fleet.markStop(tStop);
    await controller.stop();
    const tExit = Date.now();
    const restartAt = tStop + o.downMs;
    console.log(
      `  ${label}: controller stopped (exited after ${formatMs(tExit - tStop)}); down until ${formatMs(o.downMs)} after the stop`,
    );
    await sleep(Math.max(0, restartAt - Date.now()));
    controller = await ControllerProcess.start(controllerArgs, log);
    const tReady = controller.readyAt;

    await waitFor(() => fleet.reconnected === o.agents || fleet.failures.length > 0, o.timeoutMs);
    const allBack = fleet.reconnected === o.agents;
    const tAllReconnected = allBack ? fleet.lastEstablished() : undefined;
    const connectedAfterRestart = allBack ? await waitForMetric(metricsUrl, 'metalcast_agents_connected', o.agents) : undefined;
    console.log(
      allBack
        ? `  ${label}: controller back ${formatMs(tReady - tStop)} after the stop; all agents reconnected ${formatMs(tAllReconnected! - tReady)} after that`
        : `  ${label}: only ${fleet.reconnected} of ${o.agents} agents reconnected within ${formatMs(o.timeoutMs)}`,
    );
    const inspectWaitAtEnd = await scrape(metricsUrl, 'metalcast_nodes{provision_state="inspect_wait"}').catch(() => undefined);

    await stopWorkers(workers);
    await controller.stop();
    controller = undefined;
    await new Promise<void>((resolve) => log.end(resolve));
    const server = serverTimes(logPath);
    return {
      jitter,
      agents: o.agents,
      events: fleet.events,
      createMs,
      tGo,
      tStop,
      tExit,
      tReady,
      tAllReconnected,
      connectedBeforeStop,
      connectedAfterRestart,
      inspectWaitAtEnd,
      agentFailures: fleet.failures,
      serverLookups: server.get(LOOKUP_LOGGED) ?? [],
      serverStreamOpens: server.get(STREAM_OPEN_LOGGED) ?? [],
    };
  } catch (error) {
    console.error(`  ${label}: failed; last lines of ${logPath}:\n${logTail(logPath, 15)}`);
    throw error;
  } finally {
    for (const w of workers) w.kill();
    controller?.kill();
    if (!log.writableEnded) await new Promise<void>((resolve) => log.end(resolve));
  }
}

/** Agent state as the workers report it. */
class Fleet {
  readonly events: HerdEvent[] = [];
  readonly failures: string[] = [];
  connected = 0;
  /** Agents connected on a stream established after the stop. */
  reconnected = 0;
  private stopAt = Number.POSITIVE_INFINITY;
  private readonly isConnected: Uint8Array;
  private readonly establishedAt: Float64Array;

  constructor(agents: number) {
    this.isConnected = new Uint8Array(agents);
    this.establishedAt = new Float64Array(agents);
  }

  markStop(at: number): void {
    this.stopAt = at;
  }

  add(events: HerdEvent[]): void {
    for (const event of events) {
      this.events.push(event);
      const [code, agent, time] = event;
      if (code === EVENT.streamEstablished && !this.isConnected[agent]) {
        this.isConnected[agent] = 1;
        this.establishedAt[agent] = time;
        this.connected++;
        if (time >= this.stopAt) this.reconnected++;
      } else if (code === EVENT.streamDropped && this.isConnected[agent]) {
        this.isConnected[agent] = 0;
        this.connected--;
        if (this.establishedAt[agent]! >= this.stopAt) this.reconnected--;
      }
    }
  }

  /** The latest time an agent's current stream was established. */
  lastEstablished(): number {
    let last = 0;
    for (const t of this.establishedAt) last = Math.max(last, t);
    return last;
  }
}

interface WorkerHandle {
  ready: Promise<void>;
  send(message: ParentMessage): void;
  /** Asks the worker to stop its agents; resolves when it exited (killing it after a while). */
  stop(): Promise<void>;
  kill(): void;
}

function startWorker(fleet: Fleet, setup: WorkerSetup): WorkerHandle {
  const child: ChildProcess = fork(WORKER, [], {
    cwd: REPO,
    execPath: process.execPath,
    execArgv: ['--import', 'tsx'],
    env: cleanEnv(),
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const ready = new Promise<void>((resolve, reject) => {
    child.once('exit', (code, signal) => reject(new Error(`worker ${child.pid} exited (${signal ?? code}) before it was ready`)));
    child.on('message', (message: WorkerMessage) => {
      switch (message.type) {
        case 'ready':
          resolve();
          break;
        case 'events':
          fleet.add(message.events);
          break;
        case 'agent-failed':
          fleet.failures.push(`agent ${message.index}: ${message.message}`);
          break;
        case 'stopped':
          break;
      }
    });
  });
  ready.catch(() => {});
  child.send(setup);
  const kill = () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  };
  return {
    ready,
    send: (message) => {
      if (child.connected) child.send(message);
    },
    async stop() {
      if (child.connected) child.send({ type: 'stop' } satisfies ParentMessage);
      const timer = setTimeout(kill, WORKER_STOP_TIMEOUT_MS);
      await exited;
      clearTimeout(timer);
    },
    kill,
  };
}

async function stopWorkers(workers: WorkerHandle[]): Promise<void> {
  await Promise.all(workers.map((w) => w.stop()));
}

/** The controller as a real process, its output appended to the mode's log file. */
class ControllerProcess {
  private readonly exited: Promise<void>;

  private constructor(
    private readonly child: ChildProcess,
    /** The controller's own timestamp of 'controller started'. */
    readonly readyAt: number,
    exited: Promise<void>,
  ) {
    this.exited = exited;
  }

  static async start(args: string[], log: WriteStream): Promise<ControllerProcess> {
    const child = spawn(process.execPath, args, { cwd: REPO, env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    KILL_ON_EXIT.add(child);
    const exited = new Promise<void>((resolve) =>
      child.once('exit', () => {
        KILL_ON_EXIT.delete(child);
        resolve();
      }),
    );
    child.stderr!.on('data', (chunk: Buffer) => log.write(chunk));
    const lines = createInterface({ input: child.stdout! });
    let readyAt: number;
    try {
      readyAt = await new Promise<number>((resolve, reject) => {
        const timer = setTimeout(
          () => reject(new Error(`controller not ready within ${formatMs(CONTROLLER_READY_TIMEOUT_MS)}`)),
          CONTROLLER_READY_TIMEOUT_MS,
        );
        child.once('exit', (code, signal) => {
          clearTimeout(timer);
          reject(new Error(`controller exited (${signal ?? code}) before it was ready`));
        });
        lines.on('line', (line) => {
          log.write(`${line}\n`);
          if (!line.includes('"controller started"')) return;
          clearTimeout(timer);
          const time = Date.parse((JSON.parse(line) as { time: string }).time);
          resolve(Number.isFinite(time) ? time : Date.now());
        });
      });
    } catch (error) {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      throw error;
    }
    return new ControllerProcess(child, readyAt, exited);
  }

  /** SIGTERM, as a service manager stops it; SIGKILL if it does not exit in time. */
  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.kill(), CONTROLLER_STOP_TIMEOUT_MS);
    await this.exited;
    clearTimeout(timer);
  }

  kill(): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
  }
}

/** Controllers still running when this process exits (an error, Ctrl-C) are killed with it. */
const KILL_ON_EXIT = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of KILL_ON_EXIT) child.kill('SIGKILL');
});

/** The environment without METALCAST_* variables, which would change the controller's configuration. */
function cleanEnv(): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith('METALCAST_')));
}

/** Creates `count` nodes with one MAC each, manages and inspects them (inspect_wait), and puts them in maintenance. */
async function createNodes(address: string, count: number, token: string | undefined): Promise<void> {
  const operator = connectOperator(address, 30_000, token);
  try {
    let next = 0;
    const one = async (i: number) => {
      const { node } = await operator.nodes.createNode({ name: `herd-${String(i).padStart(6, '0')}`, macAddresses: [macOf(i)] });
      const uuid = node!.uuid;
      await operator.nodes.setProvisionState({ node: uuid, action: ProvisionAction.PROVISION_ACTION_MANAGE });
      await operator.nodes.setProvisionState({ node: uuid, action: ProvisionAction.PROVISION_ACTION_INSPECT });
      await operator.nodes.setMaintenance({ node: uuid, enabled: true, reason: 'bench herd: heartbeats only, no conductor actions' });
    };
    await Promise.all(
      Array.from({ length: Math.min(CREATE_CONCURRENCY, count) }, async () => {
        while (next < count) await one(next++);
      }),
    );
  } finally {
    operator.close();
  }
}

/** A locally administered MAC per agent index: 02:00:00:xx:xx:xx. */
function macOf(i: number): string {
  const hex = (n: number) => (n & 0xff).toString(16).padStart(2, '0');
  return `02:00:00:${hex(i >> 16)}:${hex(i >> 8)}:${hex(i)}`;
}

/** Free TCP ports on 127.0.0.1, held open together so that they differ, then released. */
async function freePorts(n: number): Promise<number[]> {
  const servers = await Promise.all(
    Array.from(
      { length: n },
      () =>
        new Promise<Server>((resolve, reject) => {
          const server = createServer();
          server.once('error', reject);
          server.listen(0, '127.0.0.1', () => resolve(server));
        }),
    ),
  );
  const ports = servers.map((s) => (s.address() as AddressInfo).port);
  await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))));
  return ports;
}

/** Polls `check` every 100 ms until it holds or `timeoutMs` passed; returns whether it held. */
async function waitFor(check: () => boolean, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() >= deadline) return false;
    await sleep(100);
  }
  return true;
}

/** Polls /metrics (every 250 ms, at most 10 s) until `sample` equals `expected`; returns the last value seen. */
async function waitForMetric(url: string, sample: string, expected: number): Promise<number | undefined> {
  let value: number | undefined;
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    value = await scrape(url, sample).catch(() => undefined);
    if (value === expected) break;
    await sleep(250);
  }
  return value;
}

async function scrape(url: string, sample: string): Promise<number | undefined> {
  const response = await fetch(url, { signal: AbortSignal.timeout(5000) });
  if (!response.ok) throw new Error(`${url} answered ${response.status}`);
  for (const line of (await response.text()).split('\n')) {
    if (line.startsWith(`${sample} `)) return Number(line.slice(sample.length + 1));
  }
  return undefined;
}

const LOOKUP_LOGGED = 'agent looked up its node';
const STREAM_OPEN_LOGGED = 'heartbeat stream opened';

/** Timestamps of the controller's log lines we count, by message. */
function serverTimes(logPath: string): Map<string, number[]> {
  const times = new Map<string, number[]>([
    [LOOKUP_LOGGED, []],
    [STREAM_OPEN_LOGGED, []],
  ]);
  for (const line of readFileSync(logPath, 'utf8').split('\n')) {
    if (!line.startsWith('{') || !(line.includes(LOOKUP_LOGGED) || line.includes(STREAM_OPEN_LOGGED))) continue;
    try {
      const entry = JSON.parse(line) as { msg?: string; time?: string };
      const list = entry.msg === undefined ? undefined : times.get(entry.msg);
      if (list && entry.time) list.push(Date.parse(entry.time));
    } catch {
      // A torn line at a kill: not counted.
    }
  }
  return times;
}

// ---------------------------------------------------------------------------
// Analysis and report.

interface Burst {
  count: number;
  /** Highest count in a 100 ms bucket, per second. */
  peak100: number;
  /** Highest count in a 1 s bucket. */
  peak1s: number;
  /** Offsets from the origin, ms. */
  p50: number;
  p95: number;
  p100: number;
  /** Counts per 1 s bucket from the origin. */
  perSecond: number[];
}

function burst(times: readonly number[], origin: number): Burst {
  const offsets = times.map((t) => Math.max(0, t - origin)).sort((a, b) => a - b);
  const b100 = new Map<number, number>();
  const perSecond: number[] = [];
  for (const offset of offsets) {
    const k = Math.floor(offset / 100);
    b100.set(k, (b100.get(k) ?? 0) + 1);
    const s = Math.floor(offset / 1000);
    while (perSecond.length <= s) perSecond.push(0);
    perSecond[s]!++;
  }
  return {
    count: offsets.length,
    peak100: Math.max(0, ...b100.values()) * 10,
    peak1s: Math.max(0, ...perSecond),
    p50: quantile(offsets, 0.5),
    p95: quantile(offsets, 0.95),
    p100: offsets.at(-1) ?? Number.NaN,
    perSecond,
  };
}

/** Linear interpolation between closest ranks; `sorted` ascending. */
function quantile(sorted: readonly number[], q: number): number {
  if (sorted.length === 0) return Number.NaN;
  const position = (sorted.length - 1) * q;
  const below = Math.floor(position);
  const above = Math.ceil(position);
  return sorted[below]! + (sorted[above]! - sorted[below]!) * (position - below);
}

interface ModeStats {
  run: ModeRun;
  /** Lookup calls from the fleet start to the stop. */
  startLookups: Burst;
  startLookupsFailed: number;
  /** First successful lookup of each agent. */
  startLookupAnswered: Burst;
  /** First stream of each agent. */
  startConnected: Burst;
  /** Stream attempts while the controller was down. */
  outageAttempts: number;
  outageDropped: number;
  /** The first stream each agent established after the restart, from the controller's ready time. */
  reconnected: Burst;
  /** Stream attempts from the ready time to all reconnected (those refused by a channel in backoff included). */
  restartAttempts: Burst;
  /** Lookups after the stop. */
  relookups: number;
  /** The same seen from the controller's log: lookups answered at the start, streams opened after the restart. */
  serverStartLookups: Burst;
  serverReopens: Burst;
}

function analyse(run: ModeRun): ModeStats {
  const { events, tGo, tStop, tReady } = run;
  const end = run.tAllReconnected ?? Number.POSITIVE_INFINITY;
  const times = (code: number, from: number, to: number) =>
    events.filter(([c, , t]) => c === code && t >= from && t < to).map(([, , t]) => t);
  const firstPerAgent = (code: number, from: number, to: number) => {
    const first = new Map<number, number>();
    for (const [c, agent, t] of events) {
      if (c === code && t >= from && t < to && !first.has(agent)) first.set(agent, t);
    }
    return [...first.values()];
  };
  return {
    run,
    startLookups: burst(times(EVENT.lookupAttempt, tGo, tStop), tGo),
    startLookupsFailed: times(EVENT.lookupFailed, tGo, tStop).length,
    startLookupAnswered: burst(firstPerAgent(EVENT.lookupOk, tGo, tStop), tGo),
    startConnected: burst(firstPerAgent(EVENT.streamEstablished, tGo, tStop), tGo),
    outageAttempts: times(EVENT.streamAttempt, tStop, tReady).length,
    outageDropped: times(EVENT.streamDropped, tStop, tReady).length,
    reconnected: burst(firstPerAgent(EVENT.streamEstablished, tStop, Number.POSITIVE_INFINITY), tReady),
    restartAttempts: burst(times(EVENT.streamAttempt, tReady, end + 1), tReady),
    relookups: times(EVENT.lookupAttempt, tStop, Number.POSITIVE_INFINITY).length,
    serverStartLookups: burst(
      run.serverLookups.filter((t) => t >= tGo && t < tStop),
      tGo,
    ),
    serverReopens: burst(
      run.serverStreamOpens.filter((t) => t >= tReady),
      tReady,
    ),
  };
}

function report(o: Options, onRun: ModeRun, offRun: ModeRun): BenchResult {
  const on = analyse(onRun);
  const off = analyse(offRun);
  const n = o.agents;
  const ratio = (a: number, b: number) => (b > 0 ? a / b : Number.NaN);
  const showRatio = (x: number) => (Number.isFinite(x) ? formatRatio(x) : '-');
  const rate = (x: number) => `${formatCount(Math.round(x))}/s`;
  const seconds = (x: number) => (x / 1000).toFixed(2);
  const spread = (b: Burst) => (b.count === 0 ? '-' : `${seconds(b.p50)} / ${seconds(b.p95)} / ${seconds(b.p100)} s`);
  const r = (label: string, f: (s: ModeStats) => string, ratioOf?: (s: ModeStats) => number) => [
    label,
    f(on),
    f(off),
    ratioOf ? showRatio(ratio(ratioOf(off), ratioOf(on))) : '',
  ];

  console.log(
    `\n  ${formatCount(n)} agents, controller down ${formatMs(o.downMs)}; times from the fleet start, then from the controller's restart\n`,
  );
  const rows = [
    ['', 'jitter on', 'jitter off', 'off / on'],
    ['fleet start (every agent starts at once)', '', '', ''],
    r('  lookup calls (failed)', (s) => `${formatCount(s.startLookups.count)} (${s.startLookupsFailed})`),
    r(
      '  lookups peak, 100 ms buckets',
      (s) => rate(s.startLookups.peak100),
      (s) => s.startLookups.peak100,
    ),
    r(
      '  lookups peak, 1 s buckets',
      (s) => rate(s.startLookups.peak1s),
      (s) => s.startLookups.peak1s,
    ),
    r('  lookup answered p50 / p95 / p100', (s) => spread(s.startLookupAnswered)),
    r(
      '  lookups served, controller log: peak 100 ms / 1 s',
      (s) => `${rate(s.serverStartLookups.peak100)} / ${rate(s.serverStartLookups.peak1s)}`,
      (s) => s.serverStartLookups.peak100,
    ),
    r(
      '  streams established peak, 100 ms',
      (s) => rate(s.startConnected.peak100),
      (s) => s.startConnected.peak100,
    ),
    r('  all connected after', (s) => formatMs(s.startConnected.p100)),
    ['outage', '', '', ''],
    r('  controller exit after SIGTERM', (s) => formatMs(s.run.tExit - s.run.tStop)),
    r('  stop -> new controller ready', (s) => formatMs(s.run.tReady - s.run.tStop)),
    r('  streams dropped / attempts while down', (s) => `${formatCount(s.outageDropped)} / ${formatCount(s.outageAttempts)}`),
    ['after the restart (from controller ready)', '', '', ''],
    r(
      '  reconnects peak, 100 ms buckets',
      (s) => rate(s.reconnected.peak100),
      (s) => s.reconnected.peak100,
    ),
    r(
      '  reconnects peak, 1 s buckets',
      (s) => rate(s.reconnected.peak1s),
      (s) => s.reconnected.peak1s,
    ),
    r('  reconnect p50 / p95 / p100', (s) => spread(s.reconnected)),
    r(
      '  streams opened, controller log: peak 100 ms / 1 s',
      (s) => `${rate(s.serverReopens.peak100)} / ${rate(s.serverReopens.peak1s)}`,
      (s) => s.serverReopens.peak100,
    ),
    r('  agents reconnected', (s) => `${formatCount(s.reconnected.count)} of ${formatCount(n)}`),
    r('  stream attempts (peak per 1 s)', (s) => `${formatCount(s.restartAttempts.count)} (${formatCount(s.restartAttempts.peak1s)})`),
    r('  lookups after the stop', (s) => formatCount(s.relookups)),
  ];
  for (const line of columns(rows, [false, true, true, true])) console.log(`  ${line}`);

  console.log('\n  reconnects per second after the controller came back (established streams, and stream attempts in brackets)');
  const histogramSeconds = Math.max(on.reconnected.perSecond.length, off.reconnected.perSecond.length);
  const top = Math.max(1, ...on.reconnected.perSecond, ...off.reconnected.perSecond);
  const width = 28;
  const bar = (count: number) => '#'.repeat(count === 0 ? 0 : Math.max(1, Math.round((count / top) * width))).padEnd(width);
  const attempts = (s: ModeStats, i: number) => `(${s.restartAttempts.perSecond[i] ?? 0})`;
  const histogram = [
    ['', 'jitter on', '', '', 'jitter off', '', ''],
    ...Array.from({ length: histogramSeconds }, (_, i) => [
      `+${i}s`,
      formatCount(on.reconnected.perSecond[i] ?? 0),
      attempts(on, i),
      bar(on.reconnected.perSecond[i] ?? 0),
      formatCount(off.reconnected.perSecond[i] ?? 0),
      attempts(off, i),
      bar(off.reconnected.perSecond[i] ?? 0),
    ]),
  ];
  for (const line of columns(histogram, [true, true, true, false, true, true, false])) console.log(`  ${line}`);
  console.log(
    `  (# = ${(top / width).toFixed(1)} reconnects; attempts include those a channel still in reconnect backoff refused at once)`,
  );

  const relookups = on.relookups + off.relookups;
  console.log(
    `\n  lookups after the restart: ${relookups}. Agent tokens are stored as hashes in the database, so the restarted controller ` +
      'accepts the old tokens and agents only reopen their heartbeat streams; they look up again only when a stream is refused ' +
      'as UNAUTHENTICATED or NOT_FOUND. The lookup herd is the fleet start, where the first lookup of every agent goes out at once, ' +
      `jitter or not: jitter only spreads retries, and ${
        on.startLookupsFailed + off.startLookupsFailed === 0
          ? 'no lookup failed here'
          : `${on.startLookupsFailed} (on) and ${off.startLookupsFailed} (off) lookups failed and were retried`
      }.`,
  );
  console.log(
    `  Each of the ${o.workers * o.groups} connections comes back on grpc-js's own reconnect backoff (1 s x 1.6 per failure, capped ` +
      'at 10 s by clientChannelOptions, +-20 % random; --jitter does not change it); a stream opened while its connection is still ' +
      'backing off fails at once (the attempts in brackets) and the agent waits its reconnect delay again. The SIGTERM shutdown ' +
      'ends the streams one after another (see "controller exit"), which smears even the jitter-off waves a little.',
  );

  const checks: BenchCheck[] = [];
  for (const s of [on, off]) {
    const m = s.run.jitter ? 'jitter on' : 'jitter off';
    checks.push(
      {
        name: `${m}: the controller counted all ${n} agents connected before the stop`,
        ok: s.run.connectedBeforeStop === n,
        detail: `metalcast_agents_connected ${s.run.connectedBeforeStop}`,
      },
      {
        name: `${m}: every agent reconnected within ${formatMs(o.timeoutMs)} of the restart`,
        ok: s.run.tAllReconnected !== undefined && s.reconnected.count === n && s.run.connectedAfterRestart === n,
        detail: `${s.reconnected.count} of ${n} reconnected; metalcast_agents_connected ${s.run.connectedAfterRestart}`,
      },
      {
        name: `${m}: no agent looked up again after the restart (tokens persist)`,
        ok: s.relookups === 0,
        detail: `${s.relookups} lookups after the stop`,
      },
      {
        name: `${m}: every node is still in inspect_wait (nothing failed or acted on)`,
        ok: s.run.inspectWaitAtEnd === n,
        detail: `metalcast_nodes{provision_state="inspect_wait"} ${s.run.inspectWaitAtEnd}`,
      },
      { name: `${m}: no agent gave up`, ok: s.run.agentFailures.length === 0, detail: s.run.agentFailures.slice(0, 3).join('; ') },
    );
  }

  const round = (x: number) => (Number.isFinite(x) ? Math.round(x * 1000) / 1000 : -1);
  const metrics: Record<string, number> = {
    agents_count: n,
    workers_count: o.workers,
    connections_count: o.workers * o.groups,
    down_ms: o.downMs,
    reconnect_delay_ms: o.reconnectDelayMs,
  };
  for (const s of [on, off]) {
    const p = s.run.jitter ? 'jitter_on' : 'jitter_off';
    Object.assign(metrics, {
      [`${p}_create_nodes_ms`]: round(s.run.createMs),
      [`${p}_start_lookups_count`]: s.startLookups.count,
      [`${p}_start_lookups_failed_count`]: s.startLookupsFailed,
      [`${p}_start_lookup_peak_100ms_per_s`]: s.startLookups.peak100,
      [`${p}_start_lookup_peak_1s_per_s`]: s.startLookups.peak1s,
      [`${p}_start_lookup_p50_ms`]: round(s.startLookupAnswered.p50),
      [`${p}_start_lookup_p95_ms`]: round(s.startLookupAnswered.p95),
      [`${p}_start_lookup_p100_ms`]: round(s.startLookupAnswered.p100),
      [`${p}_start_all_connected_ms`]: round(s.startConnected.p100),
      [`${p}_stop_to_ready_ms`]: s.run.tReady - s.run.tStop,
      [`${p}_outage_attempts_count`]: s.outageAttempts,
      [`${p}_reconnect_peak_100ms_per_s`]: s.reconnected.peak100,
      [`${p}_reconnect_peak_1s_per_s`]: s.reconnected.peak1s,
      [`${p}_reconnect_p50_ms`]: round(s.reconnected.p50),
      [`${p}_reconnect_p95_ms`]: round(s.reconnected.p95),
      [`${p}_reconnect_p100_ms`]: round(s.reconnected.p100),
      [`${p}_reconnected_count`]: s.reconnected.count,
      [`${p}_restart_attempts_count`]: s.restartAttempts.count,
      [`${p}_relookups_count`]: s.relookups,
      [`${p}_server_start_lookup_peak_100ms_per_s`]: s.serverStartLookups.peak100,
      [`${p}_server_reopen_peak_100ms_per_s`]: s.serverReopens.peak100,
      [`${p}_server_reopen_peak_1s_per_s`]: s.serverReopens.peak1s,
    });
  }
  const peak100Ratio = ratio(off.reconnected.peak100, on.reconnected.peak100);
  const peak1sRatio = ratio(off.reconnected.peak1s, on.reconnected.peak1s);
  Object.assign(metrics, {
    reconnect_peak_100ms_off_over_on_ratio: round(peak100Ratio),
    reconnect_peak_1s_off_over_on_ratio: round(peak1sRatio),
    start_lookup_peak_100ms_off_over_on_ratio: round(ratio(off.startLookups.peak100, on.startLookups.peak100)),
  });
  return {
    headline:
      `${formatCount(n)} agents: reconnect peak ${rate(on.reconnected.peak1s)} with jitter, ${rate(off.reconnected.peak1s)} without ` +
      `(${formatRatio(peak1sRatio)}, 1 s buckets); all back ${formatMs(on.reconnected.p100)} vs ${formatMs(off.reconnected.p100)}`,
    metrics,
    checks,
  };
}
