import { createHash } from 'node:crypto';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { open, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createChannel, createClient } from 'nice-grpc';
import pino from 'pino';
import { clientChannelOptions } from '../common/grpc-options.js';
import { createLogger } from '../common/logging.js';
import { KERNEL_ARGS_PROPERTY } from '../controller/boot/boot-endpoint.js';
import { loadControllerConfig } from '../controller/config.js';
import { type RunningController, startController } from '../controller/controller.js';
import { POWER_DRIVER_PROPERTY } from '../controller/power/drivers.js';
import { QMP_SOCKET_PROPERTY } from '../controller/power/qemu.js';
import { ImageServiceDefinition } from '../gen/metalcast/v1/image.js';
import { type Node, NodeServiceDefinition, ProvisionAction, ProvisionState } from '../gen/metalcast/v1/node.js';
import { buildRamdisk } from '../scripts/ramdisk/build-ramdisk.js';
import { buildTestImage, TEST_IMAGE_MARKER } from '../scripts/ramdisk/build-test-image.js';
import { labUnavailable } from './prerequisites.js';
import { freePort, type Guest, labMac, startGuest } from './qemu.js';

/*
 * The lab: a real controller (in this process) and N QEMU guests that
 * network-boot from it, driven through the whole life of a machine. Each
 * guest has its own MAC on a virtio NIC (iPXE from QEMU's DHCP bootfile, the
 * controller's /boot.ipxe), a virtio disk file, and a QMP socket the
 * controller's qemu power driver uses as the guest's BMC. The lab enrols
 * them, inspects them (their kernel-reported NIC and disk), cleans them,
 * deploys the test image, checks every disk file against the image's sha256
 * and that every guest then boots its disk (the image's marker on its
 * console), and undeploys one through cleaning, checking that its disk was
 * erased at both ends. Every guest is stopped at the end, also on failure.
 *
 * The controller serves gRPC in plaintext (--insecure) and the guests'
 * agents do the same (metalcast.insecure on the kernel command line): the
 * lab's network is QEMU's user networking on this machine's loopback.
 */

const MIB = 1024 * 1024;
const DISK_BYTES = 256 * MIB;
/** quick clean erases this much at both ends of each disk. */
const ERASED_BYTES = 4 * MIB;

export interface LabOptions {
  /** Guests to run (default 3). */
  nodes?: number;
  /** Progress lines (default: to stdout). */
  log?: (line: string) => void;
  /** Longest each phase may take, for all guests together (default 10 min: emulation is slow). */
  phaseTimeoutMs?: number;
  /** Keep the work folder (consoles, disks, controller log) even when everything passed. */
  keep?: boolean;
  /** Called with the guests once they exist, so that a caller can print their consoles on failure. */
  onGuests?: (guests: readonly Guest[], work: string) => void;
}

export interface LabResult {
  work: string;
  /** Phase name to milliseconds, in order. */
  timings: [string, number][];
  guests: { name: string; mac: string; consolePath: string }[];
}

/** Runs the lab; throws with what went wrong. The work folder is removed on success unless `keep`. */
export async function runLab(options: LabOptions = {}): Promise<LabResult> {
  const count = options.nodes ?? 3;
  const log = options.log ?? ((line: string) => process.stdout.write(`${line}\n`));
  const phaseTimeoutMs = options.phaseTimeoutMs ?? 600_000;
  const why = labUnavailable();
  if (why) throw new Error(`the lab cannot run here: ${why}`);

  const started = Date.now();
  const timings: [string, number][] = [];
  let phaseStart = Date.now();
  const phase = (name: string) => {
    const now = Date.now();
    timings.push([name, now - phaseStart]);
    log(`  ${name}: ${((now - phaseStart) / 1000).toFixed(1)} s`);
    phaseStart = now;
  };
  const work = mkdtempSync(join(tmpdir(), 'metalcast-lab-'));
  const guests: Guest[] = [];
  let controller: RunningController | undefined;
  let channel: ReturnType<typeof createChannel> | undefined;
  let passed = false;
  try {
    log(`lab: ${count} guests; work folder ${work}`);
    const ramdisk = await buildRamdisk();
    const testImage = buildTestImage();
    // Copies of our own: `npm run build` empties dist/, and may run meanwhile.
    const bootDir = join(work, 'boot');
    mkdirSync(bootDir);
    copyFileSync(ramdisk.kernel.path, join(bootDir, 'vmlinuz'));
    copyFileSync(ramdisk.initramfs.path, join(bootDir, 'initramfs.cpio.gz'));
    const imagePath = join(work, 'test-image.raw');
    copyFileSync(testImage.path, imagePath);
    const image = await readFile(imagePath);
    const imageSha = createHash('sha256').update(image).digest('hex');
    phase('ramdisk and test image ready');

    const grpcPort = await freePort();
    const config = loadControllerConfig(
      {
        listen: `127.0.0.1:${grpcPort}`,
        metricsListen: '127.0.0.1:0',
        dataDir: join(work, 'controller'),
        controllerId: 'lab-controller',
        insecure: 'true',
        operatorAuth: 'none',
        bootDir,
        // QEMU's user networking maps 10.0.2.2 to the host's loopback.
        bootControllerAddress: `10.0.2.2:${grpcPort}`,
        // Emulated guests boot slowly; three at once on two CPUs slower still.
        heartbeatTimeout: '180s',
        heartbeatIntervalMin: '1s',
        heartbeatIntervalMax: '2s',
        sweepInterval: '1s',
        heartbeatFlushInterval: '100ms',
        startupGrace: '0s',
        keepaliveTime: '2s',
        keepaliveTimeout: '2s',
        cleanMode: 'quick',
        deployFinalPower: 'reboot',
      },
      {},
    );
    const logger = createLogger({
      name: 'lab-controller',
      level: 'info',
      destination: pino.destination({ dest: join(work, 'controller.log'), sync: true }),
    });
    controller = await startController(config, logger);
    channel = createChannel(controller.grpcAddress, undefined, clientChannelOptions({ timeMs: 60_000, timeoutMs: 10_000 }));
    const nodes = createClient(NodeServiceDefinition, channel);
    const images = createClient(ImageServiceDefinition, channel);
    const httpPort = controller.httpAddress.split(':').at(-1);
    const entryUrl = `http://10.0.2.2:${httpPort}/boot.ipxe`;
    log(`  controller: gRPC ${controller.grpcAddress}, HTTP ${controller.httpAddress}; guests boot ${entryUrl}`);

    for (let i = 0; i < count; i++) {
      const name = `lab-node-${i + 1}`;
      const agentPort = await freePort();
      const guest = await startGuest({
        name,
        mac: labMac(0x4d0001 + i),
        diskPath: join(work, `${name}.img`),
        diskSizeBytes: DISK_BYTES,
        diskSerial: `lab-disk-${i + 1}`,
        boot: 'network',
        netBootUrl: entryUrl,
        forwardGuestPort: 9999,
        forwardHostPort: agentPort,
        consolePath: join(work, `${name}.console.log`),
        qmpSocketPath: join(work, `${name}.qmp`),
        bmcSocketPath: join(work, `${name}.bmc`),
        // Off: the controller powers it on through the BMC socket when it needs the agent.
        poweredOn: false,
      });
      guests.push(guest);
      options.onGuests?.(guests, work);
      await nodes.createNode({
        name,
        macAddresses: [guest.mac],
        properties: {
          [POWER_DRIVER_PROPERTY]: 'qemu',
          [QMP_SOCKET_PROPERTY]: join(work, `${name}.bmc`),
          // The controller reaches the agent through QEMU's port forward, not at the guest's own 10.0.2.15.
          [KERNEL_ARGS_PROPERTY]: `quiet panic=-1 metalcast.advertise_address=${guest.forwardedAddress} metalcast.lookup_backoff_max=2s`,
        },
      });
      await nodes.setProvisionState({ node: name, action: ProvisionAction.PROVISION_ACTION_MANAGE });
    }
    phase(`${count} guests started (off) and enrolled`);

    const act = async (name: string, action: ProvisionAction, imageName?: string) => {
      const { node } = await nodes.setProvisionState({
        node: name,
        action,
        deploy: imageName ? { image: imageName, target: undefined } : undefined,
      });
      if (node?.lastError) throw new Error(`${name}: ${ProvisionAction[action]} failed at once: ${node.lastError}`);
    };
    const waitAll = async (names: string[], state: ProvisionState, what: string): Promise<Node[]> => {
      const deadline = Date.now() + phaseTimeoutMs;
      for (;;) {
        const found = await Promise.all(names.map(async (name) => (await nodes.getNode({ node: name })).node as Node));
        for (const node of found) {
          if (node.provisionState !== state && node.lastError) {
            throw new Error(`${node.name} is ${ProvisionState[node.provisionState]} while ${what}: ${node.lastError}`);
          }
        }
        if (found.every((node) => node.provisionState === state)) return found;
        if (Date.now() > deadline) {
          const states = found.map((node) => `${node.name} ${ProvisionState[node.provisionState]}`).join(', ');
          throw new Error(`${what}: not done within ${phaseTimeoutMs / 1000} s (${states})`);
        }
        await new Promise((resolve) => setTimeout(resolve, 500));
      }
    };
    const names = guests.map((g) => g.name);

    // Inspect: the controller powers each guest on into network boot; iPXE fetches the ramdisk; the agent looks up.
    for (const name of names) await act(name, ProvisionAction.PROVISION_ACTION_INSPECT);
    const inspected = await waitAll(names, ProvisionState.PROVISION_STATE_MANAGEABLE, 'inspecting');
    for (const [i, node] of inspected.entries()) {
      const guest = guests[i] as Guest;
      const nics = node.inventory?.interfaces.map((nic) => `${nic.macAddress}/${nic.driver}`) ?? [];
      const disks = node.inventory?.disks.map((disk) => `${disk.devicePath}/${disk.sizeBytes}`) ?? [];
      if (!nics.includes(`${guest.mac}/virtio_net`))
        throw new Error(`${node.name}: inspection found NICs ${nics.join(', ')}, not ${guest.mac} (virtio_net)`);
      if (!disks.includes(`/dev/vda/${DISK_BYTES}`))
        throw new Error(`${node.name}: inspection found disks ${disks.join(', ')}, not /dev/vda of ${DISK_BYTES} bytes`);
      log(`  ${node.name}: NIC ${nics.join(', ')}; disk ${disks.join(', ')}`);
    }
    phase('inspected (network boot, agent lookup, inventory)');

    for (const name of names) await act(name, ProvisionAction.PROVISION_ACTION_PROVIDE);
    await waitAll(names, ProvisionState.PROVISION_STATE_AVAILABLE, 'cleaning (provide)');
    phase('cleaned (provide), powered off');

    const uploaded = await images.uploadImage(
      (async function* () {
        yield { part: { $case: 'header' as const, value: { name: 'lab-test-image', sha256: imageSha, sizeBytes: image.length } } };
        for (let at = 0; at < image.length; at += MIB) yield { part: { $case: 'data' as const, value: image.subarray(at, at + MIB) } };
      })(),
      { signal: AbortSignal.timeout(120_000) },
    );
    if (uploaded.image?.sha256 !== imageSha) throw new Error('the controller stored the test image with another sha256');
    phase(`test image uploaded (${(image.length / MIB).toFixed(1)} MiB)`);

    const consoleMarks = guests.map((g) => g.consoleLength());
    for (const name of names) await act(name, ProvisionAction.PROVISION_ACTION_DEPLOY, 'lab-test-image');
    await waitAll(names, ProvisionState.PROVISION_STATE_ACTIVE, 'deploying');
    phase('deployed (network boot, write_image, reboot to disk through QMP)');

    for (const guest of guests) {
      const written = await readStart(guest.diskPath, image.length);
      const sha = createHash('sha256').update(written).digest('hex');
      if (sha !== imageSha)
        throw new Error(`${guest.name}: the disk's first ${image.length} bytes have sha256 ${sha}, not the image's ${imageSha}`);
    }
    log(`  every disk holds the image (sha256 ${imageSha.slice(0, 16)}…)`);
    await Promise.all(
      guests.map((guest, i) =>
        guest.waitForConsole(new RegExp(TEST_IMAGE_MARKER), Math.min(phaseTimeoutMs, 300_000), { since: consoleMarks[i] }),
      ),
    );
    phase('verified; every guest booted the image from its disk');

    const cleaned = guests[0] as Guest;
    await act(cleaned.name, ProvisionAction.PROVISION_ACTION_UNDEPLOY);
    await waitAll([cleaned.name], ProvisionState.PROVISION_STATE_AVAILABLE, 'cleaning (undeploy)');
    const head = await readAt(cleaned.diskPath, 0, ERASED_BYTES);
    const tail = await readAt(cleaned.diskPath, DISK_BYTES - ERASED_BYTES, ERASED_BYTES);
    if (!head.every((b) => b === 0) || !tail.every((b) => b === 0)) {
      throw new Error(`${cleaned.name}: after cleaning, the first and last ${ERASED_BYTES / MIB} MiB of its disk are not all zeros`);
    }
    phase(`undeployed ${cleaned.name} through cleaning; its disk is erased at both ends`);
    log(`lab passed in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    passed = true;
    return { work, timings, guests: guests.map((g) => ({ name: g.name, mac: g.mac, consolePath: g.consolePath })) };
  } finally {
    await Promise.all(guests.map((g) => g.stop()));
    channel?.close();
    await controller?.stop();
    if (passed && !options.keep) rmSync(work, { recursive: true, force: true });
  }
}

async function readStart(path: string, bytes: number): Promise<Buffer> {
  return readAt(path, 0, bytes);
}

async function readAt(path: string, offset: number, bytes: number): Promise<Buffer> {
  const file = await open(path, 'r');
  try {
    const buffer = Buffer.alloc(bytes);
    const { bytesRead } = await file.read(buffer, 0, bytes, offset);
    return buffer.subarray(0, bytesRead);
  } finally {
    await file.close();
  }
}
