import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, it, type TestContext } from 'node:test';
import { createChannel, createClient } from 'nice-grpc';
import pino from 'pino';
import { clientChannelOptions } from '../../common/grpc-options.js';
import { createLogger } from '../../common/logging.js';
import { tlsClient } from '../../common/tls.js';
import { tlsInit } from '../../common/tls-init.js';
import { KERNEL_ARGS_PROPERTY } from '../../controller/boot/boot-endpoint.js';
import { loadControllerConfig } from '../../controller/config.js';
import { type RunningController, startController } from '../../controller/controller.js';
import { type Node, NodeServiceDefinition, ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { createPxeNetwork, type Dnsmasq, type PxeNetwork, pxeNetworkUnavailable } from '../../lab/network/pxe-network.js';
import { labUnavailable } from '../../lab/prerequisites.js';
import { type Guest, labMac, startGuest } from '../../lab/qemu.js';
import { buildRamdisk } from '../../scripts/ramdisk/build-ramdisk.js';
import { caPinOfPem } from '../../common/ca-pin.js';

/*
 * Network boot through a real DHCP server, for real: a network namespace with
 * a bridge, a tap per guest and a veth pair to this process (where the
 * controller listens, on the guests' segment); dnsmasq on the bridge,
 * configured by `metalcast boot dnsmasq-config --mode full`; QEMU guests on
 * the taps. The firmware's PXE asks DHCP, fetches iPXE by TFTP from dnsmasq
 * (ipxe.efi for UEFI; under SeaBIOS QEMU's NIC ROM is iPXE already), iPXE asks DHCP again and is
 * sent to the controller's script, which boots the agent ramdisk with the
 * controller's CA pinned on its command line; the agent fetches the CA,
 * checks it, and is inspected over TLS. BIOS: SeaBIOS with QEMU's default NIC
 * ROM, NIC first in the boot order. UEFI: OVMF's own PXE, the NIC ROM off.
 *
 * Needs root, ip, dnsmasq, Debian's ipxe and ovmf, and what the lab needs;
 * skips outside CI without them, fails under CI=true.
 */

const unavailable = labUnavailable() ?? pxeNetworkUnavailable();
const skip = unavailable && process.env.CI !== 'true' ? `cannot network-boot guests here: ${unavailable}` : false;
if (skip) process.stderr.write(`pxe-dnsmasq.test.ts: skipping: ${skip}\n`);

const METALCAST = fileURLToPath(new URL('../../bin/metalcast.js', import.meta.url));
/** From power on to the agent's inventory under TCG on a busy 2-vCPU machine (BIOS took about 1 min quiet, UEFI 1.5). */
const INSPECT_TIMEOUT_MS = 420_000;

describe('network boot through dnsmasq in a network namespace', { skip, timeout: 1_200_000 }, () => {
  let work: string;
  let network: PxeNetwork;
  let dnsmasq: Dnsmasq;
  let controller: RunningController;
  let channel: ReturnType<typeof createChannel>;
  let nodes: ReturnType<typeof createClient<typeof NodeServiceDefinition>>;
  let caPem: string;
  let keep = false;
  const guests: Guest[] = [];

  before(async () => {
    work = mkdtempSync(join(tmpdir(), 'metalcast-pxe-'));
    const ramdisk = await buildRamdisk();
    const bootDir = join(work, 'boot');
    mkdirSync(bootDir);
    copyFileSync(ramdisk.kernel.path, join(bootDir, 'vmlinuz'));
    copyFileSync(ramdisk.initramfs.path, join(bootDir, 'initramfs.cpio.gz'));

    network = await createPxeNetwork();
    const tls = await tlsInit({ dir: join(work, 'tls'), hosts: [network.hostAddress], days: 2 });
    caPem = readFileSync(tls.ca, 'utf8');
    const config = loadControllerConfig(
      {
        listen: `${network.hostAddress}:0`,
        metricsListen: `${network.hostAddress}:0`,
        dataDir: join(work, 'controller'),
        controllerId: 'pxe-test',
        tlsCert: tls.controller,
        tlsKey: tls.controllerKey,
        agentCa: tls.ca,
        operatorAuth: 'none',
        bootDir,
        heartbeatTimeout: '180s',
        heartbeatIntervalMin: '1s',
        heartbeatIntervalMax: '2s',
        sweepInterval: '1s',
        heartbeatFlushInterval: '100ms',
        startupGrace: '0s',
        keepaliveTime: '2s',
        keepaliveTimeout: '2s',
      },
      {},
    );
    const logger = createLogger({
      name: 'pxe-controller',
      level: 'info',
      destination: pino.destination({ dest: join(work, 'controller.log'), sync: true }),
    });
    controller = await startController(config, logger);
    const client = tlsClient(controller.grpcAddress, { caPem });
    channel = createChannel(controller.grpcAddress, client.credentials, {
      ...clientChannelOptions({ timeMs: 60_000, timeoutMs: 10_000 }),
      ...client.channelOptions,
    });
    nodes = createClient(NodeServiceDefinition, channel);

    // The operator's way: the CLI writes the configuration.
    const conf = join(work, 'metalcast-dnsmasq.conf');
    const generated = spawnSync(
      process.execPath,
      [
        METALCAST,
        'boot',
        'dnsmasq-config',
        '--mode',
        'full',
        '--boot-url',
        `http://${controller.httpAddress}/boot.ipxe`,
        '--interface',
        network.bridge,
        '--range',
        `${network.range.start},${network.range.end},255.255.255.0`,
        '--out',
        conf,
      ],
      { encoding: 'utf8', timeout: 60_000 },
    );
    assert.equal(generated.status, 0, generated.stderr);
    dnsmasq = await network.startDnsmasq(readFileSync(conf, 'utf8'), work);
  });

  after(async () => {
    // A guest gone from a tap leaves the controller's TCP connections to it half-open (nothing resets them), and
    // the controller's stop waits on them: destroying the network ends them (pxe-network.ts) while it waits.
    channel?.close();
    const stopping = controller?.stop();
    await Promise.race([stopping, new Promise((resolve) => setTimeout(resolve, 15_000).unref())]);
    await Promise.all(guests.map((guest) => guest.stop()));
    await network?.destroy();
    await stopping;
    if (keep) process.stderr.write(`pxe-dnsmasq.test.ts: files kept in ${work}\n`);
    else if (work) rmSync(work, { recursive: true, force: true });
  });

  const boot = async (
    ctx: TestContext,
    name: string,
    firmware: 'bios' | 'uefi',
    macIndex: number,
    firmwareFile?: string,
    /** Proxy DHCP: the site's server, which hands out the address (default: dnsmasq does it all). */
    siteDhcp?: Dnsmasq,
  ) => {
    const tap = await network.addTap();
    const guest = await startGuest({
      name,
      mac: labMac(macIndex),
      diskPath: join(work, `${name}.img`),
      diskSizeBytes: 64 * 1024 * 1024,
      boot: 'network',
      tap,
      commandPrefix: network.prefix,
      firmware,
      // UEFI: OVMF's own PXE (no iPXE ROM on the NIC); BIOS: QEMU's default NIC ROM.
      ...(firmware === 'uefi' ? { nicRomFile: '' } : {}),
      consolePath: join(work, `${name}.console.log`),
      qmpSocketPath: join(work, `${name}.qmp`),
      poweredOn: false,
    });
    guests.push(guest);
    try {
      await nodes.createNode({
        name,
        macAddresses: [guest.mac],
        properties: { [KERNEL_ARGS_PROPERTY]: 'quiet panic=-1 no_timer_check metalcast.lookup_backoff_max=2s' },
      });
      await nodes.setProvisionState({ node: name, action: ProvisionAction.PROVISION_ACTION_MANAGE });
      await nodes.setProvisionState({ node: name, action: ProvisionAction.PROVISION_ACTION_INSPECT });
      const started = Date.now();
      await guest.powerOn();
      const node = await waitFor(name, ProvisionState.PROVISION_STATE_MANAGEABLE, INSPECT_TIMEOUT_MS);
      ctx.diagnostic(`${name} (${firmware}): power on to inspected in ${((Date.now() - started) / 1000).toFixed(1)} s`);
      assert.deepEqual(
        node.inventory?.interfaces.map((nic) => nic.macAddress),
        [guest.mac],
      );
      // The chain as the DHCP and TFTP server saw it, and as the guest's console shows it.
      const log = dnsmasq.log();
      const acked = (server: string) => new RegExp(`DHCPACK\\(${server}\\) [0-9.]+ ${guest.mac}`);
      if (siteDhcp) {
        // The address came from the site's server; metalcast's proxy gave only the boot part and leased nothing.
        assert.match(siteDhcp.log(), acked('site1'));
        assert.match(log, new RegExp(`\\(${network.bridge}\\) ${guest.mac} proxy`));
        assert.doesNotMatch(log, acked(network.bridge), 'the proxy leased an address');
      } else {
        assert.match(log, acked(network.bridge));
      }
      if (firmwareFile) {
        assert.match(log, new RegExp(`bootfile[- ]name:? +${firmwareFile.replace('.', '\\.')}`), 'the firmware was told to fetch iPXE');
      }
      assert.match(
        log,
        new RegExp(`http://${controller.httpAddress.replaceAll('.', '\\.')}/boot\\.ipxe`),
        'iPXE was sent to the controller',
      );
      const console = readFileSync(guest.consolePath, 'latin1');
      assert.match(console, /iPXE/);
      assert.match(console, new RegExp(`metalcast\\.ca_fingerprint=${caPinOfPem(caPem)}`));
      assert.doesNotMatch(console, /metalcast\.insecure/);
      assert.match(console, /fetched the controller CA and checked it against the pinned fingerprint/);
    } catch (error) {
      keep = true;
      throw new Error(
        `${(error as Error).message}\n--- console of ${name}:\n${guest.consoleTail(40)}\n--- dnsmasq:\n${dnsmasq.log().slice(-3000)}${siteDhcp ? `\n--- site DHCP:\n${siteDhcp.log().slice(-2000)}` : ''}\n(files in ${work})`,
        { cause: error },
      );
    }
  };

  const waitFor = async (name: string, state: ProvisionState, timeoutMs: number): Promise<Node> => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const { node } = await nodes.getNode({ node: name });
      if (node?.provisionState === state) return node;
      if (node?.lastError) throw new Error(`${name} is ${ProvisionState[node.provisionState]}: ${node.lastError}`);
      if (Date.now() > deadline) throw new Error(`${name} did not reach ${ProvisionState[state]} within ${timeoutMs / 1000} s`);
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  };

  // QEMU's NIC ROM for SeaBIOS is iPXE itself: it asks DHCP as iPXE and goes straight to the controller.
  it("BIOS: SeaBIOS with QEMU's iPXE NIC ROM -> dnsmasq DHCP -> the controller -> the agent over pinned TLS", (ctx) =>
    boot(ctx, 'pxe-bios', 'bios', 0x5e0001));

  it('UEFI: OVMF PXE -> dnsmasq DHCP -> TFTP ipxe.efi -> iPXE -> the controller -> the agent over pinned TLS', (ctx) =>
    boot(ctx, 'pxe-uefi', 'uefi', 0x5e0002, 'ipxe.efi'));

  it("next to the site's DHCP server: dnsmasq --mode proxy adds only the boot part, and a UEFI guest boots the agent", async (ctx) => {
    await dnsmasq.stop();
    const siteDhcp = await network.startSiteDhcp(work);
    const generated = spawnSync(
      process.execPath,
      [
        METALCAST,
        'boot',
        'dnsmasq-config',
        '--mode',
        'proxy',
        '--boot-url',
        `http://${controller.httpAddress}/boot.ipxe`,
        '--interface',
        network.bridge,
        '--subnet',
        network.subnet,
      ],
      { encoding: 'utf8', timeout: 60_000 },
    );
    assert.equal(generated.status, 0, generated.stderr);
    dnsmasq = await network.startDnsmasq(generated.stdout, work, 'dnsmasq-proxy');
    await boot(ctx, 'pxe-proxy', 'uefi', 0x5e0003, 'ipxe.efi', siteDhcp);
  });
});
