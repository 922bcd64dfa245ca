import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';

import { CLK_TCK } from './settings.js';
import { sum } from './report.js';

// ---------------------------------------------------------------------------
// /proc and /metrics.

/** utime + stime of a process, in seconds; NaN once it is gone. */
export function procCpuSeconds(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may hold spaces; fields after it are counted from its closing parenthesis.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
  } catch {
    return Number.NaN;
  }
}

export function procStatus(pid: number): { rssBytes: number; hwmBytes: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? Number.NaN) * 1024;
  return { rssBytes: kib('VmRSS'), hwmBytes: kib('VmHWM') };
}

export function countFds(pid: number): number {
  try {
    return readdirSync(`/proc/${pid}/fd`).length;
  } catch {
    return Number.NaN;
  }
}

/**
 * The PostgreSQL backends serving `pid`'s connections: its sockets' local
 * ports (from /proc) matched with pg_stat_activity.client_port.
 */
export async function postgresBackendPids(pid: number, postgresUrl: string): Promise<number[]> {
  const serverPort = Number(new URL(postgresUrl).port || 5432);
  const inodes = new Set<string>();
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m) inodes.add(m[1]!);
    } catch {
      // Closed meanwhile.
    }
  }
  const ports: number[] = [];
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    for (const line of readFileSync(table, 'utf8').split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 10 || !inodes.has(f[9]!)) continue;
      const remotePort = Number.parseInt(f[2]!.split(':')[1]!, 16);
      if (remotePort === serverPort) ports.push(Number.parseInt(f[1]!.split(':')[1]!, 16));
    }
  }
  if (ports.length === 0) return [];
  const client = new pg.Client({ connectionString: postgresUrl, connectionTimeoutMillis: 5000 });
  await client.connect();
  try {
    const { rows } = await client.query<{ pid: number }>('SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1::int[])', [ports]);
    return rows.map((r) => r.pid);
  } finally {
    await client.end();
  }
}

/** Jiffies of the whole machine since boot: busy (everything but idle and iowait) and total. */
export function machineCpu(): { busy: number; total: number } {
  const line = readFileSync('/proc/stat', 'utf8').split('\n')[0]!;
  const values = line.trim().split(/\s+/).slice(1, 9).map(Number);
  const total = sum(values);
  const idle = values[3]! + values[4]!;
  return { busy: total - idle, total };
}

/** The soft and hard limits on open files of this process (the controller inherits them). */
export function fileLimits(): string {
  try {
    const line = readFileSync('/proc/self/limits', 'utf8')
      .split('\n')
      .find((l) => l.startsWith('Max open files'));
    const [soft, hard] = line!.slice('Max open files'.length).trim().split(/\s+/);
    return soft === hard ? `${soft}` : `${soft} (hard ${hard})`;
  } catch {
    return 'unknown';
  }
}

/** Every sample of /metrics by its name with labels. */
export async function scrapeAll(url: string): Promise<Map<string, number>> {
  const response = await fetch(url, { signal: AbortSignal.timeout(10_000) });
  if (!response.ok) throw new Error(`${url} answered ${response.status}`);
  const samples = new Map<string, number>();
  for (const line of (await response.text()).split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const space = line.lastIndexOf(' ');
    samples.set(line.slice(0, space), Number(line.slice(space + 1)));
  }
  return samples;
}

/** Polls /metrics (every 250 ms, at most 10 s) until `sample` equals `expected`; returns the last value seen. */
export async function waitForMetric(url: string, sample: string, expected: number): Promise<number | undefined> {
  let value: number | undefined;
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    value = await scrapeAll(url)
      .then((m) => m.get(sample))
      .catch(() => undefined);
    if (value === expected) break;
    await sleep(250);
  }
  return value;
}

/** Polls `check` every 100 ms until it holds or `timeoutMs` passed; returns whether it held. */
export async function waitFor(check: () => boolean, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() >= deadline) return false;
    await sleep(100);
  }
  return true;
}
