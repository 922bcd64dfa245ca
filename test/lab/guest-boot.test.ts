import assert from 'node:assert/strict';
import { copyFileSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import { ProvisionState } from '../../gen/metalcast/v1/node.js';
import { QmpClient } from '../../lab/qmp.js';
import { freePort, type Guest, type GuestOptions, labMac, startGuest } from '../../lab/qemu.js';
import { labUnavailable } from '../../lab/prerequisites.js';
import { buildRamdisk, type RamdiskArtifacts } from '../../scripts/ramdisk/build-ramdisk.js';
import { buildTestImage, TEST_IMAGE_MARKER, type TestImage } from '../../scripts/ramdisk/build-test-image.js';
import { createWaitingNode } from '../helpers/agent-client.js';
import { eventually, metricValue, scrapeMetrics, startTestController, type TestController } from '../helpers/controller.js';
import { type BootServer, startBootServer } from '../../lab/boot-server.js';
import { caPinOfPem } from '../../common/ca-pin.js';
import { tlsInit } from '../../common/tls-init.js';

/*
 * QEMU guests (software emulation, -accel tcg) as machines:
 * - the agent ramdisk (npm run build:ramdisk) booted directly by QEMU looks
 *   up at a real controller through QEMU's user networking, and the
 *   controller inspects it: the inventory shows the virtio NIC's MAC and
 *   /dev/vda with the disk file's size;
 * - the same ramdisk network-booted by iPXE from an HTTP server, after being
 *   told its MAC is unknown; then the boot device switched to the disk at
 *   run time boots the test image;
 * - the test image (npm run build:test-image) boots from the disk and
 *   prints its marker.
 *
 * Needs QEMU, iPXE, Debian's kernel, busybox-static and the test image's
 * tools (lab/prerequisites.ts). Without them the tests say why and skip,
 * except under CI=true, where they must run and so fail instead. Consoles
 * are written under a temporary folder, kept and printed when a test fails.
 */

const unavailable = labUnavailable();
const skip =
  unavailable && process.env.CI !== 'true'
    ? `cannot run QEMU guests here: ${unavailable} (under CI=true these tests run and fail instead)`
    : false;
if (skip) process.stderr.write(`guest-boot.test.ts: skipping: ${skip}\n`);

const MIB = 1024 * 1024;
const DISK_BYTES = 256 * MIB;
/** Boots under TCG take 10-20 s on an idle 2-vCPU VM; leave room for a busy one. */
const BOOT_TIMEOUT_MS = 90_000;

describe('lab: QEMU guests boot the agent ramdisk and the test image', { skip }, () => {
  let ramdisk: RamdiskArtifacts;
  let image: TestImage;
  let t: TestController;
  let bootServer: BootServer;
  let work: string;
  let caPin = '';
  let failed = false;
  const guests: Guest[] = [];

  const guest = async (options: Omit<GuestOptions, 'consolePath' | 'qmpSocketPath' | 'diskPath'> & { diskPath?: string }) => {
    const g = await startGuest({
      diskPath: join(work, `${options.name}.img`),
      consolePath: join(work, `${options.name}.console.log`),
      qmpSocketPath: join(work, `${options.name}.qmp`),
      ...options,
    });
    guests.push(g);
    return g;
  };

  /** Runs a test body; on failure, adds the tail of every guest's console to the error and keeps the files. */
  const withConsoles = async (ctx: TestContext, body: () => Promise<void>) => {
    try {
      await body();
    } catch (error) {
      failed = true;
      const consoles = guests.map((g) => `--- console of ${g.name} (${g.consolePath}):\n${g.consoleTail(40)}`).join('\n');
      ctx.diagnostic(`consoles kept in ${work}`);
      throw new Error(`${(error as Error).message}\n${consoles}`, { cause: error });
    } finally {
      await Promise.all(guests.splice(0).map((g) => g.stop()));
    }
  };

  /**
   * The ramdisk's kernel command line: the serial console, and the agent's
   * settings. `quiet` keeps the kernel's messages (but errors) off the
   * console, which under emulation saves most of a second.
   */
  const agentCmdline = (...extra: string[]) => {
    const controllerPort = t.controller.grpcAddress.split(':').at(-1);
    return [
      'console=ttyS0',
      'quiet',
      'panic=-1',
      // Under TCG on a loaded host the IO-APIC timer check can fail and panic the kernel at boot.
      'no_timer_check',
      // TLS from the first packet, as the controller's own iPXE script does it (controller/boot/agent-cmdline.ts).
      `metalcast.ca_fingerprint=${caPin}`,
      `metalcast.ca_url=http://10.0.2.2:${t.controller.httpAddress.split(':').at(-1)}/ca.pem`,
      `metalcast.controller=10.0.2.2:${controllerPort}`,
      'metalcast.lookup_backoff_max=2s',
      ...extra,
    ].join(' ');
  };

  const lookups = async () => {
    const text = await scrapeMetrics(t.controller);
    return ['found', 'not_found', 'agent_alive', 'invalid'].reduce(
      (sum, result) => sum + (metricValue(text, `metalcast_lookups_total{result="${result}"}`) ?? 0),
      0,
    );
  };

  before(
    async () => {
      if (unavailable) throw new Error(`CI=true, so these tests must run, but QEMU guests cannot run here: ${unavailable}`);
      work = mkdtempSync(join(tmpdir(), 'metalcast-lab-'));
      const built = await buildRamdisk();
      const testImage = buildTestImage();
      // Copies of our own: `npm run build` empties dist/, and may run while the guests boot.
      ramdisk = {
        ...built,
        kernel: { ...built.kernel, path: join(work, 'vmlinuz') },
        initramfs: { ...built.initramfs, path: join(work, 'initramfs.cpio.gz') },
      };
      copyFileSync(built.kernel.path, ramdisk.kernel.path);
      copyFileSync(built.initramfs.path, ramdisk.initramfs.path);
      image = { ...testImage, path: join(work, 'test-image.raw') };
      copyFileSync(testImage.path, image.path);
      // TLS: the guests reach the controller at 10.0.2.2 (QEMU's user networking), and pin its CA.
      const tls = await tlsInit({ dir: join(work, 'tls'), hosts: ['127.0.0.1', '10.0.2.2'], days: 2 });
      const caPem = readFileSync(tls.ca, 'utf8');
      caPin = caPinOfPem(caPem);
      t = await startTestController(
        {
          tlsCert: tls.controller,
          tlsKey: tls.controllerKey,
          agentCa: tls.ca,
          heartbeatTimeout: '60s',
          heartbeatIntervalMin: '1s',
          heartbeatIntervalMax: '2s',
          sweepInterval: '1s',
          heartbeatFlushInterval: '100ms',
          startupGrace: '0s',
        },
        undefined,
        { caPem },
      );
      bootServer = await startBootServer({ kernel: ramdisk.kernel.path, initramfs: ramdisk.initramfs.path });
    },
    { timeout: 300_000 },
  );
  after(async () => {
    await Promise.all(guests.splice(0).map((g) => g.stop()));
    await bootServer?.close();
    await t?.destroy();
    if (work && !failed) rmSync(work, { recursive: true, force: true });
  });

  it('direct kernel boot: the agent looks up and the controller inspects the guest', { timeout: 150_000 }, async (ctx) => {
    await withConsoles(ctx, async () => {
      const mac = labMac(0x4c0001);
      const node = await createWaitingNode(t.nodes, 'lab-kernel-boot', [mac]);
      const agentPort = await freePort();
      const before = await lookups();
      const started = Date.now();
      const g = await guest({
        name: 'lab-kernel-boot',
        mac,
        diskSizeBytes: DISK_BYTES,
        diskSerial: 'lab-disk-1',
        forwardGuestPort: 9999,
        forwardHostPort: agentPort,
        boot: {
          kernel: ramdisk.kernel.path,
          initrd: ramdisk.initramfs.path,
          // The controller reaches the agent through QEMU's port forward, not at the guest's own 10.0.2.15.
          append: agentCmdline(`metalcast.advertise_address=127.0.0.1:${agentPort}`),
        },
      });
      await eventually(async () => (await lookups()) > before, {
        timeoutMs: BOOT_TIMEOUT_MS,
        intervalMs: 100,
        what: 'the guest agent to look up',
      });
      const firstLookupMs = Date.now() - started;
      await eventually(
        async () => (await t.nodes.getNode({ node: node.uuid })).node?.provisionState === ProvisionState.PROVISION_STATE_MANAGEABLE,
        {
          timeoutMs: BOOT_TIMEOUT_MS,
          intervalMs: 200,
          what: 'inspection to finish (manageable)',
        },
      );
      const inspectedMs = Date.now() - started;
      const inventory = (await t.nodes.getNode({ node: node.uuid })).node?.inventory;
      assert.deepEqual(
        inventory?.interfaces.map((nic) => [nic.macAddress, nic.driver]),
        [[mac, 'virtio_net']],
      );
      assert.deepEqual(
        inventory?.disks.map((disk) => [disk.devicePath, disk.sizeBytes, disk.serial]),
        [['/dev/vda', DISK_BYTES, 'lab-disk-1']],
      );
      assert.equal(inventory?.system?.serialNumber, 'lab-kernel-boot');
      const init = /metalcast-ramdisk: init started.*\(uptime ([\d.]+)s\)/.exec(g.consoleTail(400));
      const agent = /metalcast-ramdisk: starting the agent \(uptime ([\d.]+)s\)/.exec(g.consoleTail(400));
      ctx.diagnostic(
        `initramfs ${(ramdisk.initramfs.bytes / MIB).toFixed(1)} MiB (${(ramdisk.initramfs.uncompressedBytes / MIB).toFixed(1)} MiB unpacked), kernel ${(ramdisk.kernel.bytes / MIB).toFixed(1)} MiB`,
      );
      ctx.diagnostic(
        `QEMU start to first lookup ${firstLookupMs} ms, to inspected ${inspectedMs} ms; guest uptime at /init ${init?.[1]} s, at agent start ${agent?.[1]} s`,
      );
    });
  });

  it('network boot: iPXE says an unknown MAC is unknown and retries, then boots the ramdisk; switching to the disk boots the test image', {
    timeout: 200_000,
  }, async (ctx) => {
    await withConsoles(ctx, async () => {
      const mac = labMac(0x4c0002);
      const diskPath = join(work, 'lab-net-boot.img');
      copyFileSync(image.path, diskPath);
      const started = Date.now();
      const g = await guest({
        name: 'lab-net-boot',
        mac,
        diskPath,
        diskSizeBytes: 64 * MIB,
        boot: 'network',
        netBootUrl: bootServer.entryUrl,
      });

      await g.waitForConsole(new RegExp(`no node has MAC ${mac}`), BOOT_TIMEOUT_MS);
      const unknownMs = Date.now() - started;
      const before = await lookups();
      bootServer.plans.set(mac, {
        boot: 'ramdisk',
        cmdline: agentCmdline(),
      });
      const known = Date.now();
      await g.waitForConsole(/metalcast: booting the agent ramdisk/, 30_000);
      // An unknown node gets NOT_FOUND: proof enough that the network-booted agent reached the controller.
      await eventually(async () => (await lookups()) > before, {
        timeoutMs: BOOT_TIMEOUT_MS,
        intervalMs: 100,
        what: 'the guest agent to look up',
      });
      const lookupMs = Date.now() - known;
      assert.ok(
        bootServer.requests.some((r) => r.mac === mac && r.known === false),
        'the unknown-MAC script was served',
      );
      assert.ok(
        bootServer.requests.some((r) => r.path === '/initramfs.cpio.gz'),
        'iPXE fetched the initramfs',
      );

      await g.setBootDevice('disk');
      const since = g.consoleLength();
      await g.reset();
      const marker = await g.waitForConsole(new RegExp(`${TEST_IMAGE_MARKER}.*`), BOOT_TIMEOUT_MS, { since });
      assert.match(marker[0], /kernel=\S+/);
      await g.waitForPowerOff(30_000);
      ctx.diagnostic(
        `network boot: unknown-MAC message after ${unknownMs} ms; from the MAC becoming known to the first lookup ${lookupMs} ms (iPXE retry, download, boot)`,
      );
    });
  });

  it('the test image boots from the virtio disk and powers off; power on, off and on again, also through a second QMP socket', {
    timeout: 150_000,
  }, async (ctx) => {
    await withConsoles(ctx, async () => {
      const diskPath = join(work, 'lab-disk-boot.img');
      copyFileSync(image.path, diskPath);
      const started = Date.now();
      const bmcSocketPath = join(work, 'lab-disk-boot.bmc');
      const g = await guest({
        name: 'lab-disk-boot',
        mac: labMac(0x4c0003),
        diskPath,
        diskSizeBytes: 64 * MIB,
        boot: 'disk',
        memoryMiB: 256,
        bmcSocketPath,
      });
      await g.waitForConsole(new RegExp(TEST_IMAGE_MARKER), BOOT_TIMEOUT_MS);
      const markerMs = Date.now() - started;
      // The image powers the machine off itself; QEMU stays, stopped (-no-shutdown).
      await g.waitForPowerOff(30_000);
      assert.ok(g.pid, 'QEMU is still there to be powered on');

      // Power on boots it again from a reset; a hard power off stops it mid-boot.
      let since = g.consoleLength();
      await g.powerOn();
      await g.waitForConsole(/SYSLINUX/, BOOT_TIMEOUT_MS, { since });
      await g.powerOff();
      assert.equal(g.poweredOn, false);

      // A power driver in another process has its own socket: what it does, the guest's handle sees.
      const bmc = await QmpClient.connect(bmcSocketPath);
      try {
        assert.equal((await bmc.execute<{ status: string }>('query-status')).status, 'paused');
        since = g.consoleLength();
        await bmc.execute('system_reset');
        await bmc.execute('cont');
        await eventually(() => g.poweredOn, { timeoutMs: 10_000, what: 'the guest handle to see the power on' });
        await g.waitForConsole(new RegExp(TEST_IMAGE_MARKER), BOOT_TIMEOUT_MS, { since });
        await g.waitForPowerOff(30_000);
        assert.equal((await bmc.execute<{ status: string }>('query-status')).status, 'shutdown');
      } finally {
        bmc.close();
      }
      ctx.diagnostic(`test image ${(image.bytes / MIB).toFixed(1)} MiB: marker ${markerMs} ms after QEMU start, then powered off`);
    });
  });
});
