import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { createWriteStream } from 'node:fs';
import { createInterface } from 'node:readline';
import type { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';

const METALCAST = fileURLToPath(new URL('../bin/metalcast.js', import.meta.url));

/**
 * Calls `handle` with every JSON log line a program writes to `stream`;
 * other lines (a stack trace, a banner) are passed over. The demo, the
 * tests and the benchmarks all read metalcast's pino output this way.
 */
export function onJsonLogLines(stream: Readable | null | undefined, handle: (line: Record<string, unknown>) => void): void {
  if (!stream) return;
  createInterface({ input: stream, crlfDelay: Number.POSITIVE_INFINITY }).on('line', (text) => {
    if (!text.startsWith('{')) return;
    let line: unknown;
    try {
      line = JSON.parse(text);
    } catch {
      return;
    }
    if (line !== null && typeof line === 'object') handle(line as Record<string, unknown>);
  });
}

export interface Program {
  child: ChildProcess;
  exited: Promise<number | string>;
  stop(signal?: NodeJS.Signals): Promise<number | string>;
}

/**
 * Starts `metalcast <args>` with its output in a log file; resolves once a
 * JSON log line satisfies `ready` (and returns that line).
 */
export async function startProgram(
  args: string[],
  logFile: string,
  ready: (line: Record<string, unknown>) => boolean,
  timeoutMs = 60_000, // a loaded machine (CI runners, a shared VM) can take long to start Node and tsx
): Promise<{ program: Program; readyLine: Record<string, unknown> }> {
  const child = spawn(process.execPath, [METALCAST, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const log = createWriteStream(logFile);
  child.stderr?.pipe(log, { end: false });
  const exited = once(child, 'exit').then(([code, signal]) => (code ?? signal) as number | string);
  const readyLine = await new Promise<Record<string, unknown>>((resolve, reject) => {
    let found = false;
    const timer = setTimeout(() => reject(new Error(`metalcast ${args[0]} not ready within ${timeoutMs}ms; see ${logFile}`)), timeoutMs);
    child.stdout?.on('data', (chunk: Buffer) => log.write(chunk));
    onJsonLogLines(child.stdout, (line) => {
      if (found || !ready(line)) return;
      found = true;
      clearTimeout(timer);
      resolve(line);
    });
    exited.then((code) => {
      clearTimeout(timer);
      if (!found) reject(new Error(`metalcast ${args[0]} exited (${code}) before it was ready; see ${logFile}`));
    });
  });
  return {
    readyLine,
    program: {
      child,
      exited,
      async stop(signal = 'SIGTERM') {
        if (child.exitCode === null && child.signalCode === null) child.kill(signal);
        const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
        const code = await exited;
        clearTimeout(timer);
        log.end();
        return code;
      },
    },
  };
}
