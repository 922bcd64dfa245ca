import { createHash, randomBytes } from 'node:crypto';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { open, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createChannel, createClient } from 'nice-grpc';
import pino from 'pino';
import { clientChannelOptions } from '../common/grpc-options.js';
import { createLogger } from '../common/logging.js';
import { tlsClient } from '../common/tls.js';
import { tlsInit } from '../common/tls-init.js';
import { KERNEL_ARGS_PROPERTY } from '../controller/boot/boot-endpoint.js';
import { dnsmasqConfig } from '../controller/boot/dnsmasq-config.js';
import {
  BOOT_MODE_PROPERTY,
  IPMI_ADDRESS_PROPERTY,
  IPMI_PASSWORD_SECRET,
  IPMI_PORT_PROPERTY,
  IPMI_USERNAME_PROPERTY,
} from '../controller/power/ipmi/ipmi-driver.js';
import { loadControllerConfig } from '../controller/config.js';
import { type RunningController, startController } from '../controller/controller.js';
import { POWER_DRIVER_PROPERTY } from '../controller/power/drivers.js';
import { QMP_SOCKET_PROPERTY } from '../controller/power/qemu.js';
import { ImageServiceDefinition } from '../gen/metalcast/v1/image.js';
import { type Node, NodeServiceDefinition, ProvisionAction, ProvisionState } from '../gen/metalcast/v1/node.js';
import { buildRamdisk } from '../scripts/ramdisk/build-ramdisk.js';
import { buildTestImage, TEST_IMAGE_MARKER } from '../scripts/ramdisk/build-test-image.js';
import { bmcSettings } from '../cli/commands/node-bmc.js';
import { type LabRedfishBmc, labBmcCa, startLabRedfishBmc, virtualMediaUnavailable } from './bmc/redfish/lab-bmc.js';
import { type IpmiBmc, ipmiBmcUnavailable, startIpmiBmc } from './bmc/ipmi/ipmi-bmc.js';
import { createPxeNetwork, type PxeNetwork, pxeNetworkUnavailable } from './network/pxe-network.js';
import { labUnavailable } from './prerequisites.js';
import { freePort, type Guest, type GuestOptions, labMac, startGuest } from './qemu.js';

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
 * Power and network boot are chosen per lab run (LabOptions power, network):
 * - power `qemu`: the controller's qemu driver on a QMP socket of the guest's
 *   own, as its BMC; `ipmi`: a real IPMI BMC per guest (ipmi_sim, lab/bmc/ipmi)
 *   that the controller's ipmi driver reaches through ipmitool; `redfish`: a
 *   Redfish BMC per guest (the simulator of lab/bmc/redfish, over HTTPS with
 *   a CA file, password from a file) that the controller's redfish driver
 *   reaches, and with it a boot method per guest (LabOptions boot): network,
 *   or virtual-media (the controller's agent ISO in the guest's IDE CD drive,
 *   booted once from Cd, ejected when each step ends; needs network pxe);
 * - network `user`: QEMU's user networking, its built-in DHCP handing iPXE the
 *   controller's script (10.0.2.2 is the host's loopback); `pxe`: a network
 *   namespace with a bridge and a tap per guest, dnsmasq configured by
 *   `metalcast boot dnsmasq-config --mode full`, and the controller on the
 *   guests' segment through a veth pair (lab/network/pxe-network.ts).
 * Any power pairs with either network. TLS is on in every case: the controller
 * serves TLS with a CA made for the run and pins it on the ramdisk's command
 * line (metalcast.ca_fingerprint, metalcast.ca_url); no agent runs with
 * metalcast.insecure, and the lab checks every console for it.
 */

/** How the lab's controller powers the guests. */
export type LabPower = 'qemu' | 'ipmi' | 'redfish';
/** How a guest boots into the agent (its node's boot.method): its NIC, or a CD its Redfish BMC inserts. */
export type LabBoot = 'network' | 'virtual-media';
/** How the guests network-boot: QEMU's user networking, or dnsmasq on a bridge in a namespace. */
export type LabNetwork = 'user' | 'pxe';

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
  /** Power driver of every guest (default qemu). */
  power?: LabPower;
  /** Network boot path (default: pxe with ipmi and redfish power, user with qemu). */
  network?: LabNetwork;
  /**
   * How each guest boots into the agent: one method for all, or a list
   * given to the guests in turn (guest 1 the first, …). virtual-media needs
   * redfish power. Default network.
   */
  boot?: LabBoot | readonly LabBoot[];
}

export interface LabResult {
  work: string;
  /** Phase name to milliseconds, in order. */
  timings: [string, number][];
  guests: { name: string; mac: string; consolePath: string; boot: LabBoot }[];
}

/** Runs the lab; throws with what went wrong. The work folder is removed on success unless `keep`. */
export async function runLab(options: LabOptions = {}): Promise<LabResult> {
  const count = options.nodes ?? 3;
  const log = options.log ?? ((line: string) => process.stdout.write(`${line}\n`));
  const phaseTimeoutMs = options.phaseTimeoutMs ?? 600_000;
  const power = options.power ?? 'qemu';
  const networkKind = options.network ?? (power === 'qemu' ? 'user' : 'pxe');
  const boots = Array.isArray(options.boot) ? options.boot : [options.boot ?? 'network'];
  if (boots.length === 0) throw new Error('boot: give at least one boot method');
  const bootOf = (i: number): LabBoot => boots[i % boots.length] as LabBoot;
  const anyVirtualMedia = Array.from({ length: count }, (_, i) => bootOf(i)).includes('virtual-media');
  if (anyVirtualMedia && power !== 'redfish')
    throw new Error(`boot virtual-media needs a BMC with virtual media: power redfish, not ${power}`);
  // The ISO's agent fetches the CA from the same URL its BMC fetched the ISO from (--virtual-media-url), so both must
  // reach the controller at one address: on the namespace's segment, yes; through QEMU's NAT (10.0.2.2), no.
  if (anyVirtualMedia && networkKind === 'user')
    throw new Error('boot virtual-media runs on network pxe (a namespace the BMCs and the guests both reach the controller in), not user');
  const why =
    labUnavailable() ??
    (power === 'ipmi' ? ipmiBmcUnavailable() : undefined) ??
    (anyVirtualMedia ? virtualMediaUnavailable() : undefined) ??
    (networkKind === 'pxe' ? pxeNetworkUnavailable() : undefined);
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
  const bmcs: IpmiBmc[] = [];
  const redfishBmcs: LabRedfishBmc[] = [];
  let network: PxeNetwork | undefined;
  let controller: RunningController | undefined;
  let channel: ReturnType<typeof createChannel> | undefined;
  let passed = false;
  try {
    log(
      `lab: ${count} guests, power ${power}, network boot ${networkKind === 'pxe' ? 'through dnsmasq in a namespace' : "through QEMU's DHCP"}; work folder ${work}`,
    );
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

    if (networkKind === 'pxe') network = await createPxeNetwork();
    // The address guests reach the controller at: on their segment, or the host's loopback as QEMU's 10.0.2.2.
    const listenHost = network ? network.hostAddress : '127.0.0.1';
    const tls = await tlsInit({ dir: join(work, 'tls'), hosts: network ? [network.hostAddress] : ['127.0.0.1', '10.0.2.2'], days: 2 });
    const caPem = await readFile(tls.ca, 'utf8');
    const grpcPort = await freePort();
    const config = loadControllerConfig(
      {
        listen: `${listenHost}:${grpcPort}`,
        metricsListen: `${listenHost}:0`,
        dataDir: join(work, 'controller'),
        controllerId: 'lab-controller',
        tlsCert: tls.controller,
        tlsKey: tls.controllerKey,
        // Pinned on the ramdisk's command line: the agents fetch it and trust nothing else.
        agentCa: tls.ca,
        operatorAuth: 'none',
        bootDir,
        // QEMU's user networking maps 10.0.2.2 to the host's loopback; on a bridge the guests dial the listen address.
        ...(network ? {} : { bootControllerAddress: `10.0.2.2:${grpcPort}` }),
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
    const client = tlsClient(controller.grpcAddress, { caPem });
    channel = createChannel(controller.grpcAddress, client.credentials, {
      ...clientChannelOptions({ timeMs: 60_000, timeoutMs: 10_000 }),
      ...client.channelOptions,
    });
    const nodes = createClient(NodeServiceDefinition, channel);
    const images = createClient(ImageServiceDefinition, channel);
    const httpPort = controller.httpAddress.split(':').at(-1);
    const entryUrl = network ? `http://${controller.httpAddress}/boot.ipxe` : `http://10.0.2.2:${httpPort}/boot.ipxe`;
    log(`  controller: gRPC ${controller.grpcAddress} over TLS, HTTP ${controller.httpAddress}; guests boot ${entryUrl}`);
    if (network) {
      const dnsmasq = await network.startDnsmasq(
        dnsmasqConfig({ mode: 'full', bootUrl: entryUrl, interfaces: [network.bridge], range: network.range }),
        work,
      );
      log(`  dnsmasq on ${network.bridge} in namespace ${network.namespace} (${network.subnet}/24); log ${dnsmasq.logPath}`);
    }

    const bmcCa = power === 'redfish' ? await labBmcCa(join(work, 'bmc-ca')) : undefined;
    for (let i = 0; i < count; i++) {
      const name = `lab-node-${i + 1}`;
      const boot = bootOf(i);
      const bmcSocketPath = join(work, `${name}.bmc`);
      const machine: GuestOptions = {
        name,
        mac: labMac(0x4d0001 + i),
        diskPath: join(work, `${name}.img`),
        diskSizeBytes: DISK_BYTES,
        diskSerial: `lab-disk-${i + 1}`,
        // A virtual-media machine's own order starts at its (empty) disk; its BMC boots it once from the CD.
        boot: boot === 'virtual-media' ? 'disk' : 'network',
        cdrom: power === 'redfish',
        consolePath: join(work, `${name}.console.log`),
        qmpSocketPath: join(work, `${name}.qmp`),
        bmcSocketPath,
        // Off: the controller powers it on through its BMC when it needs the agent.
        poweredOn: false,
      };
      if (network) {
        machine.tap = await network.addTap();
        machine.commandPrefix = network.prefix;
      } else {
        machine.netBootUrl = entryUrl;
        machine.forwardGuestPort = 9999;
        machine.forwardHostPort = await freePort();
      }
      const properties: Record<string, string> = {
        // The guest's own address needs no advertising on a bridge; behind QEMU's NAT the controller uses the port forward.
        // no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can fail and panic at boot
        // ("IO-APIC + timer doesn't work!"; seen on CI with the load average at 16), and the guest then network-boots.
        [KERNEL_ARGS_PROPERTY]: `quiet panic=-1 no_timer_check metalcast.lookup_backoff_max=2s${network ? '' : ` metalcast.advertise_address=127.0.0.1:${machine.forwardHostPort}`}`,
      };
      const secrets: Record<string, string> = {};
      if (power === 'ipmi') {
        const password = randomBytes(12).toString('base64url');
        const bmc = await startIpmiBmc({ name, dir: join(work, `${name}-bmc`), username: 'admin', password, qmpSocketPath: bmcSocketPath });
        bmcs.push(bmc);
        machine.extraArgs = bmc.qemuArgs();
        Object.assign(properties, {
          [POWER_DRIVER_PROPERTY]: 'ipmi',
          [IPMI_ADDRESS_PROPERTY]: bmc.address,
          [IPMI_PORT_PROPERTY]: String(bmc.port),
          [IPMI_USERNAME_PROPERTY]: 'admin',
          [BOOT_MODE_PROPERTY]: 'bios',
        });
        secrets[IPMI_PASSWORD_SECRET] = password;
        log(`  ${name}: IPMI BMC (ipmi_sim) at ${bmc.address}:${bmc.port}, log ${bmc.logPath}`);
      } else if (power === 'redfish' && bmcCa) {
        const bmc = await startLabRedfishBmc({
          name,
          dir: join(work, `${name}-bmc`),
          username: 'admin',
          password: randomBytes(12).toString('base64url'),
          ca: bmcCa.ca,
          qmpSocketPath: bmcSocketPath,
          initial: boot === 'virtual-media' ? 'Hdd' : 'Pxe',
          firmware: 'bios',
        });
        redfishBmcs.push(bmc);
        // What `metalcast node create NAME --power redfish --bmc-address … --bmc-password-file FILE` sends: the same code.
        const bmcNode = bmcSettings(
          {
            power: 'redfish',
            bmcAddress: bmc.url,
            bmcUsername: 'admin',
            bmcPasswordFile: bmc.passwordFile,
            bmcCaFile: bmcCa.caFile,
            bootMethod: boot,
            bootMode: 'bios',
          },
          undefined,
        );
        Object.assign(properties, bmcNode.set);
        Object.assign(secrets, bmcNode.secrets);
        log(`  ${name}: Redfish BMC (lab/bmc/redfish) at ${bmc.url}, TLS verified with ${bmcCa.caFile}; boots the agent by ${boot}`);
      } else {
        Object.assign(properties, { [POWER_DRIVER_PROPERTY]: 'qemu', [QMP_SOCKET_PROPERTY]: bmcSocketPath });
      }
      const guest = await startGuest(machine);
      guests.push(guest);
      options.onGuests?.(guests, work);
      await nodes.createNode({ name, macAddresses: [guest.mac], properties, secrets });
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
    const bootsUsed = [...new Set(guests.map((_, i) => bootOf(i)))].join(' and ');

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
    checkVirtualMediaBoots(guests, bootOf);
    phase(`inspected (${bootsUsed} boot, agent lookup, inventory)`);

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
    phase(`deployed (${bootsUsed} boot, write_image, reboot to disk through the ${power} power driver)`);

    for (const guest of guests) {
      const written = await readStart(guest.diskPath, image.length);
      const sha = createHash('sha256').update(written).digest('hex');
      if (sha !== imageSha)
        throw new Error(`${guest.name}: the disk's first ${image.length} bytes have sha256 ${sha}, not the image's ${imageSha}`);
    }
    log(`  every disk holds the image (sha256 ${imageSha.slice(0, 16)}…)`);
    // The deploy ejected the agent ISO before the reboot into the disk: no machine keeps it.
    for (const [i, guest] of guests.entries()) {
      if (bootOf(i) !== 'virtual-media') continue;
      const medium = await cdMedium(guest);
      if (medium) throw new Error(`${guest.name}: deployed, but its CD drive still holds ${medium} (the BMC was not told to eject it)`);
    }
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
    checkNoInsecureAgent(guests);
    log('  every agent fetched the pinned CA and spoke TLS; none ran with metalcast.insecure');
    log(`lab passed in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    passed = true;
    return {
      work,
      timings,
      guests: guests.map((g, i) => ({ name: g.name, mac: g.mac, consolePath: g.consolePath, boot: bootOf(i) })),
    };
  } finally {
    channel?.close();
    // The controller's stop may wait on connections to guests that are off (on a tap nothing resets them);
    // destroying the network ends those connections (pxe-network.ts), so it runs while the stop waits.
    const stopping = controller?.stop();
    await Promise.race([stopping, new Promise((resolve) => setTimeout(resolve, 15_000).unref())]);
    await Promise.all(guests.map((g) => g.stop()));
    await Promise.all(bmcs.map((bmc) => bmc.stop()));
    await Promise.all(redfishBmcs.map((bmc) => bmc.stop()));
    await network?.destroy();
    await Promise.race([stopping, new Promise((resolve) => setTimeout(resolve, 30_000).unref())]);
    if (passed && !options.keep) rmSync(work, { recursive: true, force: true });
  }
}

/**
 * Every guest's agent fetched the controller's CA and checked it against the
 * pinned fingerprint, and none was told metalcast.insecure or warned of
 * plaintext: throws naming the guest otherwise.
 */
export function checkNoInsecureAgent(guests: readonly Pick<Guest, 'name' | 'consolePath'>[]): void {
  for (const guest of guests) {
    const console = readFileSync(guest.consolePath, 'latin1');
    if (/metalcast\.insecure/.test(console)) throw new Error(`${guest.name}: an agent was booted with metalcast.insecure`);
    if (/in plaintext \(--insecure\)/.test(console)) throw new Error(`${guest.name}: an agent talked to the controller in plaintext`);
    if (!/fetched the controller CA and checked it against the pinned fingerprint/.test(console))
      throw new Error(`${guest.name}: no agent fetched the pinned controller CA (metalcast.ca_url)`);
  }
}

/** Every virtual-media guest booted its agent from the CD (GRUB of the agent ISO on its console); throws naming the guest. */
function checkVirtualMediaBoots(guests: readonly Guest[], bootOf: (i: number) => LabBoot): void {
  for (const [i, guest] of guests.entries()) {
    if (bootOf(i) !== 'virtual-media') continue;
    const console = readFileSync(guest.consolePath, 'latin1');
    if (!/Booting `metalcast agent ramdisk'/.test(console))
      throw new Error(`${guest.name}: boots by virtual media, but its console shows no GRUB of the agent ISO booting`);
  }
}

/** The file in the guest's CD drive (QEMU device cd0), or undefined when it is empty. */
async function cdMedium(guest: Guest): Promise<string | undefined> {
  const blocks = await guest.qmp<{ qdev?: string; inserted?: { file: string } }[]>('query-block');
  return blocks.find((b) => b.qdev?.includes('cd0'))?.inserted?.file;
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
