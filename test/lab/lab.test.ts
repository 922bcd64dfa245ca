import { describe, it } from 'node:test';
import { runLab } from '../../lab/lab.js';
import { labUnavailable } from '../../lab/prerequisites.js';
import type { Guest } from '../../lab/qemu.js';

/*
 * The lab (npm run lab) with 2 QEMU guests: network boot from the
 * controller, inspection, cleaning, deploy of the test image with its sha256
 * checked on every disk file, each guest booting the image from its disk,
 * and one undeployed through cleaning. Skipped with the reason where QEMU
 * and its friends are missing, except under CI=true, where it must run.
 * Consoles and the controller log are kept when it fails, and the end of
 * each console is printed.
 */

const unavailable = labUnavailable();
const skip =
  unavailable && process.env.CI !== 'true'
    ? `cannot run QEMU guests here: ${unavailable} (under CI=true this test runs and fails instead)`
    : false;
if (skip) process.stderr.write(`lab.test.ts: skipping: ${skip}\n`);

/** Emulated boots are slow; five per guest here (inspect, clean, deploy, disk, and one undeploy). */
const LAB_TIMEOUT_MS = 8 * 60_000;

describe('lab: 2 QEMU guests through inspect, deploy, verify and clean', { skip, timeout: LAB_TIMEOUT_MS + 60_000 }, () => {
  it('passes every check', { timeout: LAB_TIMEOUT_MS }, async (ctx) => {
    if (unavailable) throw new Error(`CI=true, so the lab must run, but QEMU guests cannot run here: ${unavailable}`);
    let guests: readonly Guest[] = [];
    let work = '';
    try {
      const result = await runLab({
        nodes: 2,
        phaseTimeoutMs: 4 * 60_000,
        log: (line) => ctx.diagnostic(line),
        onGuests: (all, folder) => {
          guests = all;
          work = folder;
        },
      });
      ctx.diagnostic(`timings: ${result.timings.map(([name, ms]) => `${name} ${(ms / 1000).toFixed(1)} s`).join('; ')}`);
    } catch (error) {
      const consoles = guests.map((g) => `--- console of ${g.name} (${g.consolePath}):\n${g.consoleTail(40)}`).join('\n');
      throw new Error(`${(error as Error).message}\nfiles kept in ${work} (controller.log, consoles, disks)\n${consoles}`, {
        cause: error,
      });
    }
  });
});
