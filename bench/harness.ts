import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setImmediate as yieldToEventLoop } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import ms from 'ms';

/** What every benchmark returns to the dispatcher, which prints it as the BENCH_RESULT line. */
export interface BenchResult {
  /** One line for the summary table: the headline numbers. */
  headline: string;
  /** Numbers for machines, named with their unit (`_ms`, `_ratio`, `_count`). */
  metrics: Record<string, number>;
  /** Deterministic facts the benchmark relies on; a failed check fails the run. Timing ratios are never checks: too noisy. */
  checks: BenchCheck[];
}

export interface BenchCheck {
  name: string;
  ok: boolean;
  detail: string;
}

/** Bad flags: the dispatcher prints the message alone, without a stack. */
export class BenchUsageError extends Error {
  override name = 'BenchUsageError';
}

/** A numeric flag of a benchmark, `--name value`. */
export interface NumberOption {
  default: number;
  description: string;
  integer?: boolean;
}

export type NumberOptions = Record<string, NumberOption>;

/** The shape of a module in bench/: see the registry in run.ts. */
export interface Benchmark {
  /** One line for `npm run bench -- --help`. */
  description: string;
  options: NumberOptions;
  /** Prints a human report while it runs; `args` are the flags after the benchmark's name. */
  run(args: string[]): Promise<BenchResult>;
}

/** Parses `--name value` flags with node:util parseArgs; every value is validated, with the flag's name in the error. */
export function parseNumberOptions<T extends NumberOptions>(args: string[], spec: T): { [K in keyof T]: number } {
  let values: Record<string, string | boolean | undefined>;
  try {
    ({ values } = parseArgs({
      args,
      options: Object.fromEntries(Object.keys(spec).map((name) => [name, { type: 'string' as const }])),
      strict: true,
      allowPositionals: false,
    }));
  } catch (error) {
    const known = Object.keys(spec)
      .map((name) => `--${name}`)
      .join(', ');
    throw new BenchUsageError(
      `${(error as Error).message}. Known flags: ${known || 'none'}. With npm, put flags after '--': npm run bench -- sweep --nodes 1000`,
    );
  }
  const result: Record<string, number> = {};
  for (const [name, option] of Object.entries(spec)) {
    const raw = values[name];
    if (raw === undefined) {
      result[name] = option.default;
      continue;
    }
    const value = Number(raw);
    if (raw === '' || !Number.isFinite(value) || value < 0 || (option.integer && !Number.isInteger(value))) {
      throw new BenchUsageError(`--${name} '${String(raw)}' is not a non-negative ${option.integer ? 'integer' : 'number'}`);
    }
    result[name] = value;
  }
  return result as { [K in keyof T]: number };
}

/**
 * Runs `fn` with a fresh directory under the system temp dir and removes it
 * afterwards, also on Ctrl-C (benchmarks yield to the event loop between runs
 * so the signal gets through).
 */
export async function withTempDir<T>(prefix: string, fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  const onSignal = (signal: NodeJS.Signals) => {
    rmSync(dir, { recursive: true, force: true });
    process.exit(signal === 'SIGINT' ? 130 : 143);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    return await fn(dir);
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    // BENCH_KEEP_DIR=1 keeps the files (process logs, --cpu-prof profiles) for a look afterwards.
    if (process.env.BENCH_KEEP_DIR === '1') console.log(`  kept ${dir} (BENCH_KEEP_DIR=1)`);
    else rmSync(dir, { recursive: true, force: true });
  }
}

/** Lets timers and signals run between measurements; never call it inside a timed section. */
export function breathe(): Promise<void> {
  return yieldToEventLoop();
}

/** Summary of repeated timings, in milliseconds. */
export interface Timings {
  runs: number;
  median: number;
  p90: number;
  min: number;
  max: number;
}

export function summarize(samplesMs: readonly number[]): Timings {
  if (samplesMs.length === 0) throw new Error('no samples to summarize');
  const sorted = [...samplesMs].sort((a, b) => a - b);
  return {
    runs: sorted.length,
    median: quantile(sorted, 0.5),
    p90: quantile(sorted, 0.9),
    min: sorted[0]!,
    max: sorted.at(-1)!,
  };
}

/** Linear interpolation between closest ranks; `sorted` ascending. */
function quantile(sorted: readonly number[], q: number): number {
  const position = (sorted.length - 1) * q;
  const below = Math.floor(position);
  const above = Math.ceil(position);
  return sorted[below]! + (sorted[above]! - sorted[below]!) * (position - below);
}

/** 1234.5 -> "1.23 s", 1.2345 -> "1.23 ms", 0.0123 -> "12.3 µs". */
export function formatMs(ms: number): string {
  if (ms >= 1000) return `${(ms / 1000).toFixed(2)} s`;
  if (ms >= 1) return `${ms.toFixed(2)} ms`;
  return `${(ms * 1000).toFixed(1)} µs`;
}

export function formatRatio(ratio: number): string {
  return `×${ratio >= 10 ? ratio.toFixed(0) : ratio.toFixed(2)}`;
}

export function formatCount(n: number): string {
  return n.toLocaleString('en-US');
}

/** Rows of cells as left-aligned columns (right-aligned where `right[i]`), two spaces apart. */
export function columns(rows: readonly string[][], right: readonly boolean[] = []): string[] {
  const widths: number[] = [];
  for (const row of rows) {
    row.forEach((cell, i) => {
      widths[i] = Math.max(widths[i] ?? 0, cell.length);
    });
  }
  return rows.map((row) =>
    row
      .map((cell, i) => (right[i] ? cell.padStart(widths[i]!) : cell.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd(),
  );
}

/** The last lines of a log file, for a failure message; '(no log)' when it cannot be read. */
export function logTail(path: string, lines: number): string {
  try {
    return readFileSync(path, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '(no log)';
  }
}

/**
 * Turns duration flags (`--window 30s`, `--down=8s`) into seconds, the unit
 * parseNumberOptions then reads; plain numbers are seconds already.
 */
export function normaliseDurations(args: string[], durationFlags: ReadonlySet<string>): string[] {
  const toSeconds = (flag: string, value: string): string => {
    if (value.trim() === '' || Number.isFinite(Number(value))) return value;
    const parsed = (ms as (s: string) => number | undefined)(value.trim());
    if (parsed === undefined || !Number.isFinite(parsed) || parsed < 0) {
      throw new BenchUsageError(`--${flag} '${value}' is neither a number of seconds nor a duration such as 500ms, 8s or 1m`);
    }
    return String(parsed / 1000);
  };
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i] as string;
    const eq = /^--([^=]+)=(.*)$/.exec(arg);
    if (eq && durationFlags.has(eq[1] as string)) {
      out.push(`--${eq[1]}=${toSeconds(eq[1] as string, eq[2] as string)}`);
    } else if (arg.startsWith('--') && durationFlags.has(arg.slice(2)) && i + 1 < args.length) {
      out.push(arg, toSeconds(arg.slice(2), args[++i] as string));
    } else {
      out.push(arg);
    }
  }
  return out;
}
