import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { createWriteStream } from 'node:fs';
import { fileURLToPath } from 'node:url';

const METALCAST = fileURLToPath(new URL('../bin/metalcast.js', import.meta.url));

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
  timeoutMs = 20_000,
): Promise<{ program: Program; readyLine: Record<string, unknown> }> {
  const child = spawn(process.execPath, [METALCAST, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const log = createWriteStream(logFile);
  child.stderr?.pipe(log, { end: false });
  const exited = once(child, 'exit').then(([code, signal]) => (code ?? signal) as number | string);
  const readyLine = await new Promise<Record<string, unknown>>((resolve, reject) => {
    let buffered = '';
    let found = false;
    const timer = setTimeout(() => reject(new Error(`metalcast ${args[0]} not ready within ${timeoutMs}ms; see ${logFile}`)), timeoutMs);
    child.stdout?.setEncoding('utf8').on('data', (chunk: string) => {
      log.write(chunk);
      if (found) return;
      buffered += chunk;
      for (let nl = buffered.indexOf('\n'); nl >= 0 && !found; nl = buffered.indexOf('\n')) {
        const text = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        try {
          const line = JSON.parse(text) as Record<string, unknown>;
          if (ready(line)) {
            found = true;
            clearTimeout(timer);
            resolve(line);
          }
        } catch {
          // not a log line
        }
      }
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
