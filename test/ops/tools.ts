import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { join } from 'node:path';
import { parsePrometheusText } from '../helpers/prometheus-text.js';

/** Under CI=true a missing tool fails the test; elsewhere it skips with the command that installs it. */
export const IN_CI = process.env.CI === 'true';

/** An external command the operations tests run (systemd-analyze, promtool, prometheus). */
export interface Tool {
  name: string;
  /** Absolute path, or undefined when it is not on PATH. */
  path: string | undefined;
  /** For `it(..., { skip })`: a reason outside CI when the tool is missing, otherwise false. */
  skip: string | false;
  /** The tool's path; fails the test when it is missing (only reached under CI=true). */
  require(): string;
}

export function findTool(name: string, install: string): Tool {
  const path = (process.env.PATH ?? '')
    .split(':')
    .filter((dir) => dir !== '')
    .map((dir) => join(dir, name))
    .find((candidate) => {
      try {
        accessSync(candidate, constants.X_OK);
        return true;
      } catch {
        return false;
      }
    });
  const missing = `${name} is not installed; install it with: ${install}`;
  return {
    name,
    path,
    skip: path === undefined && !IN_CI ? missing : false,
    require() {
      if (path === undefined) assert.fail(`${missing} (CI=true: this check must run, not skip)`);
      return path;
    },
  };
}

export const PROMETHEUS_APT = 'apt-get install -y --no-install-recommends prometheus';

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion with optional stdin, killing it after timeoutMs. Never rejects on a non-zero exit. */
export function run(
  command: string,
  args: string[],
  options: { input?: string; cwd?: string; timeoutMs?: number } = {},
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd: options.cwd, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => {
      stdout += chunk;
    });
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => {
      stderr += chunk;
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 30_000);
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
    child.stdin.end(options.input ?? '');
  });
}

/** Every series name a scrape can produce: family names, and _bucket, _sum, _count of histograms and summaries. */
export function exposedNames(metricsText: string): Set<string> {
  const names = new Set<string>();
  for (const family of parsePrometheusText(metricsText).values()) {
    names.add(family.name);
    const suffixes = family.type === 'histogram' ? ['_bucket', '_sum', '_count'] : family.type === 'summary' ? ['_sum', '_count'] : [];
    for (const suffix of suffixes) names.add(family.name + suffix);
  }
  return names;
}

const KEYWORDS = new Set([
  'and',
  'or',
  'unless',
  'by',
  'without',
  'on',
  'ignoring',
  'group_left',
  'group_right',
  'offset',
  'bool',
  'inf',
  'nan',
]);

/**
 * The metric names a PromQL expression selects. Not a parser: strings,
 * label matchers, ranges and grouping clauses are removed, then every
 * identifier that is not a function call, a keyword or part of a number
 * is a metric name. Grafana variables must be substituted first.
 */
export function metricNamesIn(expr: string): Set<string> {
  const stripped = expr
    .replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, '""')
    .replace(/\{[^}]*\}/g, ' ')
    .replace(/\[[^\]]*\]/g, ' ')
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' ');
  const names = new Set<string>();
  for (const match of stripped.matchAll(/[0-9.][0-9a-zA-Z_.]*|([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?/g)) {
    const [, identifier, call] = match;
    if (identifier === undefined || call !== undefined || KEYWORDS.has(identifier.toLowerCase())) continue;
    names.add(identifier);
  }
  return names;
}
