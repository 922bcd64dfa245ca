/**
 * Runs the benchmarks in bench/.
 *
 *   npm run bench                            every benchmark, in turn
 *   npm run bench sweep                      one
 *   npm run bench -- sweep --nodes 20000     one, with its flags (npm needs the '--')
 *   npm run bench -- --help                  the list, with each benchmark's flags
 *
 * Each benchmark prints its own report, then this prints its BENCH_RESULT
 * line (JSON, for machines) and, at the end, a summary table. The exit code
 * is 1 when a benchmark threw or one of its checks failed, 2 on bad usage.
 */
import { type Benchmark, type BenchResult, BenchUsageError, columns, formatMs } from './harness.js';

/** One line per benchmark: its name on the command line and its module. */
const BENCHMARKS: Record<string, () => Promise<Benchmark>> = {
  sweep: () => import('./sweep.js'),
  herd: () => import('./herd.js'),
  transfer: () => import('./transfer.js'),
  'transfer-chunks': () => import('./transfer-chunks.js'),
  'agent-start': () => import('./agent-start.js'),
  heartbeats: () => import('./heartbeats/heartbeats.js'),
  manifest: () => import('./manifest.js'),
  fanout: () => import('./fanout.js'),
  'fanout-tracker': () => import('./fanout-tracker.js'),
};

interface Outcome {
  name: string;
  wallMs: number;
  result?: BenchResult;
  error?: unknown;
}

async function runOne(name: string, load: () => Promise<Benchmark>, args: string[]): Promise<Outcome> {
  console.log(`\n=== ${name} ===`);
  const started = performance.now();
  try {
    const result = await (await load()).run(args);
    const wallMs = performance.now() - started;
    for (const check of result.checks.filter((c) => !c.ok)) console.log(`CHECK FAILED ${name}/${check.name}: ${check.detail}`);
    console.log(`BENCH_RESULT ${JSON.stringify({ name, ok: result.checks.every((c) => c.ok), wallMs: Math.round(wallMs), ...result })}`);
    return { name, wallMs, result };
  } catch (error) {
    const wallMs = performance.now() - started;
    console.error(`${name} failed:`, error instanceof BenchUsageError ? error.message : error);
    console.log(`BENCH_RESULT ${JSON.stringify({ name, ok: false, wallMs: Math.round(wallMs), error: String(error) })}`);
    return { name, wallMs, error };
  }
}

async function printHelp(): Promise<void> {
  console.log('usage: npm run bench [-- NAME [--flag value ...]]\n');
  for (const [name, load] of Object.entries(BENCHMARKS)) {
    const benchmark = await load();
    console.log(`${name}: ${benchmark.description}`);
    const rows = Object.entries(benchmark.options).map(([flag, o]) => [`  --${flag}`, String(o.default), o.description]);
    for (const line of columns(rows, [false, true])) console.log(line);
  }
}

function status(outcome: Outcome): string {
  if (outcome.error !== undefined) return 'ERROR';
  return outcome.result?.checks.every((c) => c.ok) ? 'ok' : 'FAILED';
}

async function main(argv: string[]): Promise<number> {
  const [first, ...rest] = argv;
  if (first === '--help' || first === '-h' || first === 'help') {
    await printHelp();
    return 0;
  }
  let selected: [string, () => Promise<Benchmark>, string[]][];
  if (first === undefined) {
    selected = Object.entries(BENCHMARKS).map(([name, load]) => [name, load, []]);
  } else {
    const load = BENCHMARKS[first];
    if (first.startsWith('-') || !load) {
      console.error(
        `${first.startsWith('-') ? `flags go after a benchmark's name, not before it` : `no benchmark named '${first}'`}; ` +
          `known: ${Object.keys(BENCHMARKS).join(', ')} (npm run bench -- --help)`,
      );
      return 2;
    }
    selected = [[first, load, rest]];
  }

  const outcomes: Outcome[] = [];
  for (const [name, load, args] of selected) outcomes.push(await runOne(name, load, args));

  console.log('\n=== summary ===');
  const rows = [
    ['benchmark', 'status', 'wall time', 'headline'],
    ...outcomes.map((o) => [o.name, status(o), formatMs(o.wallMs), o.result?.headline ?? String(o.error).split('\n')[0]!]),
  ];
  for (const line of columns(rows, [false, false, true, false])) console.log(line);
  return outcomes.every((o) => status(o) === 'ok') ? 0 : 1;
}

process.exitCode = await main(process.argv.slice(2));
