import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { AgentIsoBuilder, kernelParameters } from '../../controller/boot/agent-iso.js';
import { agentCmdline } from '../../controller/boot/agent-cmdline.js';
import { virtualMediaUnavailable } from '../../lab/bmc/redfish/lab-bmc.js';
import { QmpMachine } from '../../lab/bmc/redfish/qmp-machine.js';
import { labUnavailable } from '../../lab/prerequisites.js';
import { type Guest, labMac, startGuest, uefiUnavailable } from '../../lab/qemu.js';
import { buildRamdisk } from '../../scripts/ramdisk/build-ramdisk.js';

/*
 * The agent ISO of virtual-media boot (controller/boot/agent-iso.ts), built
 * from the real agent ramdisk, boots in both firmwares a BMC may run: SeaBIOS
 * (El Torito BIOS image) and OVMF (the EFI system partition image), from an
 * IDE CD drive whose medium is put in through QMP as the lab's Redfish BMC
 * does, and the kernel gets the parameters of the node's command line
 * (the CA pin, a value with spaces in double quotes: GRUB escapes quotes,
 * see grubArguments). Needs QEMU, OVMF and grub-mkrescue; fails under CI=true without
 * them, skips otherwise.
 */

const unavailable = labUnavailable() ?? virtualMediaUnavailable() ?? uefiUnavailable();
const skip = unavailable && process.env.CI !== 'true' ? `cannot boot the agent ISO here: ${unavailable}` : false;
if (skip) process.stderr.write(`agent-iso-boot.test.ts: skipping: ${skip}\n`);

const BOOT_TIMEOUT_MS = 6 * 60_000;

describe('the agent ISO boots under BIOS and UEFI', { skip, timeout: BOOT_TIMEOUT_MS + 120_000 }, () => {
  it('reaches the ramdisk with the command line intact in SeaBIOS and in OVMF', { timeout: BOOT_TIMEOUT_MS + 60_000 }, async (ctx) => {
    if (unavailable) throw new Error(`CI=true, so the agent ISO must boot here, but: ${unavailable}`);
    const work = mkdtempSync(join(tmpdir(), 'metalcast-iso-boot-'));
    const guests: Guest[] = [];
    const machines: QmpMachine[] = [];
    try {
      const ramdisk = await buildRamdisk();
      const cmdline = agentCmdline({
        controllerAddress: '10.0.2.2:9',
        insecure: false,
        ca: { fingerprint: `sha256:${'ab'.repeat(32)}`, url: 'http://10.0.2.2:9/ca.pem' },
        extra: 'quiet panic=-1 no_timer_check metalcast.note="two words"',
      });
      const iso = await new AgentIsoBuilder(join(work, 'isos')).build({
        kernelPath: ramdisk.kernel.path,
        initrdPath: ramdisk.initramfs.path,
        cmdline,
      });
      ctx.diagnostic(`agent ISO ${(iso.sizeBytes / 1024 / 1024).toFixed(1)} MiB`);
      const boots = (['bios', 'uefi'] as const).map(async (firmware, i) => {
        const guest = await startGuest({
          name: `iso-${firmware}`,
          mac: labMac(0x150001 + i),
          diskPath: join(work, `${firmware}.img`),
          diskSizeBytes: 16 * 1024 * 1024,
          boot: 'disk',
          cdrom: true,
          firmware,
          consolePath: join(work, `${firmware}.console.log`),
          qmpSocketPath: join(work, `${firmware}.qmp`),
          bmcSocketPath: join(work, `${firmware}.bmc`),
          poweredOn: false,
        });
        guests.push(guest);
        const machine = new QmpMachine(join(work, `${firmware}.bmc`), { nic: 'nic0', cdrom: 'cd0' }, 'Hdd');
        machines.push(machine);
        await machine.insertMedia(iso.path);
        await machine.setBootTarget('Cd', true);
        const started = Date.now();
        await machine.powerOn();
        // The guest learns of the power on from QEMU's RESUME event on its own QMP socket, a moment later.
        for (const deadline = Date.now() + 10_000; !guest.poweredOn && Date.now() < deadline; ) await new Promise((r) => setTimeout(r, 50));
        // Up to the end of the line: the console file may hold half of it yet.
        const seen = await guest.waitForConsole(/metalcast-ramdisk: kernel command line: ([^\n]*)\n/, BOOT_TIMEOUT_MS);
        ctx.diagnostic(`${firmware}: the ramdisk started ${((Date.now() - started) / 1000).toFixed(1)} s after power on`);
        return { firmware, line: seen[1] ?? '' };
      });
      for (const { firmware, line } of await Promise.all(boots)) {
        // GRUB prepends BOOT_IMAGE= and writes "key=two words" for key="two words": the same parameters to the kernel.
        assert.deepEqual(
          kernelParameters(line),
          ['BOOT_IMAGE=/boot/vmlinuz', ...kernelParameters(cmdline)],
          `${firmware}: the kernel got other parameters: ${line}`,
        );
        assert.ok(kernelParameters(line).includes('metalcast.note=two words'));
      }
    } catch (error) {
      const consoles = guests.map((g) => `--- console of ${g.name}:\n${g.consoleTail(30)}`).join('\n');
      throw new Error(`${(error as Error).message}\n${consoles}`, { cause: error });
    } finally {
      for (const machine of machines) machine.close();
      await Promise.all(guests.map((g) => g.stop()));
      rmSync(work, { recursive: true, force: true });
    }
  });
});
