/**
 * `npm run lab -- --nodes 3 [--power qemu|ipmi|redfish] [--boot network|virtual-media[,…]] [--network user|pxe]
 * [--keep] [--phase-timeout 600]`: the lab of lab/lab.ts from the command line. `--boot` gives the guests their
 * boot method in turn (`--nodes 2 --power redfish --boot virtual-media,network`: one of each); virtual-media needs
 * `--power redfish`. `npm run lab -- --os-image [--keep]`:
 * the OS image lab of lab/os-image-lab.ts instead (one UEFI guest deployed
 * with the Debian image and a config drive, then logged into over SSH). Exits 0 when every check passed; on
 * failure or Ctrl-C every guest is stopped, and the work folder (consoles,
 * disks, controller log) is kept and named.
 */
import { parseArgs } from 'node:util';
import { type LabBoot, runLab } from './lab.js';
import { runOsImageLab } from './os-image-lab.js';
import { stopAllGuests } from './qemu.js';

const { values } = parseArgs({
  options: {
    nodes: { type: 'string', default: '3' },
    keep: { type: 'boolean', default: false },
    'phase-timeout': { type: 'string', default: '600' },
    power: { type: 'string', default: 'qemu' },
    network: { type: 'string' },
    boot: { type: 'string', default: 'network' },
    'os-image': { type: 'boolean', default: false },
  },
});
if (values.power !== 'qemu' && values.power !== 'ipmi' && values.power !== 'redfish') {
  console.error(`--power: '${values.power}' is not qemu, ipmi or redfish`);
  process.exit(2);
}
const boots = (values.boot ?? 'network').split(',').map((b) => b.trim());
for (const boot of boots) {
  if (boot !== 'network' && boot !== 'virtual-media') {
    console.error(`--boot: '${boot}' is not network or virtual-media (a comma-separated list gives the guests their methods in turn)`);
    process.exit(2);
  }
}
if (boots.includes('virtual-media') && values.power !== 'redfish') {
  console.error(`--boot virtual-media needs --power redfish (the BMC inserts the agent ISO); --power is ${values.power}`);
  process.exit(2);
}
if (values.network !== undefined && values.network !== 'user' && values.network !== 'pxe') {
  console.error(`--network: '${values.network}' is not user (QEMU's DHCP) or pxe (dnsmasq in a network namespace; needs root)`);
  process.exit(2);
}
const nodes = Number(values.nodes);
if (!Number.isInteger(nodes) || nodes < 1 || nodes > 16) {
  console.error(`--nodes: '${values.nodes}' is not a whole number from 1 to 16`);
  process.exit(2);
}
let work = '';
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    console.error(`\nlab: ${signal}: stopping every guest${work ? `; files kept in ${work}` : ''}`);
    void stopAllGuests().finally(() => process.exit(130));
  });
}
try {
  if (values['os-image']) {
    const result = await runOsImageLab({
      keep: values.keep,
      phaseTimeoutMs: Number(values['phase-timeout']) * 1000,
      onGuest: (_guest, folder) => {
        work = folder;
      },
    });
    console.log(`\nsummary: ${result.hostname} answers SSH at its static address; ${result.marker}`);
    for (const [name, ms] of result.timings) console.log(`  ${(ms / 1000).toFixed(1).padStart(7)} s  ${name}`);
    process.exit(0);
  }
  const result = await runLab({
    nodes,
    keep: values.keep,
    phaseTimeoutMs: Number(values['phase-timeout']) * 1000,
    power: values.power,
    network: values.network as 'user' | 'pxe' | undefined,
    boot: boots as LabBoot[],
    onGuests: (_guests, folder) => {
      work = folder;
    },
  });
  console.log('\nsummary:');
  for (const [name, ms] of result.timings) console.log(`  ${(ms / 1000).toFixed(1).padStart(7)} s  ${name}`);
  if (values.keep) console.log(`files kept in ${result.work}`);
} catch (error) {
  console.error(`\nlab FAILED: ${(error as Error).message}${work ? `\nconsoles, disks and the controller log are in ${work}` : ''}`);
  process.exitCode = 1;
}
