import { type ChildProcess, spawn } from 'node:child_process';
import { appendFileSync, writeFileSync } from 'node:fs';

/*
 * A helper process of the lab (ipmi_sim, dnsmasq) that ends with the lab,
 * however the lab ends: it runs under a small shell that kills it when our
 * end of its stdin closes, and an exit handler kills it too. Its output goes
 * to a log file.
 */

const WATCHDOG = `
exec 3<&0
"$@" </dev/null 3<&- &
child=$!
( cat <&3; kill -KILL "$child" ) >/dev/null 2>&1 &
watcher=$!
wait "$child"
status=$?
kill "$watcher" 2>/dev/null
exit "$status"
`;

export interface GuardedProcess {
  readonly child: ChildProcess;
  /** True once it ended. */
  readonly exited: boolean;
  /** Resolves when it ends. */
  readonly done: Promise<void>;
  /** The last 64 KiB of its output. */
  output(): string;
  /** SIGKILL to its process group, at once (exit handlers). */
  kill(): void;
  /** Ends it (our end of its stdin, then SIGKILL to its process group after 3 s). Idempotent; never throws. */
  stop(): Promise<void>;
}

export function spawnGuarded(command: string, args: string[], logPath: string): GuardedProcess {
  writeFileSync(logPath, '');
  // A process group of its own: stop() ends the shell and the program together, whatever the program did with its pipes.
  const child = spawn('/bin/sh', ['-c', WATCHDOG, 'lab-watchdog', command, ...args], { stdio: ['pipe', 'pipe', 'pipe'], detached: true });
  const killGroup = () => {
    try {
      if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  };
  child.stdin?.on('error', () => {});
  let log = '';
  const append = (text: Buffer) => {
    log = (log + text.toString('utf8')).slice(-65_536);
    appendFileSync(logPath, text);
  };
  child.stdout?.on('data', append);
  child.stderr?.on('data', append);
  let exited = false;
  const done = new Promise<void>((resolve) =>
    child.once('close', () => {
      exited = true;
      resolve();
    }),
  );
  const killOnExit = killGroup;
  process.once('exit', killOnExit);
  return {
    child,
    get exited() {
      return exited;
    },
    done,
    output: () => log,
    kill: killGroup,
    async stop() {
      process.off('exit', killOnExit);
      if (exited) return;
      child.stdin?.end();
      await Promise.race([done, new Promise((resolve) => setTimeout(resolve, 3000).unref())]);
      if (!exited) {
        killGroup();
        await Promise.race([done, new Promise((resolve) => setTimeout(resolve, 3000).unref())]);
      }
    },
  };
}
