import assert from 'node:assert/strict';
import { readFileSync, rmSync } from 'node:fs';
import { describe, it } from 'node:test';
import { ipmiBmcUnavailable } from '../../lab/bmc/ipmi/ipmi-bmc.js';
import { checkNoInsecureAgent, runLab } from '../../lab/lab.js';
import { pxeNetworkUnavailable } from '../../lab/network/pxe-network.js';
import { labUnavailable } from '../../lab/prerequisites.js';
import type { Guest } from '../../lab/qemu.js';

/*
 * `npm run lab -- --power ipmi` with one guest: powered through a real IPMI
 * BMC (ipmi_sim, reached with ipmitool over lanplus), network-booted through
 * dnsmasq in a network namespace (`metalcast boot dnsmasq-config --mode
 * full`), TLS on with the controller's CA pinned on the ramdisk's command
 * line: inspected, cleaned, deployed (boot device set to disk over IPMI, then
 * a reset), booted from its disk (the test image's marker on its console),
 * and undeployed through cleaning, powered off over IPMI. No agent ran with
 * metalcast.insecure. Needs root, QEMU, ipmi_sim, ipmitool, dnsmasq and
 * Debian's ipxe; fails under CI=true without them, skips otherwise.
 */

const unavailable = labUnavailable() ?? ipmiBmcUnavailable() ?? pxeNetworkUnavailable();
const skip = unavailable && process.env.CI !== 'true' ? `cannot run the IPMI lab here: ${unavailable}` : false;
if (skip) process.stderr.write(`lab-ipmi.test.ts: skipping: ${skip}\n`);

const LAB_TIMEOUT_MS = 12 * 60_000;

describe('lab: a guest powered over IPMI and booted through dnsmasq, TLS on', { skip, timeout: LAB_TIMEOUT_MS + 60_000 }, () => {
  it('inspects, cleans, deploys, boots the disk and cleans again, with no insecure agent', { timeout: LAB_TIMEOUT_MS }, async (ctx) => {
    if (unavailable) throw new Error(`CI=true, so the IPMI lab must run, but it cannot here: ${unavailable}`);
    let guests: readonly Guest[] = [];
    let work = '';
    try {
      const result = await runLab({
        nodes: 1,
        power: 'ipmi',
        phaseTimeoutMs: 5 * 60_000,
        keep: true,
        log: (line) => ctx.diagnostic(line),
        onGuests: (all, folder) => {
          guests = all;
          work = folder;
        },
      });
      ctx.diagnostic(`timings: ${result.timings.map(([name, ms]) => `${name} ${(ms / 1000).toFixed(1)} s`).join('; ')}`);
      // What runLab checked, checked again here on the kept files: the IPMI BMC and dnsmasq did the work.
      checkNoInsecureAgent(result.guests);
      const controllerLog = readFileSync(`${result.work}/controller.log`, 'utf8');
      assert.match(controllerLog, /"driver":"ipmi".*powered on into network boot/);
      assert.match(controllerLog, /"driver":"ipmi".*final reboot through the power driver/);
      assert.match(readFileSync(`${result.work}/dnsmasq.log`, 'utf8'), /DHCPACK\(br0\) [0-9.]+ 52:54:00:4d:00:01/);
      // The BMC password (a node secret) is in the BMC's own lan.conf and nowhere in the controller's log.
      const lanConf = readFileSync(`${result.work}/lab-node-1-bmc/lan.conf`, 'utf8');
      const password = /user 2 true "admin" "([^"]+)"/.exec(lanConf)?.[1];
      assert.ok(password && password.length >= 12, 'the lab BMC has a password');
      assert.ok(!controllerLog.includes(password), 'the BMC password is in the controller log');
      rmSync(result.work, { recursive: true, force: true });
    } catch (error) {
      const consoles = guests.map((g) => `--- console of ${g.name} (${g.consolePath}):\n${g.consoleTail(40)}`).join('\n');
      throw new Error(`${(error as Error).message}\nfiles kept in ${work} (controller.log, dnsmasq.log, consoles, BMC logs)\n${consoles}`, {
        cause: error,
      });
    }
  });
});
