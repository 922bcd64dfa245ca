import { execFile } from 'node:child_process';
import { appendFile } from 'node:fs/promises';
import { promisify } from 'node:util';

/** How the agent turns the machine off or restarts it. */
export interface PowerDriver {
  powerOff(): Promise<void>;
  reboot(): Promise<void>;
}

const run = promisify(execFile);

/**
 * Asks the operating system. `systemctl` first (a systemd ramdisk), then the
 * busybox-style commands that minimal ramdisks have.
 */
export class OsPowerDriver implements PowerDriver {
  async powerOff(): Promise<void> {
    await this.firstThatWorks([
      ['systemctl', ['poweroff']],
      ['poweroff', ['-f']],
    ]);
  }

  async reboot(): Promise<void> {
    await this.firstThatWorks([
      ['systemctl', ['reboot']],
      ['reboot', ['-f']],
    ]);
  }

  private async firstThatWorks(candidates: [string, string[]][]): Promise<void> {
    const failures: string[] = [];
    for (const [command, args] of candidates) {
      try {
        await run(command, args, { timeout: 30_000 });
        return;
      } catch (error) {
        failures.push(`${command} ${args.join(' ')}: ${(error as Error).message}`);
      }
    }
    throw new Error(`the operating system refused: ${failures.join('; ')}`);
  }
}

/** Records actions in a file instead of acting: for tests and demos that run many agents on one host. */
export class RecordingPowerDriver implements PowerDriver {
  constructor(private readonly file: string) {}

  async powerOff(): Promise<void> {
    await appendFile(this.file, `${new Date().toISOString()} power_off\n`);
  }

  async reboot(): Promise<void> {
    await appendFile(this.file, `${new Date().toISOString()} reboot\n`);
  }
}
