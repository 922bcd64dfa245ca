import { totalmem } from 'node:os';
import { availableParallelism } from 'node:os';
import { type BenchCheck, type BenchResult, columns, formatCount, formatMs } from '../harness.js';

import {
  GOAL_AGENTS,
  GOAL_P99_MS,
  type Options,
  type Window,
  type Connect,
  type DatabaseRun,
  STEP_P99_MS,
  MIN_DELIVERED_RATIO,
  MAX_RSS_SHARE,
  MAX_CPU_CORES,
  READS_MIN_RATIO,
  READ_MODES,
  type ReadsComparison,
} from './settings.js';
import type { ProfileSummary } from './profile.js';

// ---------------------------------------------------------------------------
// Report.

export const sum = (values: readonly number[]) => values.reduce((a, b) => a + b, 0);
export const seconds = (msValue: number) => String(Math.round(msValue) / 1000);
export const mib = (bytes: number) => (bytes / 2 ** 20).toFixed(0);
export const rate = (x: number) => (Number.isFinite(x) ? `${formatCount(Math.round(x))}/s` : '-');
export const pct = (x: number) => (Number.isFinite(x) ? `${(x * 100).toFixed(0)} %` : '-');
export const lat = (x: number) => (Number.isFinite(x) ? formatMs(x) : '-');

/** Least-squares line of controller CPU over the rate the controller counted. */
export function cpuFit(windows: readonly Window[]): { slopeUs: number; intercept: number; r2: number; points: number } | undefined {
  const points = windows.filter((w) => Number.isFinite(w.controllerCpu) && w.serverRate > 0);
  if (points.length < 3) return undefined;
  const n = points.length;
  const mx = sum(points.map((w) => w.serverRate)) / n;
  const my = sum(points.map((w) => w.controllerCpu)) / n;
  const sxy = sum(points.map((w) => (w.serverRate - mx) * (w.controllerCpu - my)));
  const sxx = sum(points.map((w) => (w.serverRate - mx) ** 2));
  const syy = sum(points.map((w) => (w.controllerCpu - my) ** 2));
  if (sxx === 0 || syy === 0) return undefined;
  const slope = sxy / sxx;
  return { slopeUs: slope * 1e6, intercept: my - slope * mx, r2: (sxy * sxy) / (sxx * syy), points: n };
}

/** Self time by place and by function, as a share of the wall time and of the time the controller was busy (not idle). */
export function printProfile(profile: ProfileSummary): void {
  const idle = profile.places.find((f) => f.name === '(idle)')?.ms ?? 0;
  const busy = profile.totalMs - idle;
  console.log(
    `\n  controller CPU profile (--cpu-prof: the connect and phases 1 and 2), ${formatMs(profile.totalMs)} of wall time, ` +
      `${formatMs(busy)} busy; self time, share of wall time, share of busy time:`,
  );
  const rows = (list: { name: string; ms: number }[]) =>
    list.map((f) => [f.name, formatMs(f.ms), pct(f.ms / profile.totalMs), f.name === '(idle)' ? '' : pct(f.ms / busy)]);
  for (const line of columns(rows(profile.places), [false, true, true, true])) console.log(`    ${line}`);
  console.log('  top functions:');
  for (const line of columns(rows(profile.functions), [false, true, true, true])) console.log(`    ${line}`);
}

export function printConnect(label: string, c: Connect): void {
  const errors = Object.entries(c.errors).map(([code, n]) => `${code} ${n}`);
  console.log(
    `  ${label}: ${c.complete ? 'all' : 'NOT all'} ${formatCount(c.agents)} agents connected ${formatMs(c.allMs)} after the start ` +
      `(per agent p50 ${lat(c.p50)}, p99 ${lat(c.p99)}); controller CPU ${c.controllerCpuSeconds.toFixed(2)} s; ` +
      `metalcast_agents_connected ${c.serverConnected ?? '-'}${errors.length > 0 ? `; errors ${errors.join(', ')}` : ''}`,
  );
}

export function windowRows(w: Window, baselineRssBytes: number, idleCpu: number): string[][] {
  return [
    ['agents / mean interval', `${formatCount(w.agents)} / ${seconds(w.intervalMs)} s${w.speedup > 1 ? ` (x${w.speedup})` : ''}`],
    ['heartbeats/s: acked (controller counted) / asked', `${rate(w.rate)} (${rate(w.serverRate)}) / ${rate(w.targetRate)}`],
    ['latency p50 / p90 / p99 / p99.9 / max', `${lat(w.p50)} / ${lat(w.p90)} / ${lat(w.p99)} / ${lat(w.p999)} / ${lat(w.max)}`],
    ['errors; acks later than 1 s at the end', `${describeErrors(w) === 'none' ? 0 : describeErrors(w)}; ${w.lateAcks}`],
    ['agents connected at the end; windows measured', `${formatCount(w.connected)}; ${w.tries}`],
    [
      'CPU, share of one core: controller (idle) / database / workers / others / machine',
      `${pct(w.controllerCpu)} (${pct(idleCpu)}) / ${Number.isFinite(w.databaseCpu) ? pct(w.databaseCpu) : 'in the controller'} / ` +
        `${pct(w.workersCpu)} / ${pct(w.otherCpu)} / ${pct(w.machineCpu)} (${availableParallelism()} cores)`,
    ],
    [
      'controller CPU per agent / per heartbeat over idle',
      `${((w.controllerCpu / w.agents) * 1e6).toFixed(1)} µs/s / ${w.serverRate > 0 ? (((w.controllerCpu - idleCpu) / w.serverRate) * 1e6).toFixed(0) : '-'} µs`,
    ],
    [
      'controller RSS (peak) / per agent over idle',
      `${mib(w.rssBytes)} MiB (${mib(w.hwmBytes)}) / ${((w.rssBytes - baselineRssBytes) / w.agents / 1024).toFixed(1)} KiB (idle ${mib(baselineRssBytes)} MiB); heap used ${mib(w.heapUsedBytes)} MiB`,
    ],
    [
      'controller event-loop delay p99 / max',
      `${lat(w.loopP99Ms)} / ${lat(w.loopMaxMs)}; GC ${(w.gcSeconds * 1000).toFixed(0)} ms in the window`,
    ],
    ['worker event-loop delay p99 / max (worst worker)', `${lat(w.workerLoopP99Ms)} / ${lat(w.workerLoopMaxMs)}`],
    ['heartbeat flushes: count / mean duration', `${w.flushes} / ${lat(w.flushAvgMs)}`],
    ['controller open files', String(w.openFds)],
  ];
}

export function printWindows(title: string, windows: Window[], baselineRssBytes: number, idleCpu: number): void {
  console.log(`\n  ${title}`);
  for (const w of windows) for (const line of columns(windowRows(w, baselineRssBytes, idleCpu))) console.log(`    ${line}`);
}

export const STEP_HEADER = [
  'step',
  'interval',
  'asked',
  'acked',
  'ctrl counted',
  'p50',
  'p99',
  'max',
  'errors',
  'ctrl CPU',
  'db CPU',
  'workers CPU',
  'others CPU',
  'ctrl loop p99',
  'flush mean',
  'tries',
];

export function stepRow(w: Window): string[] {
  return [
    `x${w.speedup}`,
    `${(w.intervalMs / 1000).toFixed(2)} s`,
    rate(w.targetRate),
    rate(w.rate),
    rate(w.serverRate),
    lat(w.p50),
    lat(w.p99),
    lat(w.max),
    String(w.errorCount + w.lateAcks),
    pct(w.controllerCpu),
    Number.isFinite(w.databaseCpu) ? pct(w.databaseCpu) : '-',
    pct(w.workersCpu),
    pct(w.otherCpu),
    lat(w.loopP99Ms),
    lat(w.flushAvgMs),
    String(w.tries),
  ];
}

export function printStep(w: Window, prefix = 'phase 2'): void {
  const line = columns(
    [STEP_HEADER, stepRow(w)],
    STEP_HEADER.map(() => true),
  );
  console.log(`  ${prefix} ${line[1]}`);
}

export function report(o: Options, runs: DatabaseRun[]): BenchResult {
  const checks: BenchCheck[] = [];
  const metrics: Record<string, number> = {
    agents_count: o.agents,
    workers_count: o.workers,
    connections_count: o.channels,
    interval_mean_ms: o.intervalMs,
    interval_min_ms: o.intervalMinMs,
    interval_max_ms: o.intervalMaxMs,
    heartbeat_timeout_ms: o.timeoutMs,
  };
  const headlines: string[] = [];
  const round = (x: number) => (Number.isFinite(x) ? Math.round(x * 1000) / 1000 : -1);

  for (const r of runs) {
    console.log(`\n=== ${r.label}: summary ===`);
    if (r.skipped) {
      console.log(`  not run: ${r.skipped}`);
      headlines.push(`${r.label}: pending`);
      continue;
    }
    const p1 = r.phase1!;
    const w1 = p1.window;
    const p = r.label;
    console.log(`\n  phase 1: ${formatCount(o.agents)} agents, interval U(${seconds(o.intervalMinMs)}, ${seconds(o.intervalMaxMs)}) s`);
    console.log(
      `    nodes created through the Store: ${formatCount(p1.created)} in ${formatMs(p1.createMs)}; connect: all ${formatCount(p1.connect.agents)} streams open ` +
        `${formatMs(p1.connect.allMs)} after the start (p50 ${lat(p1.connect.p50)}, p99 ${lat(p1.connect.p99)})`,
    );
    if (w1) for (const line of columns(windowRows(w1, p1.baselineRssBytes, p1.idleCpu))) console.log(`    ${line}`);

    if (r.phase2.length > 0) {
      console.log(`\n  phase 2: the same ${formatCount(o.agents)} agents, every interval divided by the step's factor`);
      const rows = [STEP_HEADER, ...(w1 ? [stepRow(w1)] : []), ...r.phase2.map((w) => stepRow(w))];
      for (const line of columns(
        rows,
        STEP_HEADER.map((_, i) => i > 0),
      ))
        console.log(`    ${line}`);
      console.log(`    stopped: ${r.phase2Stop}`);
    }
    const sustainable = [...(w1 ? [w1] : []), ...r.phase2].filter((w) => !stepProblem(w)).at(-1);
    if (sustainable) {
      console.log(
        `    sustainable: ${rate(sustainable.rate)} heartbeats (x${sustainable.speedup}, p99 ${lat(sustainable.p99)}, controller CPU ${pct(sustainable.controllerCpu)}); ` +
          `at the production mean of 54 s that is ${formatCount(Math.round(sustainable.rate * 54))} agents by rate alone`,
      );
    }
    const fit = cpuFit([...(w1 ? [w1] : []), ...r.phase2]);
    if (fit) {
      console.log(
        `    controller CPU = ${pct(fit.intercept)} of a core + ${fit.slopeUs.toFixed(0)} µs per heartbeat (least squares over ${fit.points} windows, ` +
          `r² ${fit.r2.toFixed(3)}): one core would carry ${formatCount(Math.round((1 - fit.intercept) / (fit.slopeUs / 1e6)))} heartbeats/s`,
      );
      metrics[`${r.label}_cpu_per_heartbeat_fit_us`] = Math.round(fit.slopeUs * 10) / 10;
    }

    if (r.reads) printReads(r.label, r.reads, checks, metrics);

    if (r.phase3.length > 0) {
      console.log('\n  phase 3: more agents at the normal interval, a fresh controller each');
      const header = [
        'agents',
        'connect all',
        'connect errors',
        'acked',
        'p50',
        'p99',
        'max',
        'errors',
        'ctrl CPU',
        'db CPU',
        'others CPU',
        'RSS',
        'RSS/agent',
        'CPU/agent',
      ];
      const rows = [header];
      for (const point of [p1, ...r.phase3]) {
        const w = point.window;
        rows.push([
          formatCount(point.connect.agents),
          point.connect.complete ? formatMs(point.connect.allMs) : 'incomplete',
          formatCount(sum(Object.values(point.connect.errors))),
          w ? rate(w.rate) : '-',
          w ? lat(w.p50) : '-',
          w ? lat(w.p99) : '-',
          w ? lat(w.max) : '-',
          w ? String(w.errorCount + w.lateAcks) : '-',
          w ? pct(w.controllerCpu) : '-',
          w ? pct(w.databaseCpu) : '-',
          w ? pct(w.otherCpu) : '-',
          w ? `${mib(w.rssBytes)} MiB` : '-',
          w ? `${((w.rssBytes - point.baselineRssBytes) / w.agents / 1024).toFixed(1)} KiB` : '-',
          w ? `${((w.controllerCpu / w.agents) * 1e6).toFixed(1)} µs/s` : '-',
        ]);
      }
      for (const line of columns(
        rows,
        header.map((_, i) => i > 0),
      ))
        console.log(`    ${line}`);
      console.log(`    stopped: ${r.phase3Stop}`);
    }

    if (r.profile) printProfile(r.profile);

    checks.push({
      name: `${p}: all ${o.agents} agents connected within ${formatMs(o.connectTimeoutMs)}, and the controller counted them`,
      ok: p1.connect.complete && p1.connect.serverConnected === o.agents,
      detail: `metalcast_agents_connected ${p1.connect.serverConnected}; errors ${JSON.stringify(p1.connect.errors)}`,
    });
    if (w1) {
      checks.push(
        {
          name: `${p}: no errors at the normal interval`,
          ok: w1.errorCount === 0 && w1.lateAcks === 0 && w1.connected === o.agents,
          detail: `${describeErrors(w1)}; ${w1.connected} connected at the end`,
        },
        {
          name: `${p}: ${formatCount(o.agents)} agents at the normal interval with p99 under ${GOAL_P99_MS} ms (goal: ${formatCount(GOAL_AGENTS)} agents)`,
          ok: w1.p99 < GOAL_P99_MS,
          detail: `p99 ${lat(w1.p99)}, max ${lat(w1.max)}`,
        },
      );
      Object.assign(metrics, {
        [`${p}_create_nodes_ms`]: round(p1.createMs),
        [`${p}_connect_all_ms`]: round(p1.connect.allMs),
        [`${p}_connect_p99_ms`]: round(p1.connect.p99),
        [`${p}_p1_rate_per_s`]: round(w1.rate),
        [`${p}_p1_p50_ms`]: round(w1.p50),
        [`${p}_p1_p99_ms`]: round(w1.p99),
        [`${p}_p1_max_ms`]: round(w1.max),
        [`${p}_p1_errors_count`]: w1.errorCount + w1.lateAcks,
        [`${p}_p1_controller_cpu_ratio`]: round(w1.controllerCpu),
        [`${p}_p1_controller_rss_bytes`]: w1.rssBytes,
        [`${p}_p1_rss_per_agent_bytes`]: Math.round((w1.rssBytes - p1.baselineRssBytes) / o.agents),
        [`${p}_p1_cpu_per_heartbeat_us`]: round(w1.serverRate > 0 ? (w1.controllerCpu / w1.serverRate) * 1e6 : Number.NaN),
      });
      headlines.push(`${p}: ${formatCount(o.agents)} agents p99 ${lat(w1.p99)} at ${rate(w1.rate)}`);
    }
    if (sustainable) {
      metrics[`${p}_sustainable_rate_per_s`] = round(sustainable.rate);
      metrics[`${p}_sustainable_p99_ms`] = round(sustainable.p99);
      headlines.push(`sustainable ${rate(sustainable.rate)}`);
    }
    r.phase2.forEach((w) => {
      metrics[`${p}_p2_x${w.speedup}_rate_per_s`] = round(w.rate);
      metrics[`${p}_p2_x${w.speedup}_p99_ms`] = round(w.p99);
    });
    const largest = [p1, ...r.phase3].filter((point) => point.window && !fleetProblem(point.window)).at(-1);
    if (largest) {
      metrics[`${p}_largest_fleet_count`] = largest.connect.agents;
      if (r.phase3.length > 0) headlines.push(`largest fleet ${formatCount(largest.connect.agents)}`);
    }
    r.phase3.forEach((point) => {
      if (!point.window) return;
      metrics[`${p}_p3_${point.connect.agents}_p99_ms`] = round(point.window.p99);
      metrics[`${p}_p3_${point.connect.agents}_rss_bytes`] = point.window.rssBytes;
      metrics[`${p}_p3_${point.connect.agents}_connect_all_ms`] = round(point.connect.allMs);
    });
  }
  return { headline: headlines.join('; '), metrics, checks };
}

/** The reads comparison: CPU per heartbeat by mode, the ratio, its check and metrics. */
function printReads(label: string, reads: ReadsComparison, checks: BenchCheck[], metrics: Record<string, number>): void {
  console.log(`\n  reads: the conductor's heartbeat reads, ${reads.rounds} round(s) of alternating controllers on the same agents`);
  const header = ['mode', 'windows', 'heartbeats', 'CPU per heartbeat (controller + database)', 'p99 at the top rate, by round'];
  const rows = [header];
  for (const mode of READ_MODES) {
    const windows = reads.windows[mode.key];
    const top = Math.max(0, ...windows.map((w) => w.speedup));
    const p99s = windows.filter((w) => w.speedup === top).map((w) => w.p99);
    const cpu = reads.cpuPerHeartbeatUs[mode.key];
    rows.push([
      mode.name,
      String(windows.length),
      formatCount(Math.round(sum(windows.map((w) => (w.serverRate * w.windowMs) / 1000)))),
      cpu === undefined ? '-' : `${cpu.toFixed(0)} µs`,
      p99s.length ? `${p99s.map(lat).join(', ')} (x${top})` : '-',
    ]);
    if (cpu !== undefined) metrics[`${label}_reads_${mode.key}_cpu_per_heartbeat_us`] = Math.round(cpu * 10) / 10;
  }
  for (const line of columns(
    rows,
    header.map((_, i) => i > 0),
  ))
    console.log(`    ${line}`);
  if (reads.stop) console.log(`    stopped: ${reads.stop}`);
  const ratio = reads.ratio;
  const bar = READS_MIN_RATIO[label === 'postgres' ? 'postgres' : 'sqlite'];
  console.log(
    `    a heartbeat costs ${ratio === undefined ? '-' : `${ratio.toFixed(2)}x`} less CPU with batched reads ` +
      `(CPU per heartbeat with a read each, over batched; bar: at least ${bar}x)`,
  );
  if (ratio !== undefined) metrics[`${label}_reads_cpu_ratio`] = Math.round(ratio * 1000) / 1000;
  checks.push({
    name: `${label}: batched heartbeat reads cut the CPU a heartbeat costs (controller and database) at least ${bar}x against a read per heartbeat, in the same run`,
    ok: ratio !== undefined && ratio >= bar,
    detail:
      ratio === undefined
        ? `not measured (${reads.rounds} round(s)${reads.stop ? `; ${reads.stop}` : ''})`
        : `${ratio.toFixed(2)}x: ${reads.cpuPerHeartbeatUs.each?.toFixed(0)} µs before, ${reads.cpuPerHeartbeatUs.batched?.toFixed(0)} µs after`,
  });
}

export function stepProblem(w: Window): string | undefined {
  if (w.errorCount > 0 || w.lateAcks > 0) return `errors at x${w.speedup}: ${describeErrors(w)}`;
  if (w.p99 > STEP_P99_MS) return `p99 ${formatMs(w.p99)} passed ${STEP_P99_MS} ms at x${w.speedup}`;
  if (w.rate < MIN_DELIVERED_RATIO * w.targetRate) {
    return `the fleet delivered ${Math.round((100 * w.rate) / w.targetRate)} % of the ${formatCount(Math.round(w.targetRate))}/s asked for at x${w.speedup} (machine saturated)`;
  }
  return undefined;
}

export function fleetProblem(w: Window | undefined): string | undefined {
  if (!w) return 'no measurement';
  if (w.errorCount > 0 || w.lateAcks > 0) return `errors with ${formatCount(w.agents)} agents: ${describeErrors(w)}`;
  if (w.p99 > GOAL_P99_MS) return `p99 ${formatMs(w.p99)} passed ${GOAL_P99_MS} ms with ${formatCount(w.agents)} agents`;
  if (w.rssBytes > MAX_RSS_SHARE * totalmem()) return `controller RSS ${mib(w.rssBytes)} MiB passed half the machine's memory`;
  if (w.controllerCpu > MAX_CPU_CORES) return `controller CPU ${(w.controllerCpu * 100).toFixed(0)} % of a core`;
  return undefined;
}

export function describeErrors(w: Window): string {
  const parts = Object.entries(w.errors).map(([code, n]) => `${code} ${n}`);
  if (w.lateAcks > 0) parts.push(`${w.lateAcks} acks later than 1 s at the window's end`);
  return parts.join(', ') || 'none';
}
