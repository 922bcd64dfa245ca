import assert from 'node:assert/strict';
import { readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { virtualMediaUnavailable } from '../../lab/bmc/redfish/lab-bmc.js';
import { checkNoInsecureAgent, runLab } from '../../lab/lab.js';
import { pxeNetworkUnavailable } from '../../lab/network/pxe-network.js';
import { labUnavailable } from '../../lab/prerequisites.js';
import type { Guest } from '../../lab/qemu.js';

/*
 * `npm run lab -- --nodes 2 --power redfish --boot virtual-media,network`:
 * the two Redfish combinations of issue 14's bar in one lab (both guests
 * boot at once, which costs less wall time than two labs on TCG). Each guest
 * has a Redfish BMC of its own (lab/bmc/redfish, over HTTPS verified with a
 * CA file, the password from a file); guest 1 boots the agent from the ISO
 * its BMC inserts (InsertMedia, boot once from Cd, ejected at the end of
 * each step), guest 2 through dnsmasq in a network namespace (boot once from
 * Pxe). TLS on with the controller's CA pinned on the agents' command line.
 * Both are inspected, cleaned, deployed and boot their disks (the test
 * image's marker on the console); guest 1 is cleaned again. The BMC
 * passwords appear in no log of the run. Needs root, QEMU, dnsmasq, Debian's
 * ipxe and grub-mkrescue; fails under CI=true without them, skips otherwise.
 */

const unavailable = labUnavailable() ?? virtualMediaUnavailable() ?? pxeNetworkUnavailable();
const skip = unavailable && process.env.CI !== 'true' ? `cannot run the Redfish lab here: ${unavailable}` : false;
if (skip) process.stderr.write(`lab-redfish.test.ts: skipping: ${skip}\n`);

const LAB_TIMEOUT_MS = 12 * 60_000;

/** Every file under `dir` whose name ends in .log, and the dnsmasq log. */
function logFiles(dir: string): string[] {
  const found: string[] = [];
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) found.push(...logFiles(path));
    else if (name.endsWith('.log')) found.push(path);
  }
  return found;
}

describe('lab: two guests powered over Redfish, one booted by virtual media, one through dnsmasq', {
  skip,
  timeout: LAB_TIMEOUT_MS + 60_000,
}, () => {
  it('inspects, cleans, deploys and boots both disks, ejects the ISO, with no insecure agent and no password in a log', {
    timeout: LAB_TIMEOUT_MS,
  }, async (ctx) => {
    if (unavailable) throw new Error(`CI=true, so the Redfish lab must run, but it cannot here: ${unavailable}`);
    let guests: readonly Guest[] = [];
    let work = '';
    try {
      const result = await runLab({
        nodes: 2,
        power: 'redfish',
        boot: ['virtual-media', 'network'],
        phaseTimeoutMs: 5 * 60_000,
        keep: true,
        log: (line) => ctx.diagnostic(line),
        onGuests: (all, folder) => {
          guests = all;
          work = folder;
        },
      });
      ctx.diagnostic(`timings: ${result.timings.map(([name, ms]) => `${name} ${(ms / 1000).toFixed(1)} s`).join('; ')}`);
      assert.deepEqual(
        result.guests.map((g) => `${g.name} ${g.boot}`),
        ['lab-node-1 virtual-media', 'lab-node-2 network'],
      );
      checkNoInsecureAgent(result.guests);
      const controllerLog = readFileSync(`${result.work}/controller.log`, 'utf8');
      const lines = (pattern: RegExp) => controllerLog.split('\n').filter((line) => pattern.test(line));

      // Guest 1: its BMC fetched the agent ISO from the controller, booted it once from Cd, and ejected it.
      assert.ok(
        lines(/"nodeName":"lab-node-1".*agent ISO ready for virtual media/).length > 0,
        'the controller built lab-node-1 an agent ISO',
      );
      assert.ok(lines(/"msg":"virtual media inserted"/).length > 0, 'the redfish driver inserted the ISO');
      assert.ok(lines(/"msg":"virtual media ejected"/).length > 0, 'the redfish driver ejected the ISO');
      const console1 = readFileSync(result.guests[0]?.consolePath as string, 'latin1');
      assert.match(console1, /Booting from DVD\/CD/, 'lab-node-1 booted the CD');
      // (SeaBIOS still shows the NIC's iPXE ROM banner; the ROM never runs.)
      assert.doesNotMatch(console1, /iPXE \(PCI [0-9a-f:.]+\) starting execution/, 'lab-node-1 never network-booted');
      const bmc1 = readFileSync(`${result.work}/lab-node-1-bmc/requests.log`, 'utf8');
      assert.match(bmc1, /POST \/redfish\/v1\/Managers\/BMC\/VirtualMedia\/Cd\/Actions\/VirtualMedia\.InsertMedia auth=session -> 204/);
      assert.match(bmc1, /VirtualMedia\.EjectMedia auth=session -> 204/);
      assert.match(bmc1, /PATCH \/redfish\/v1\/Systems\/[^ ]+ auth=session if-match -> 20[04]/, 'boot override with If-Match');

      // Guest 2: dnsmasq leased it an address and its BMC never touched virtual media.
      assert.match(readFileSync(`${result.work}/dnsmasq.log`, 'utf8'), /DHCPACK\(br0\) [0-9.]+ 52:54:00:4d:00:02/);
      const console2 = readFileSync(result.guests[1]?.consolePath as string, 'latin1');
      assert.match(console2, /iPXE \(PCI [0-9a-f:.]+\) starting execution/, 'lab-node-2 network-booted through iPXE');
      const bmc2 = readFileSync(`${result.work}/lab-node-2-bmc/requests.log`, 'utf8');
      assert.doesNotMatch(bmc2, /InsertMedia/);
      assert.match(controllerLog, /"nodeName":"lab-node-1","driver":"redfish","boot":"virtual-media".*powered on into virtual-media boot/);
      assert.match(controllerLog, /"nodeName":"lab-node-2","driver":"redfish","boot":"network".*powered on into network boot/);

      // The passwords are in their files (mode 0600) and in no log: the controller's, dnsmasq's, the BMCs', the consoles.
      const logs = logFiles(result.work);
      assert.ok(logs.length >= 6, `the run's logs: ${logs.join(', ')}`);
      for (const node of ['lab-node-1', 'lab-node-2']) {
        const passwordFile = `${result.work}/${node}-bmc/password`;
        assert.equal(statSync(passwordFile).mode & 0o077, 0, `${passwordFile} is readable by others`);
        const password = readFileSync(passwordFile, 'utf8');
        assert.ok(password.length >= 12, `${node}'s BMC has a password`);
        for (const path of logs) assert.ok(!readFileSync(path, 'latin1').includes(password), `${node}'s BMC password is in ${path}`);
      }
      rmSync(result.work, { recursive: true, force: true });
    } catch (error) {
      const consoles = guests.map((g) => `--- console of ${g.name} (${g.consolePath}):\n${g.consoleTail(40)}`).join('\n');
      throw new Error(
        `${(error as Error).message}\nfiles kept in ${work} (controller.log, dnsmasq.log, consoles, BMC request logs)\n${consoles}`,
        {
          cause: error,
        },
      );
    }
  });
});
