import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { onJsonLogLines } from '../../demo/processes.js';

const METALCAST = fileURLToPath(new URL('../../bin/metalcast.js', import.meta.url));

export interface AgentProcess {
  child: ChildProcess;
  /** Every JSON log line so far, parsed. */
  logs: Record<string, unknown>[];
  /** Resolves with the first log line matching, or rejects after the timeout (with the last lines). */
  waitForLog(match: (line: Record<string, unknown>) => boolean, timeoutMs?: number): Promise<Record<string, unknown>>;
  /** Resolves with the exit code (or the signal name). */
  exited: Promise<number | string>;
  /** Sends a signal and waits for the exit. */
  kill(signal?: NodeJS.Signals): Promise<number | string>;
}

export interface SpawnAgentOptions {
  /**
   * A command that runs the agent, for example ['ip', 'netns', 'exec', 'ns1'];
   * it must exec the agent (not fork it), so that signals reach the agent.
   */
  prefix?: string[];
}

/**
 * Starts a real `metalcast agent` process against a fake machine. Flags are
 * the command line's, for example { controller: '127.0.0.1:1234', root }.
 * Defaults keep tests quick: short reconnect delays and a recording power
 * driver; and plaintext (--insecure) unless the flags give --ca.
 */
export function spawnAgent(flags: Record<string, string>, options: SpawnAgentOptions = {}): AgentProcess {
  const all: Record<string, string> = {
    listen: '127.0.0.1:0',
    'log-level': 'debug',
    'lookup-backoff-start': '100ms',
    'lookup-backoff-max': '500ms',
    'reconnect-delay': '200ms',
    'min-heartbeat-gap': '200ms',
    'keepalive-time': '1s',
    'keepalive-timeout': '1s',
    // Plaintext unless the test gives a CA bundle to verify the controller with.
    ...(flags.ca || flags['ca-url'] ? {} : { insecure: 'true' }),
    ...flags,
  };
  if (!all['power-driver']) {
    all['power-driver'] = 'recording';
    all['power-record-file'] ??= `${all.root ?? '/tmp'}/power-actions.log`;
  }
  const args = [METALCAST, 'agent', ...Object.entries(all).flatMap(([k, v]) => [`--${k}`, v])];
  const [command, ...commandArgs] = [...(options.prefix ?? []), process.execPath, ...args] as [string, ...string[]];
  const child = spawn(command, commandArgs, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, METALCAST_LOG_LEVEL: '' } });
  const logs: Record<string, unknown>[] = [];
  const listeners = new Set<(line: Record<string, unknown>) => void>();
  const stderrTail: string[] = [];
  onJsonLogLines(child.stdout, (line) => {
    logs.push(line);
    for (const listener of listeners) listener(line);
  });
  child.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
    stderrTail.push(chunk);
    if (stderrTail.length > 50) stderrTail.shift();
  });
  const exited = once(child, 'exit').then(([code, signal]) => (code ?? signal) as number | string);

  const describeTail = () =>
    `\nlast agent log lines:\n${logs
      .slice(-8)
      .map((l) => JSON.stringify(l))
      .join('\n')}\nstderr: ${stderrTail.join('').slice(-2000)}`;

  return {
    child,
    logs,
    exited,
    waitForLog(match, timeoutMs = 15_000) {
      const found = logs.find(match);
      if (found) return Promise.resolve(found);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          listeners.delete(listener);
          reject(new Error(`agent log line not seen within ${timeoutMs}ms${describeTail()}`));
        }, timeoutMs);
        const listener = (line: Record<string, unknown>) => {
          if (!match(line)) return;
          clearTimeout(timer);
          listeners.delete(listener);
          resolve(line);
        };
        listeners.add(listener);
        exited.then((code) => {
          if (!listeners.has(listener)) return;
          clearTimeout(timer);
          listeners.delete(listener);
          reject(new Error(`agent exited (${code}) before the log line appeared${describeTail()}`));
        });
      });
    },
    async kill(signal = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
  };
}

/** Matches a log line by its message. */
export const msg = (text: string) => (line: Record<string, unknown>) => typeof line.msg === 'string' && line.msg.includes(text);
