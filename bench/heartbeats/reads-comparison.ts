/**
 * The conductor's heartbeat reads, before and after batching, in one run
 * (issue 18, item 15): the controller used to read the whole node for every
 * heartbeat (--heartbeat-check-window 0); now it reads the nodes heard from
 * in a short window in one narrow query (the default window).
 *
 * Same database, same agents, a fresh controller per session. The two modes
 * alternate (per heartbeat, batched; then batched, per heartbeat; ...) so
 * that drift on a shared machine falls on both alike. Each session connects
 * its agents, then measures a window at each of COMPARE_SPEEDUPS. The
 * figure per mode is the CPU of the controller and of the PostgreSQL
 * backends serving it (SQLite runs inside the controller) over all its
 * windows, divided by the heartbeats the controller counted in them:
 * everything a heartbeat costs, the connected agents' keepalives included
 * (the same in both modes). A least-squares slope would leave those out, but
 * on this shared machine its fit was too loose to compare (r² 0.6 to 0.9
 * over three rates).
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { formatMs } from '../harness.js';
import { FleetSession } from './fleet.js';
import { printStep, seconds } from './report.js';
import { IDLE_MS, type Options, READ_MODES, type ReadModeKey, type ReadsComparison, type Window } from './settings.js';

/** Speedups over the normal interval measured in each session. */
export const COMPARE_SPEEDUPS = [2, 4, 8];

/** CPU seconds of the controller and its database over the windows, per heartbeat the controller counted in them, in µs. */
export function cpuPerHeartbeatUs(windows: readonly Window[]): number | undefined {
  const measured = windows.filter((w) => Number.isFinite(w.controllerCpu) && w.serverRate > 0);
  const cpu = (w: Window) => w.controllerCpu + (Number.isFinite(w.databaseCpu) ? w.databaseCpu : 0);
  const cpuSeconds = measured.reduce((total, w) => total + (cpu(w) * w.windowMs) / 1000, 0);
  const heartbeats = measured.reduce((total, w) => total + (w.serverRate * w.windowMs) / 1000, 0);
  return heartbeats > 0 ? (cpuSeconds / heartbeats) * 1e6 : undefined;
}

/** An estimate of one session's time: start and idle, connect, and per speed its settle, a wait for a quiet machine and the window. */
export function readsSessionMs(o: Options, connectMs: number): number {
  return 3000 + IDLE_MS + connectMs * 1.2 + COMPARE_SPEEDUPS.length * (o.settleMs + 1000 + o.stepWindowMs) * 1.1;
}

/** The time to keep for the comparison when planning the phases before it. */
export function readsReserveMs(o: Options, connectMs: number): number {
  return o.compareRounds * READ_MODES.length * readsSessionMs(o, connectMs);
}

export async function compareReads(
  o: Options,
  databaseUrl: string,
  dir: string,
  logPath: string,
  nodes: { uuid: string; token: string }[],
  postgresUrl: string | undefined,
  /** How long one session took to connect its agents in phase 1, to plan the time. */
  connectMs: number,
  deadline: number,
): Promise<ReadsComparison> {
  const windows: Record<ReadModeKey, Window[]> = { each: [], batched: [] };
  const sessionMs = readsSessionMs(o, connectMs);
  let rounds = 0;
  let stop: string | undefined;
  console.log(
    `\n  reads: the conductor's heartbeat reads, ${READ_MODES.map((m) => m.name).join(' vs ')}; ` +
      `${o.compareRounds} round(s), a fresh controller per session, windows at ${COMPARE_SPEEDUPS.map((s) => `x${s}`).join(', ')}`,
  );
  for (let round = 0; round < o.compareRounds; round++) {
    if (performance.now() + 2 * sessionMs > deadline) {
      stop = `time budget (--budget ${seconds(o.budgetMs)} s) reached after ${rounds} round(s)`;
      break;
    }
    const order = round % 2 === 0 ? READ_MODES : [...READ_MODES].reverse();
    for (const mode of order) {
      const session = await FleetSession.start(o, databaseUrl, dir, logPath, nodes, undefined, postgresUrl, mode.flags);
      try {
        const connect = await session.connect();
        if (!connect.complete)
          throw new Error(`only some agents connected within ${formatMs(o.connectTimeoutMs)} (${mode.key}); see ${logPath}`);
        for (const speedup of COMPARE_SPEEDUPS) {
          session.setSpeed(speedup);
          await sleep(o.settleMs);
          // Any window counts: the fit wants CPU over rate, and a disturbed one is measured again.
          const w = await session.measureQuiet(o.stepWindowMs, (x) => x.otherCpu <= 0.25);
          windows[mode.key].push(w);
          printStep(w, `reads ${mode.key.padEnd(7)} #${round + 1}`);
        }
      } finally {
        await session.stop();
      }
    }
    rounds++;
  }
  const before = cpuPerHeartbeatUs(windows.each);
  const after = cpuPerHeartbeatUs(windows.batched);
  return {
    windows,
    cpuPerHeartbeatUs: { each: before, batched: after },
    ratio: before !== undefined && after !== undefined && after > 0 ? before / after : undefined,
    rounds,
    ...(stop ? { stop } : {}),
  };
}
