/**
 * Process plumbing for bench/transfer.ts and bench/transfer-chunks.ts: metalcast processes and helper
 * scripts with their JSON log lines, and a sampler of their CPU time and
 * resident memory from /proc.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { createWriteStream, readFileSync, type WriteStream } from 'node:fs';
import { createServer, type AddressInfo, type Server } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { onJsonLogLines } from '../demo/processes.js';

export const REPO = fileURLToPath(new URL('..', import.meta.url));
export const METALCAST = join(REPO, 'bin', 'metalcast.js');

export type LogLine = Record<string, unknown> & { msg?: string; time?: string };

/** Children still running when this process exits (an error, Ctrl-C) are killed with it. */
const KILL_ON_EXIT = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of KILL_ON_EXIT) child.kill('SIGKILL');
});

/** The environment without METALCAST_* variables, which would change the configuration of what we start. */
export function cleanEnv(): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith('METALCAST_')));
}

/** Epoch milliseconds of a pino line (ISO time), or NaN. */
export function lineTime(line: LogLine): number {
  return typeof line.time === 'string' ? Date.parse(line.time) : typeof line.time === 'number' ? line.time : Number.NaN;
}

/**
 * A child process (always `process.execPath ...`, so the pid is the Node
 * process itself) whose stdout is JSON lines; everything it prints also
 * goes to a log file.
 */
export class LoggedProcess {
  readonly child: ChildProcess;
  readonly lines: LogLine[] = [];
  readonly exited: Promise<number | string>;
  private readonly listeners = new Set<() => void>();
  private readonly log: WriteStream;
  private stderrTail = '';

  constructor(
    readonly label: string,
    args: string[],
    readonly logPath: string,
  ) {
    this.log = createWriteStream(logPath, { flags: 'a' });
    this.child = spawn(process.execPath, args, { cwd: REPO, env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    KILL_ON_EXIT.add(this.child);
    this.exited = new Promise((resolve) =>
      this.child.once('exit', (code, signal) => {
        KILL_ON_EXIT.delete(this.child);
        resolve(code ?? signal ?? 'unknown');
        this.notify();
      }),
    );
    this.child.stdout!.on('data', (chunk: Buffer) => this.log.write(chunk));
    onJsonLogLines(this.child.stdout, (line) => {
      this.lines.push(line as LogLine);
      this.notify();
    });
    this.child.stderr!.setEncoding('utf8').on('data', (chunk: string) => {
      this.log.write(chunk);
      this.stderrTail = (this.stderrTail + chunk).slice(-2000);
    });
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /**
   * The first line at index `from` or later that matches; rejects after the
   * timeout, or when the process exits first, with the last lines in the message.
   */
  waitFor(match: (line: LogLine) => boolean, timeoutMs: number, from = 0): Promise<LogLine> {
    return new Promise((resolve, reject) => {
      let checked = from;
      const check = () => {
        for (; checked < this.lines.length; checked++) {
          const line = this.lines[checked]!;
          if (match(line)) {
            done();
            resolve(line);
            return;
          }
        }
        if (!this.running) {
          done();
          reject(new Error(`${this.label} exited (${this.child.exitCode ?? this.child.signalCode}) first${this.tail()}`));
        }
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`${this.label}: no matching log line within ${timeoutMs / 1000}s${this.tail()}`));
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        this.listeners.delete(check);
      };
      this.listeners.add(check);
      check();
    });
  }

  /** SIGTERM, then SIGKILL if it has not exited in time. */
  async stop(timeoutMs = 15_000): Promise<void> {
    if (this.running) this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.kill(), timeoutMs);
    await this.exited;
    clearTimeout(timer);
    await new Promise<void>((resolve) => this.log.end(resolve));
  }

  kill(): void {
    if (this.running) this.child.kill('SIGKILL');
  }

  tail(count = 8): string {
    const lines = this.lines.slice(-count).map((l) => `    ${JSON.stringify(l).slice(0, 400)}`);
    return `\n  last lines of ${this.label} (${this.logPath}):\n${lines.join('\n')}${this.stderrTail ? `\n  stderr: ${this.stderrTail.slice(-600)}` : ''}`;
  }

  private notify(): void {
    for (const listener of [...this.listeners]) listener();
  }
}

interface Sample {
  at: number;
  /** utime + stime, clock ticks. */
  ticks: number;
  rssBytes: number;
}

const CLOCK_TICKS = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/** Pass as the pid to sample the whole machine's busy CPU time (all cores, from /proc/stat). */
export const MACHINE = 0;

/** CPU time and resident memory of chosen processes, sampled from /proc every few milliseconds. */
export class ProcSampler {
  private readonly samples = new Map<number, Sample[]>();
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly intervalMs = 50) {}

  /** Starts sampling `pid` (again); earlier samples of it are dropped. */
  track(pid: number): void {
    this.samples.set(pid, []);
    this.sample(pid);
    this.timer ??= setInterval(() => {
      for (const p of this.samples.keys()) this.sample(p);
    }, this.intervalMs);
  }

  untrack(pid: number): void {
    this.samples.delete(pid);
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
    this.samples.clear();
  }

  /** Takes one sample of every tracked process now (call at the edges of a measurement). */
  sampleAll(): void {
    for (const pid of this.samples.keys()) this.sample(pid);
  }

  /** CPU used between two times (epoch ms), as a percentage of one core; NaN without samples around them. */
  cpuPercent(pid: number, from: number, to: number): number {
    const list = this.samples.get(pid) ?? [];
    const a = interpolate(list, from);
    const b = interpolate(list, to);
    if (a === undefined || b === undefined || to <= from) return Number.NaN;
    return (((b - a) / CLOCK_TICKS) * 1000 * 100) / (to - from);
  }

  /** Highest resident set size sampled between two times, bytes. */
  peakRss(pid: number, from: number, to: number): number {
    let peak = 0;
    for (const s of this.samples.get(pid) ?? []) if (s.at >= from && s.at <= to) peak = Math.max(peak, s.rssBytes);
    return peak;
  }

  /** The latest sampled resident set size at or before `at`, bytes. */
  rssAt(pid: number, at: number): number {
    let rss = 0;
    for (const s of this.samples.get(pid) ?? []) if (s.at <= at) rss = s.rssBytes;
    return rss;
  }

  private sample(pid: number): void {
    const list = this.samples.get(pid);
    if (!list) return;
    try {
      if (pid === MACHINE) {
        // cpu  user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy.
        const f = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!.trim().split(/\s+/).slice(1).map(Number);
        list.push({ at: Date.now(), ticks: f[0]! + f[1]! + f[2]! + f[5]! + f[6]! + (f[7] ?? 0), rssBytes: 0 });
        return;
      }
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      const ticks = Number(fields[11]) + Number(fields[12]);
      const status = readFileSync(`/proc/${pid}/status`, 'utf8');
      const rss = /VmRSS:\s+(\d+) kB/.exec(status);
      list.push({ at: Date.now(), ticks, rssBytes: rss ? Number(rss[1]) * 1024 : 0 });
    } catch {
      // the process is gone
    }
  }
}

/** Peak resident set size of a running process so far (VmHWM), bytes; NaN when it is gone. */
export function highWaterMark(pid: number): number {
  try {
    const match = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return match ? Number(match[1]) * 1024 : Number.NaN;
  } catch {
    return Number.NaN;
  }
}

function interpolate(list: readonly Sample[], at: number): number | undefined {
  if (list.length === 0 || at < list[0]!.at || at > list.at(-1)!.at) return undefined;
  for (let i = 1; i < list.length; i++) {
    const b = list[i]!;
    if (b.at < at) continue;
    const a = list[i - 1]!;
    return b.at === a.at ? b.ticks : a.ticks + ((b.ticks - a.ticks) * (at - a.at)) / (b.at - a.at);
  }
  return list.at(-1)!.ticks;
}

/** Free TCP ports on 127.0.0.1, held open together so that they differ, then released. */
export async function freePorts(n: number): Promise<number[]> {
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
