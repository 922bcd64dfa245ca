import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Store } from '../../controller/store/store.js';
import { formatCount, formatMs, logTail } from '../harness.js';

import {
  STEP_P99_MS,
  OTHERS_LIMIT,
  CREATE_CONCURRENCY,
  IDLE_MS,
  type Options,
  type DatabaseKind,
  type FleetPoint,
  type DatabaseRun,
} from './settings.js';
import { openSqliteStore, openPostgresStore, ensureNodes, PostgresSchema } from './nodes.js';
import { FleetSession } from './fleet.js';
import { summarizeProfiles } from './profile.js';
import { compareReads, readsReserveMs } from './reads-comparison.js';
import { seconds, pct, printConnect, printWindows, printStep, stepProblem, fleetProblem } from './report.js';

export async function runDatabase(database: DatabaseKind, o: Options, dir: string, deadline: number): Promise<DatabaseRun> {
  const label = database.kind;
  mkdirSync(dir, { recursive: true });
  const logPath = join(dir, 'controller.log');
  const profDir = join(dir, 'prof');
  const db = database.kind === 'postgres' ? await PostgresSchema.create(database.url) : undefined;
  const databaseUrl = db ? db.url : `sqlite:${join(dir, 'data', 'metalcast.db')}`;
  const openDb = (): Promise<Store> =>
    db ? openPostgresStore(db.url) : Promise.resolve(openSqliteStore(join(dir, 'data', 'metalcast.db')));
  const nodes: { uuid: string; token: string }[] = [];
  const out: DatabaseRun = { label, phase2: [], phase3: [] };
  console.log(`\n=== ${label}: ${db ? db.display : databaseUrl} ===`);
  try {
    // Phase 1 and 2: one controller, N agents.
    const created = await ensureNodes(openDb, nodes, o.agents);
    console.log(
      `  ${formatCount(created.count)} nodes created in inspecting with known tokens in ${formatMs(created.ms)} ` +
        `(${formatCount(Math.round(created.count / (created.ms / 1000)))} nodes/s, ${CREATE_CONCURRENCY} at a time through the Store)`,
    );
    const session = await FleetSession.start(
      o,
      databaseUrl,
      dir,
      logPath,
      nodes.slice(0, o.agents),
      o.cpuProf ? profDir : undefined,
      db?.adminUrl,
    );
    try {
      const connect = await session.connect();
      printConnect(label, connect);
      const point: FleetPoint = {
        connect,
        window: undefined,
        baselineRssBytes: session.baselineRssBytes,
        idleCpu: session.idleCpu,
        createMs: created.ms,
        created: created.count,
      };
      out.phase1 = point;
      if (!connect.complete) throw new Error(`only some agents connected within ${formatMs(o.connectTimeoutMs)}; see ${logPath}`);
      await sleep(o.settleMs);
      point.window = await session.measureQuiet(o.windowMs, (w) => !fleetProblem(w));
      printWindows(
        `${label} phase 1: ${formatCount(o.agents)} agents at the normal interval, ${seconds(o.windowMs)} s window`,
        [point.window],
        point.baselineRssBytes,
        point.idleCpu,
      );

      // Phase 2: faster and faster, leaving time for the reads comparison.
      const phase2Deadline = deadline - readsReserveMs(o, connect.allMs);
      let speedup = 1;
      for (let step = 1; step <= o.maxSteps; step++) {
        if (performance.now() + o.settleMs + o.stepWindowMs + 15_000 > phase2Deadline) {
          out.phase2Stop = `time budget (--budget ${seconds(o.budgetMs)} s) reached`;
          break;
        }
        speedup *= 2;
        session.setSpeed(speedup);
        await sleep(o.settleMs);
        const w = await session.measureQuiet(o.stepWindowMs, (w) => !stepProblem(w));
        out.phase2.push(w);
        printStep(w);
        const stop = stepProblem(w);
        // A failure while other processes held the CPU is not conclusive: one more step decides.
        const previousFailed = out.phase2.length > 1 && stepProblem(out.phase2.at(-2)!) !== undefined;
        if (stop && (w.errorCount > 0 || w.otherCpu <= OTHERS_LIMIT || previousFailed)) {
          out.phase2Stop = stop;
          break;
        }
        if (stop) console.log(`    (x${speedup} failed while other processes used ${pct(w.otherCpu)} of a core: trying the next step)`);
      }
      if (o.maxSteps > 0 && !out.phase2Stop) out.phase2Stop = `--max-steps ${o.maxSteps} done without passing ${STEP_P99_MS} ms`;
    } finally {
      await session.stop();
    }
    if (o.cpuProf) out.profile = summarizeProfiles(profDir);

    // The conductor's heartbeat reads, before and after batching, on the same agents.
    if (o.compareRounds > 0) {
      out.reads = await compareReads(
        o,
        databaseUrl,
        dir,
        logPath,
        nodes.slice(0, o.agents),
        db?.adminUrl,
        out.phase1?.connect.allMs ?? o.connectTimeoutMs,
        deadline,
      );
    }

    // Phase 3: bigger fleets, each on a fresh controller, same database.
    for (let agents = o.agents * 2; o.maxAgents > 0 && agents <= o.maxAgents; agents *= 2) {
      // Creating the nodes and connecting at the pace phase 1 showed (connecting twice as slowly per agent), then a window.
      const createMsPerNode = created.ms / Math.max(1, created.count);
      const connectMsPerAgent = (out.phase1?.connect.allMs ?? 0) / o.agents;
      const estimateMs =
        (agents - nodes.length) * createMsPerNode + agents * connectMsPerAgent * 2 + IDLE_MS + o.settleMs + o.windowMs + 20_000;
      if (performance.now() + estimateMs > deadline) {
        out.phase3Stop = `time budget (--budget ${seconds(o.budgetMs)} s) reached before ${formatCount(agents)} agents`;
        break;
      }
      const more = await ensureNodes(openDb, nodes, agents);
      const bigger = await FleetSession.start(o, databaseUrl, dir, logPath, nodes.slice(0, agents), undefined, db?.adminUrl);
      let point: FleetPoint | undefined;
      try {
        const connect = await bigger.connect();
        printConnect(label, connect);
        point = {
          connect,
          window: undefined,
          baselineRssBytes: bigger.baselineRssBytes,
          idleCpu: bigger.idleCpu,
          createMs: more.ms,
          created: more.count,
        };
        out.phase3.push(point);
        if (!point.connect.complete) {
          out.phase3Stop = `only part of ${formatCount(agents)} agents connected within ${formatMs(o.connectTimeoutMs)}`;
          break;
        }
        await sleep(o.settleMs);
        point.window = await bigger.measureQuiet(o.windowMs, (w) => !fleetProblem(w));
        printWindows(
          `${label} phase 3: ${formatCount(agents)} agents at the normal interval`,
          [point.window],
          point.baselineRssBytes,
          point.idleCpu,
        );
      } finally {
        await bigger.stop();
      }
      const stop = fleetProblem(point?.window);
      // As in phase 2: a failure while other processes held the CPU is not conclusive; the next size decides.
      const previous = out.phase3.at(-2);
      const previousFailed = previous !== undefined && fleetProblem(previous.window) !== undefined;
      if (stop && (!point?.window || point.window.errorCount > 0 || point.window.otherCpu <= OTHERS_LIMIT || previousFailed)) {
        out.phase3Stop = stop;
        break;
      }
      if (stop) console.log(`    (${formatCount(agents)} agents failed while other processes held the CPU: trying the next size)`);
    }
    if (o.maxAgents > 0 && !out.phase3Stop) out.phase3Stop = `--max-agents ${formatCount(o.maxAgents)} reached`;
    return out;
  } catch (error) {
    console.error(`  ${label}: failed; last lines of ${logPath}:\n${logTail(logPath, 15)}`);
    throw error;
  } finally {
    await db?.drop();
  }
}
