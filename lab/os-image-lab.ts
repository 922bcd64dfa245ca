import { execFile, execFileSync } from 'node:child_process';
import { copyFileSync, createReadStream, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { createChannel, createClient } from 'nice-grpc';
import pino from 'pino';
import { clientChannelOptions } from '../common/grpc-options.js';
import { createLogger } from '../common/logging.js';
import { KERNEL_ARGS_PROPERTY } from '../controller/boot/boot-endpoint.js';
import { loadControllerConfig } from '../controller/config.js';
import { type RunningController, startController } from '../controller/controller.js';
import { POWER_DRIVER_PROPERTY } from '../controller/power/drivers.js';
import { BOOT_MODE_PROPERTY, QMP_SOCKET_PROPERTY } from '../controller/power/qemu.js';
import { ImageFormat, ImageServiceDefinition } from '../gen/metalcast/v1/image.js';
import { DeploySpec, type Node, NodeServiceDefinition, ProvisionAction, ProvisionState } from '../gen/metalcast/v1/node.js';
import { buildOsImage, OS_IMAGE_USER } from '../scripts/os-image/build-os-image.js';
import { buildRamdisk } from '../scripts/ramdisk/build-ramdisk.js';
import { labUnavailable } from './prerequisites.js';
import { freePort, type Guest, labMac, startGuest, uefiUnavailable } from './qemu.js';

/*
 * A real operating system, configured: one UEFI guest (OVMF, TCG) network-
 * boots the agent through iPXE, is cleaned, and is deployed with the Debian
 * 12 image of `npm run build:os-image` (uploaded as qcow2, converted to raw
 * by the controller) and a config drive carrying a fresh SSH key, a host
 * name, a static address from network_data.json and a user-data script that
 * writes a marker. The guest then boots its disk with the image's own
 * bootloader, cloud-init configures it from the config drive, and the lab
 * logs in over SSH (Debian's openssh-client, through a QEMU port forward to
 * the static address) to check the host name, the key login, the address
 * and the marker.
 */

const MIB = 1024 * 1024;
const GIB = 1024 * MIB;
/** The static address network_data.json gives the guest: not the 10.0.2.15 QEMU's DHCP hands out. */
export const STATIC_ADDRESS = '10.0.2.50';
const HOSTNAME = 'metalcast-os-1';
const MARKER_PATH = '/var/lib/metalcast-marker';

export interface OsImageLabOptions {
  log?: (line: string) => void;
  /** Longest each phase may take (default 10 min). */
  phaseTimeoutMs?: number;
  keep?: boolean;
  onGuest?: (guest: Guest, work: string) => void;
}

export interface OsImageLabResult {
  timings: [string, number][];
  /** What the checks over SSH found. */
  hostname: string;
  addresses: string;
  marker: string;
}

const run = promisify(execFile);

export async function runOsImageLab(options: OsImageLabOptions = {}): Promise<OsImageLabResult> {
  const log = options.log ?? ((line: string) => process.stdout.write(`${line}\n`));
  const phaseTimeoutMs = options.phaseTimeoutMs ?? 600_000;
  const why = labUnavailable() ?? uefiUnavailable();
  if (why) throw new Error(`the OS image lab cannot run here: ${why}`);
  const timings: [string, number][] = [];
  let phaseStart = Date.now();
  const phase = (name: string) => {
    const now = Date.now();
    timings.push([name, now - phaseStart]);
    log(`  ${name}: ${((now - phaseStart) / 1000).toFixed(1)} s`);
    phaseStart = now;
  };
  const work = mkdtempSync(join(tmpdir(), 'metalcast-os-lab-'));
  let guest: Guest | undefined;
  let controller: RunningController | undefined;
  let channel: ReturnType<typeof createChannel> | undefined;
  let passed = false;
  try {
    log(`OS image lab: work folder ${work}`);
    const osImage = await buildOsImage({ onLine: undefined });
    log(`  OS image ${osImage.path} (${osImage.reused ? 'cached' : 'built'}; ${(osImage.manifest.bytes / MIB).toFixed(1)} MiB qcow2)`);
    const ramdisk = await buildRamdisk();
    const bootDir = join(work, 'boot');
    mkdirSync(bootDir);
    copyFileSync(ramdisk.kernel.path, join(bootDir, 'vmlinuz'));
    copyFileSync(ramdisk.initramfs.path, join(bootDir, 'initramfs.cpio.gz'));
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'metalcast-lab', '-f', join(work, 'id_ed25519')], {
      stdio: 'ignore',
    });
    const publicKey = readFileSync(join(work, 'id_ed25519.pub'), 'utf8').trim();
    phase('OS image, ramdisk and a fresh SSH key ready');

    const grpcPort = await freePort();
    const config = loadControllerConfig(
      {
        listen: `127.0.0.1:${grpcPort}`,
        metricsListen: '127.0.0.1:0',
        dataDir: join(work, 'controller'),
        controllerId: 'os-lab-controller',
        insecure: 'true',
        operatorAuth: 'none',
        bootDir,
        bootControllerAddress: `10.0.2.2:${grpcPort}`,
        heartbeatTimeout: '300s',
        heartbeatIntervalMin: '1s',
        heartbeatIntervalMax: '2s',
        sweepInterval: '1s',
        heartbeatFlushInterval: '100ms',
        startupGrace: '0s',
        keepaliveTime: '5s',
        keepaliveTimeout: '5s',
        cleanMode: 'quick',
        deployFinalPower: 'reboot',
      },
      {},
    );
    const logger = createLogger({
      name: 'os-lab-controller',
      level: 'info',
      destination: pino.destination({ dest: join(work, 'controller.log'), sync: true }),
    });
    controller = await startController(config, logger);
    channel = createChannel(controller.grpcAddress, undefined, clientChannelOptions({ timeMs: 60_000, timeoutMs: 10_000 }));
    const nodes = createClient(NodeServiceDefinition, channel);
    const images = createClient(ImageServiceDefinition, channel);
    const httpPort = controller.httpAddress.split(':').at(-1);

    const sent = statSync(osImage.path).size;
    const { image } = await images.uploadImage(
      (async function* () {
        yield { part: { $case: 'header' as const, value: { name: 'debian-12', sha256: osImage.manifest.sha256, sizeBytes: sent } } };
        for await (const chunk of createReadStream(osImage.path, { highWaterMark: 2 * MIB })) {
          yield { part: { $case: 'data' as const, value: chunk as Buffer } };
        }
      })(),
      { signal: AbortSignal.timeout(300_000) },
    );
    if (image?.format !== ImageFormat.IMAGE_FORMAT_QCOW2 || image.sizeBytes !== osImage.manifest.virtualBytes) {
      throw new Error(`the controller stored the qcow2 as ${ImageFormat[image?.format ?? 0]} of ${image?.sizeBytes} bytes`);
    }
    phase(
      `qcow2 uploaded (${(sent / MIB).toFixed(1)} MiB) and converted: raw ${(image.sizeBytes / MIB).toFixed(1)} MiB, ${(image.allocatedBytes / MIB).toFixed(1)} MiB of data`,
    );

    const agentPort = await freePort();
    const sshPort = await freePort();
    const name = 'os-node-1';
    const mac = labMac(0x4f0001);
    guest = await startGuest({
      name,
      mac,
      firmware: 'uefi',
      diskPath: join(work, `${name}.img`),
      diskSizeBytes: 2 * GIB,
      diskSerial: 'os-lab-disk-1',
      boot: 'network',
      netBootUrl: `http://10.0.2.2:${httpPort}/boot.ipxe`,
      forwardGuestPort: 9999,
      forwardHostPort: agentPort,
      forwards: [{ hostPort: sshPort, guestAddress: STATIC_ADDRESS, guestPort: 22 }],
      consolePath: join(work, `${name}.console.log`),
      qmpSocketPath: join(work, `${name}.qmp`),
      bmcSocketPath: join(work, `${name}.bmc`),
      memoryMiB: 1024,
      poweredOn: false,
    });
    options.onGuest?.(guest, work);
    await nodes.createNode({
      name,
      macAddresses: [mac],
      properties: {
        [POWER_DRIVER_PROPERTY]: 'qemu',
        [QMP_SOCKET_PROPERTY]: join(work, `${name}.bmc`),
        [BOOT_MODE_PROPERTY]: 'uefi',
        [KERNEL_ARGS_PROPERTY]: `quiet panic=-1 no_timer_check metalcast.advertise_address=${guest.forwardedAddress} metalcast.lookup_backoff_max=2s`,
      },
    });
    const waitFor = async (state: ProvisionState, what: string): Promise<Node> => {
      const deadline = Date.now() + phaseTimeoutMs;
      for (;;) {
        const node = (await nodes.getNode({ node: name })).node as Node;
        if (node.provisionState === state) return node;
        if (node.lastError) throw new Error(`${name} is ${ProvisionState[node.provisionState]} while ${what}: ${node.lastError}`);
        if (Date.now() > deadline)
          throw new Error(`${what}: not done within ${phaseTimeoutMs / 1000} s (${ProvisionState[node.provisionState]})`);
        await new Promise((resolve) => setTimeout(resolve, 1000));
      }
    };
    await nodes.setProvisionState({ node: name, action: ProvisionAction.PROVISION_ACTION_MANAGE });
    await nodes.setProvisionState({ node: name, action: ProvisionAction.PROVISION_ACTION_PROVIDE });
    await waitFor(ProvisionState.PROVISION_STATE_AVAILABLE, 'cleaning');
    phase('cleaned: UEFI network boot (OVMF, iPXE), agent, quick erase');

    const networkData = {
      links: [{ id: 'nic0', type: 'phy', ethernet_mac_address: mac, mtu: 1500 }],
      networks: [
        {
          id: 'net0',
          type: 'ipv4',
          link: 'nic0',
          ip_address: STATIC_ADDRESS,
          netmask: '255.255.255.0',
          routes: [{ network: '0.0.0.0', netmask: '0.0.0.0', gateway: '10.0.2.2' }],
        },
      ],
      services: [{ type: 'dns', address: '10.0.2.3' }],
    };
    const userData = `#!/bin/sh\necho "metalcast-marker $(hostname)" > ${MARKER_PATH}\n`;
    const consoleMark = guest.consoleLength();
    await nodes.setProvisionState({
      node: name,
      action: ProvisionAction.PROVISION_ACTION_DEPLOY,
      deploy: DeploySpec.fromPartial({
        image: 'debian-12',
        hostname: HOSTNAME,
        sshPublicKeys: [publicKey],
        userData: Buffer.from(userData),
        networkData: JSON.stringify(networkData),
      }),
    });
    const active = await waitFor(ProvisionState.PROVISION_STATE_ACTIVE, 'deploying');
    if (!active.deploy?.configDrive) throw new Error('the active node shows no config drive');
    phase('deployed: qcow2 image as raw, config drive at the end of the disk, reboot to disk');

    await guest.waitForConsole(/Datasource DataSourceConfigDrive/, phaseTimeoutMs, { since: consoleMark });
    phase('booted from disk with its own GRUB under UEFI; cloud-init found the config drive');

    const ssh = async (command: string) =>
      (
        await run(
          'ssh',
          [
            '-i',
            join(work, 'id_ed25519'),
            '-p',
            String(sshPort),
            '-o',
            'BatchMode=yes',
            '-o',
            'IdentitiesOnly=yes',
            '-o',
            'StrictHostKeyChecking=no',
            '-o',
            `UserKnownHostsFile=${join(work, 'known_hosts')}`,
            '-o',
            'ConnectTimeout=10',
            '-o',
            'LogLevel=ERROR',
            `${OS_IMAGE_USER}@127.0.0.1`,
            command,
          ],
          { timeout: 60_000 },
        )
      ).stdout.trim();
    const deadline = Date.now() + phaseTimeoutMs;
    let hostname = '';
    let lastError = '';
    while (!hostname) {
      try {
        hostname = await ssh('hostname');
      } catch (error) {
        lastError = (error as { stderr?: string }).stderr?.trim() || (error as Error).message;
        if (Date.now() > deadline)
          throw new Error(`no SSH login to ${OS_IMAGE_USER}@${STATIC_ADDRESS} with the deployed key: ${lastError}`);
        await new Promise((resolve) => setTimeout(resolve, 3000));
      }
    }
    const addresses = await ssh('ip -4 -o address show scope global');
    // cloud-init runs the user-data script late in boot: wait for it.
    const marker = await ssh(`for i in $(seq 1 60); do [ -s ${MARKER_PATH} ] && break; sleep 2; done; cat ${MARKER_PATH}`);
    phase('logged in over SSH with the deployed key');
    log(`  hostname: ${hostname}; addresses: ${addresses.replace(/\s+/g, ' ')}; marker: ${marker}`);
    if (hostname !== HOSTNAME) throw new Error(`the guest's host name is '${hostname}', not '${HOSTNAME}'`);
    if (!addresses.includes(`inet ${STATIC_ADDRESS}/24`)) throw new Error(`the guest does not have ${STATIC_ADDRESS}/24: ${addresses}`);
    if (marker !== `metalcast-marker ${HOSTNAME}`) throw new Error(`the user-data marker is '${marker}'`);
    writeFileSync(join(work, 'result.txt'), `${hostname}\n${addresses}\n${marker}\n`);
    passed = true;
    return { timings, hostname, addresses, marker };
  } finally {
    await guest?.stop();
    channel?.close();
    await controller?.stop();
    if (passed && !options.keep) rmSync(work, { recursive: true, force: true });
  }
}
