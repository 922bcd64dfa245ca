import { writeFileSync } from 'node:fs';
import { type Command, InvalidArgumentError, Option } from 'commander';
import { DEBIAN_IPXE_DIR, type DnsmasqMode, dnsmasqConfig } from '../../controller/boot/dnsmasq-config.js';

/** `metalcast boot …`: what network boot needs besides the controller. */
/** A dnsmasq lease time: seconds, or with an s, m, h, d or w suffix, or infinite (dnsmasq refuses anything else at start). */
function parseLeaseTime(raw: string): string {
  if (!/^(\d+[smhdw]?|infinite)$/.test(raw.trim()))
    throw new InvalidArgumentError(`'${raw}' is not a lease time such as 1h, 45m, 3600 or infinite`);
  return raw.trim();
}

export function registerBootCommands(program: Command): void {
  const boot = program.command('boot').description('network boot: configuration for the DHCP and TFTP side');
  boot
    .command('dnsmasq-config')
    .description(
      "print a dnsmasq configuration that network-boots machines into metalcast: firmware PXE gets iPXE by TFTP (Debian's ipxe package), iPXE gets the controller's script. --mode proxy works next to the site's own DHCP server; --mode full is the only DHCP server of an isolated provisioning network",
    )
    .addOption(
      new Option('--mode <mode>', 'proxy (the site keeps its DHCP for addresses) or full (dnsmasq hands out addresses too)')
        .choices(['proxy', 'full'])
        .makeOptionMandatory(),
    )
    .requiredOption(
      '--boot-url <url>',
      "the controller's iPXE entry script as machines reach it: http://CONTROLLER:9350/boot.ipxe (its --metrics-listen)",
    )
    .requiredOption(
      '--interface <name>',
      'interface on the provisioning network dnsmasq serves (repeat for several)',
      (value: string, previous: string[] = []) => [...previous, value],
    )
    .option('--subnet <address>', 'proxy mode: network address of the subnet the machines are in, e.g. 10.0.0.0')
    .option('--range <start,end[,netmask]>', 'full mode: addresses to lease, e.g. 10.0.0.100,10.0.0.200,255.255.255.0', (raw: string) => {
      const [start, end, netmask] = raw.split(',').map((part) => part.trim());
      if (!start || !end) throw new InvalidArgumentError(`'${raw}' is not START,END[,NETMASK]`);
      return { start, end, netmask };
    })
    .option('--router <address>', 'full mode: default gateway to hand out (default: none, so nothing routes off the provisioning network)')
    .option('--lease-time <time>', 'full mode: lease time, e.g. 1h, 45m, 3600 or infinite', parseLeaseTime, '1h')
    .option('--tftp-root <dir>', 'folder holding undionly.kpxe, snponly.efi and ipxe.efi', DEBIAN_IPXE_DIR)
    .addOption(
      new Option(
        '--uefi-binary <file>',
        "UEFI iPXE: ipxe.efi drives the NIC with iPXE's own drivers; snponly.efi through the firmware's (for NICs iPXE does not know)",
      )
        .choices(['ipxe.efi', 'snponly.efi'])
        .default('ipxe.efi'),
    )
    .option('--out <file>', 'write the configuration to this file instead of standard output (e.g. /etc/dnsmasq.d/metalcast.conf)')
    .action(
      (opts: {
        mode: DnsmasqMode;
        bootUrl: string;
        interface: string[];
        subnet?: string;
        range?: { start: string; end: string; netmask?: string };
        router?: string;
        leaseTime: string;
        tftpRoot: string;
        uefiBinary: 'snponly.efi' | 'ipxe.efi';
        out?: string;
      }) => {
        let text: string;
        try {
          text = dnsmasqConfig({
            mode: opts.mode,
            bootUrl: opts.bootUrl,
            interfaces: opts.interface,
            subnet: opts.subnet,
            range: opts.range,
            router: opts.router,
            leaseTime: opts.leaseTime,
            tftpRoot: opts.tftpRoot,
            uefiBinary: opts.uefiBinary,
          });
        } catch (error) {
          process.stderr.write(`metalcast boot dnsmasq-config: ${(error as Error).message}\n`);
          process.exitCode = 2;
          return;
        }
        if (opts.out) {
          writeFileSync(opts.out, text);
          process.stderr.write(
            `wrote ${opts.out}; run: dnsmasq --conf-file=${opts.out} (or put it in /etc/dnsmasq.d/ and restart dnsmasq)\n`,
          );
        } else {
          process.stdout.write(text);
        }
      },
    );
}
