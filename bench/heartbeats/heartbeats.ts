/**
 * The heartbeats benchmark: how many agents, heartbeating at their normal
 * interval, can one controller process hold, and at what latency?
 *
 * Setup, per database (SQLite; PostgreSQL with a fresh schema, dropped at the end):
 * - N nodes written straight into the database the controller will open,
 *   through the Store interface, before it starts: createNode, a transition
 *   into `inspecting` (an agent state in which the conductor reads the node
 *   on every heartbeat and does nothing else) keeping the agent token, and
 *   setAgentToken with the hash and API credential of a token we keep, so
 *   that agents heartbeat at once without a lookup storm;
 * - one real controller process (bin/metalcast.js) on 127.0.0.1, ephemeral
 *   ports, production defaults except the heartbeat interval (--interval)
 *   and --insecure (plaintext: TLS is not measured), its log in a file;
 * - W worker processes (bench/heartbeats/worker.ts), N/W agents each, one
 *   Heartbeat stream per agent, multiplexed over C HTTP/2 connections in
 *   all (production has one connection per agent: more memory and CPU per
 *   agent in grpc-js, see GRPC-NOTES.md).
 *
 * Phases:
 * 1. all N agents open their streams at once (connect time), then a window
 *    at the normal interval: heartbeats/s, write-to-ack latency, errors,
 *    controller CPU and RSS (from /proc), per agent;
 * 2. the same agents, every interval divided by 2, 4, 8 ... until p99
 *    passes 100 ms or errors appear: the last step under is the sustainable
 *    heartbeat rate of one controller;
 * then the reads comparison (reads-comparison.ts): the conductor's heartbeat
 *    reads before and after batching (a read per heartbeat vs one per window),
 *    alternating fresh controllers on the same N agents: CPU per heartbeat by
 *    mode and their ratio (--compare-rounds);
 * 3. fresh controllers on the same database with 2N, 4N ... agents (up to
 *    --max-agents) at the normal interval, until p99 passes 50 ms, errors
 *    appear, or memory or CPU run out.
 * Everything is bounded: steps, sizes, and a time budget (--budget) that
 * skips what would not fit.
 *
 * The machine is shared (2 cores here, and other people's tests): every
 * window reports the CPU of the controller, of the PostgreSQL backends
 * serving it, of the workers and of everything else ("others"). Before a
 * window the benchmark waits a little for others to calm down; a window
 * that fails while others were busy is measured again (measureQuiet), and
 * a failed step or size while others were busy does not end its phase
 * unless the next one fails too.
 */
import { availableParallelism, totalmem } from 'node:os';
import { join } from 'node:path';
import { type BenchResult, breathe, formatCount, withTempDir } from '../harness.js';

export { description, options } from './settings.js';
import { type DatabaseRun, parseOptions } from './settings.js';
import { runDatabase } from './database-run.js';
import { postgresProblem } from './nodes.js';
import { fileLimits } from './proc.js';
import { seconds, report } from './report.js';

export async function run(args: string[]): Promise<BenchResult> {
  const o = parseOptions(args);
  const started = performance.now();
  const limits = fileLimits();
  console.log(
    `heartbeats: ${formatCount(o.agents)} agents in ${o.workers} worker processes over ${o.channels} HTTP/2 connections; ` +
      `controller interval U(${seconds(o.intervalMinMs)}, ${seconds(o.intervalMaxMs)}) s (mean ${seconds(o.intervalMs)} s), ` +
      `heartbeat timeout ${seconds(o.timeoutMs)} s, flush interval 1 s (default), log level info; ` +
      `${availableParallelism()} CPUs, ${(totalmem() / 2 ** 30).toFixed(1)} GiB, open files limit ${limits}; Node ${process.version}` +
      (o.quick ? '; --quick' : ''),
  );
  const results: DatabaseRun[] = [];
  return withTempDir('metalcast-bench-heartbeats-', async (dir) => {
    for (const database of o.databases) {
      if (database.kind === 'postgres') {
        const problem = await postgresProblem(database.url);
        if (problem) {
          console.log(`\n=== PostgreSQL: pending (${problem}) ===`);
          results.push({ label: 'postgres', skipped: problem, phase2: [], phase3: [] });
          continue;
        }
      }
      // Each database gets its share of the budget.
      const deadline = started + (o.budgetMs * (results.length + 1)) / o.databases.length;
      results.push(await runDatabase(database, o, join(dir, database.kind), deadline));
      await breathe();
    }
    return report(o, results);
  });
}
