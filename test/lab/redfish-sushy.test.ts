import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { MemoryMachine } from '../../lab/bmc/redfish/machine.js';
import { QmpMachine } from '../../lab/bmc/redfish/qmp-machine.js';
import { RedfishSimulator } from '../../lab/bmc/redfish/simulator.js';
import { type Guest, labMac, qemuUnavailable, startGuest } from '../../lab/qemu.js';

/*
 * The lab's Redfish BMC held to an outside client: Debian's python3-sushy,
 * the library Ironic drives real BMCs with, runs test/lab/redfish_sushy.py
 * against the simulator: the service root without credentials and 401 with
 * WWW-Authenticate elsewhere, a session, the system by name (307 to its
 * UUID), boot override, power on and off (Reset answers at once, the state
 * follows), virtual media insert and eject through the Manager, a refused
 * boot target with @Message.ExtendedInfo, log out. Once with a machine in
 * memory, once in front of a real QEMU guest through its QMP socket, where
 * the outcome is read back from QEMU itself (status, bootindex, the CD's
 * medium). Needs /usr/bin/python3 with python3-sushy, and QEMU; under
 * CI=true a missing one fails instead of skipping.
 */

const PYTHON = '/usr/bin/python3';
const SCRIPT = fileURLToPath(new URL('./redfish_sushy.py', import.meta.url));
const IN_CI = process.env.CI === 'true';
const sushyMissing = (() => {
  if (!existsSync(PYTHON)) return `${PYTHON} is missing`;
  return existsSync('/usr/lib/python3/dist-packages/sushy/__init__.py')
    ? undefined
    : 'python3-sushy is not installed (apt-get install python3-sushy)';
})();
const skipSushy = sushyMissing && !IN_CI ? sushyMissing : false;
const qemuMissing = qemuUnavailable();
const skipQemu = skipSushy || (qemuMissing && !IN_CI ? qemuMissing : false);

type Step = Record<string, unknown> & { step: string };

async function runSushy(sim: RedfishSimulator, isoUrl: string): Promise<Map<string, Step>> {
  if (sushyMissing) assert.fail(`${sushyMissing} (CI=true: this check must run, not skip)`);
  const { stdout } = await promisify(execFile)(PYTHON, [SCRIPT, sim.url, 'admin', 'sushy-pw', 'lab-node', isoUrl], {
    encoding: 'utf8',
    timeout: 120_000,
  }).catch((error: { stdout?: string; stderr?: string; message: string }) => {
    throw new Error(`sushy failed: ${error.message}\n${error.stdout ?? ''}\n${error.stderr?.slice(-4000) ?? ''}`);
  });
  const steps = new Map<string, Step>();
  for (const line of stdout.trim().split('\n')) {
    const step = JSON.parse(line) as Step;
    steps.set(step.step, step);
  }
  return steps;
}

function checkProtocol(steps: Map<string, Step>, sim: RedfishSimulator, isoUrl: string): void {
  assert.deepEqual(steps.get('unauthenticated'), {
    step: 'unauthenticated',
    root: 200,
    systems: 401,
    www_authenticate: 'Basic realm="metalcast lab BMC"',
    error_code: 'Base.1.8.NoValidSession',
  });
  assert.equal(steps.get('session')?.token, true);
  assert.match(String(steps.get('session')?.session_uri), /^\/redfish\/v1\/SessionService\/Sessions\/[0-9a-f]+$/);
  const system = steps.get('system');
  assert.equal(system?.count, 1);
  assert.equal(system?.identity, sim.uuid);
  assert.equal(system?.by_name_identity, sim.uuid, 'the name redirects to the UUID');
  assert.equal(system?.power, 'Off');
  assert.deepEqual(system?.boot_targets, ['Cd', 'Hdd', 'Pxe', 'UefiHttp']);
  assert.ok(((system?.reset_types ?? []) as string[]).includes('ForceOff'));
  assert.deepEqual(steps.get('boot_pxe'), { step: 'boot_pxe', target: 'Pxe', enabled: 'Continuous', mode: 'UEFI' });
  assert.equal(steps.get('power_on')?.power, 'On');
  assert.deepEqual(steps.get('insert'), {
    step: 'insert',
    inserted: true,
    image: isoUrl,
    path: '/redfish/v1/Managers/BMC/VirtualMedia/Cd',
  });
  assert.deepEqual(steps.get('boot_cd'), { step: 'boot_cd', target: 'Cd', enabled: 'Once' });
  assert.deepEqual(steps.get('eject'), { step: 'eject', inserted: false, image: '' });
  const bad = steps.get('bad_target');
  assert.equal(bad?.status, 400);
  assert.equal(bad?.code, 'Base.1.8.PropertyValueNotInList');
  assert.match(String(bad?.detail), /"Floppy" for the property BootSourceOverrideTarget is not in the list of acceptable values/);
  assert.equal(steps.get('power_off')?.power, 'Off');
  assert.equal(steps.get('logout')?.sessions_left, 0);
}

describe('Redfish BMC simulator, driven by python3-sushy', { skip: skipSushy }, () => {
  let files: Server;
  let isoUrl: string;
  let fetched = 0;

  before(async () => {
    files = createServer((_req, res) => {
      fetched++;
      res.writeHead(200, { 'content-type': 'application/octet-stream' }).end(Buffer.alloc(1024 * 1024, 0));
    });
    await new Promise<void>((resolve) => files.listen(0, '127.0.0.1', resolve));
    isoUrl = `http://127.0.0.1:${(files.address() as AddressInfo).port}/agent.iso`;
  });
  after(() => files.close());

  it('follows the protocol sushy expects, in front of a machine in memory', async () => {
    const machine = new MemoryMachine();
    const sim = await new RedfishSimulator({ machine, name: 'lab-node', users: { admin: 'sushy-pw' }, resetDelayMs: 100 }).start();
    try {
      const before = fetched;
      checkProtocol(await runSushy(sim, isoUrl), sim, isoUrl);
      assert.equal(fetched - before, 1, 'the BMC fetched the image once');
      assert.deepEqual(
        machine.actions.map((a) => a.replace(/^insert:.*/, 'insert')),
        ['boot:Pxe:continuous', 'power_on', 'insert', 'boot:Cd:once', 'reset', 'eject', 'power_off'],
      );
      assert.deepEqual(machine.bootedFrom, ['Pxe', 'Cd']);
    } finally {
      await sim.stop();
    }
  });

  it('drives a real QEMU guest through its QMP socket: power, boot order and the CD medium', { skip: skipQemu }, async () => {
    if (qemuMissing) assert.fail(`${qemuMissing} (CI=true: this check must run, not skip)`);
    const work = mkdtempSync(join(tmpdir(), 'metalcast-sushy-'));
    let guest: Guest | undefined;
    let sim: RedfishSimulator | undefined;
    try {
      // No OS: firmware alone is enough to see power, bootindex and the medium change.
      guest = await startGuest({
        name: 'sushy-guest',
        mac: labMac(0x5a0001),
        diskPath: join(work, 'disk.img'),
        diskSizeBytes: 16 * 1024 * 1024,
        boot: 'disk',
        cdrom: true,
        consolePath: join(work, 'console.log'),
        qmpSocketPath: join(work, 'qmp.sock'),
        bmcSocketPath: join(work, 'bmc.sock'),
        poweredOn: false,
        memoryMiB: 128,
      });
      const g = guest;
      sim = await new RedfishSimulator({
        machine: new QmpMachine(join(work, 'bmc.sock'), { nic: 'nic0', cdrom: 'cd0' }, 'Hdd'),
        name: 'lab-node',
        users: { admin: 'sushy-pw' },
        mediaDir: join(work, 'media'),
      }).start();
      const bootIndex = (id: string) => g.qmp<number>('qom-get', { path: `/machine/peripheral/${id}`, property: 'bootindex' });
      const medium = async () =>
        (await g.qmp<{ device: string; qdev?: string; inserted?: { file: string } }[]>('query-block')).find((b) => b.qdev?.includes('cd0'))
          ?.inserted?.file;

      checkProtocol(await runSushy(sim, isoUrl), sim, isoUrl);
      // After the run: off (stopped CPUs), the CD empty, and the continuous Pxe override still in the boot order.
      const { status } = await g.qmp<{ status: string }>('query-status');
      assert.notEqual(status, 'running');
      assert.equal(await medium(), undefined);
      // The once override is put back when no further RESET came for a while (the firmware's own reset counts,
      // lab/bmc/redfish/qmp-machine.ts).
      const deadline = Date.now() + 20_000;
      while ((await bootIndex('cd0')) !== 4 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 250));
      assert.equal(await bootIndex('nic0'), 1, 'Pxe (continuous): the NIC boots first');
      assert.equal(await bootIndex('cd0'), 4, 'the once-only Cd override was used by the restart, then put back');
      assert.ok(g.events.some((e) => e.event === 'RESET'));
      assert.ok(
        g.events.some((e) => e.event === 'DEVICE_TRAY_MOVED'),
        'the medium went in and out through QMP',
      );
    } finally {
      await sim?.stop();
      await guest?.stop();
      rmSync(work, { recursive: true, force: true });
    }
  });
});
