import { isIPv4 } from 'node:net';

/**
 * A dnsmasq configuration for network boot into metalcast
 * (`metalcast boot dnsmasq-config`), for Debian's dnsmasq (or dnsmasq-base)
 * and the iPXE binaries of Debian's `ipxe` package:
 *
 * 1. the machine's firmware PXE ROM asks DHCP and is told to fetch iPXE by
 *    TFTP from dnsmasq's own TFTP server: undionly.kpxe for BIOS (client
 *    architecture 0), ipxe.efi (default) or snponly.efi for x86-64 UEFI (7
 *    and 9);
 * 2. iPXE asks DHCP again, with user class "iPXE", and is given the
 *    controller's entry script URL (http://CONTROLLER:9350/boot.ipxe), which
 *    chains to the per-MAC script that boots the agent ramdisk or the disk.
 *
 * Two modes:
 * - `proxy`: the site keeps its DHCP server for addresses; dnsmasq answers
 *   only the PXE part (proxy DHCP, RFC 4578 / PXE 2.1), on the same segment
 *   (or behind a DHCP relay that also forwards to it);
 * - `full`: an isolated provisioning network with no other DHCP: dnsmasq
 *   hands out addresses from a range too.
 *
 * DNS is off (port=0): dnsmasq is only the boot server here.
 */

export type DnsmasqMode = 'proxy' | 'full';

export interface DnsmasqConfigOptions {
  mode: DnsmasqMode;
  /** The controller's iPXE entry script, http://HOST:PORT/boot.ipxe (its --metrics-listen address, reachable from the machines). */
  bootUrl: string;
  /** Interface dnsmasq serves on (the provisioning network); several may be given. */
  interfaces: string[];
  /** proxy: the subnet's network address, e.g. 10.0.0.0 (dnsmasq answers PXE for clients in it). */
  subnet?: string;
  /** full: first and last address to lease, and the netmask (default 255.255.255.0). */
  range?: { start: string; end: string; netmask?: string };
  /** full: lease time, e.g. 1h (default 1h). */
  leaseTime?: string;
  /** full: the default gateway handed out (none when not given: nothing routes off the provisioning network). */
  router?: string;
  /** Folder TFTP serves the iPXE binaries from (default /usr/lib/ipxe, Debian's ipxe package). */
  tftpRoot?: string;
  /**
   * The UEFI iPXE binary: ipxe.efi (iPXE's own NIC drivers; default) or
   * snponly.efi (the firmware's NIC driver, for NICs iPXE has no driver for).
   * On OVMF with virtio-net here, snponly.efi never got past DHCP.
   */
  uefiBinary?: 'snponly.efi' | 'ipxe.efi';
}

/** Debian's ipxe package installs its binaries here. */
export const DEBIAN_IPXE_DIR = '/usr/lib/ipxe';
export const BIOS_IPXE = 'undionly.kpxe';

/** The configuration text, or an Error naming the option to fix. */
export function dnsmasqConfig(options: DnsmasqConfigOptions): string {
  const problems: string[] = [];
  let url: URL | undefined;
  try {
    url = new URL(options.bootUrl);
    if (url.protocol !== 'http:')
      problems.push(`--boot-url: '${options.bootUrl}' is not an http:// URL (iPXE fetches it; Debian's iPXE has no HTTPS)`);
  } catch {
    problems.push(`--boot-url: '${options.bootUrl}' is not a URL; the form is http://CONTROLLER:9350/boot.ipxe`);
  }
  if (options.interfaces.length === 0) problems.push('--interface: name the interface on the provisioning network');
  for (const name of options.interfaces)
    if (!/^[\w.:-]{1,15}$/.test(name)) problems.push(`--interface: '${name}' is not an interface name`);
  if (options.mode === 'proxy') {
    if (!options.subnet || !isIPv4(options.subnet))
      problems.push('--subnet: proxy mode needs the network address of the subnet, e.g. 10.0.0.0');
  } else {
    const range = options.range;
    if (!range || !isIPv4(range.start) || !isIPv4(range.end))
      problems.push('--range: full mode needs START,END[,NETMASK], e.g. 10.0.0.100,10.0.0.200');
    if (range?.netmask && !isIPv4(range.netmask)) problems.push(`--range: '${range.netmask}' is not a netmask`);
    if (options.router && !isIPv4(options.router)) problems.push(`--router: '${options.router}' is not an IPv4 address`);
    if (options.leaseTime && !/^(\d+[smhd]?|infinite)$/.test(options.leaseTime))
      problems.push(`--lease-time: '${options.leaseTime}' is not like 1h`);
  }
  if (problems.length > 0) throw new Error(problems.join('; '));
  const tftpRoot = options.tftpRoot ?? DEBIAN_IPXE_DIR;
  const uefi = options.uefiBinary ?? 'ipxe.efi';
  const bootUrl = (url as URL).href;
  const lines = [
    '# dnsmasq configuration for network boot into metalcast, made by',
    `#   metalcast boot dnsmasq-config --mode ${options.mode} ...`,
    "# Firmware PXE -> DHCP -> TFTP iPXE -> DHCP again (user class iPXE) -> the controller's script.",
    '',
    '# DNS off: dnsmasq is only the boot server.',
    'port=0',
    ...options.interfaces.map((name) => `interface=${name}`),
    'bind-interfaces',
    'log-dhcp',
    '',
    "# TFTP serves the iPXE binaries of Debian's ipxe package.",
    'enable-tftp',
    `tftp-root=${tftpRoot}`,
    '',
    '# Who asks: iPXE itself (user class "iPXE", or its option 175), or a firmware PXE ROM by architecture (RFC 4578).',
    'dhcp-userclass=set:ipxe,iPXE',
    'dhcp-match=set:ipxe,175',
    'dhcp-match=set:efi64,option:client-arch,7',
    'dhcp-match=set:efi64,option:client-arch,9',
    '',
  ];
  if (options.mode === 'full') {
    const range = options.range as { start: string; end: string; netmask?: string };
    lines.push(
      '# Full DHCP: this is the only DHCP server on the provisioning network.',
      `dhcp-range=${range.start},${range.end},${range.netmask ?? '255.255.255.0'},${options.leaseTime ?? '1h'}`,
      options.router
        ? `dhcp-option=option:router,${options.router}`
        : '# No router handed out: nothing routes off the provisioning network.',
      ...(options.router ? [] : ['dhcp-option=option:router']),
      'dhcp-option=option:dns-server',
      'dhcp-authoritative',
      '',
      "# Firmware PXE: iPXE by TFTP; iPXE: the controller's entry script.",
      `dhcp-boot=tag:!ipxe,tag:efi64,${uefi}`,
      `dhcp-boot=tag:!ipxe,tag:!efi64,${BIOS_IPXE}`,
      `dhcp-boot=tag:ipxe,${bootUrl}`,
    );
  } else {
    lines.push(
      "# Proxy DHCP: the site's DHCP server hands out addresses; this one adds only the boot part.",
      `dhcp-range=${options.subnet},proxy`,
      '',
      "# Firmware PXE: iPXE by TFTP from this server; iPXE: the controller's entry script.",
      `pxe-service=tag:!ipxe,x86PC,"metalcast: iPXE (BIOS)",${BIOS_IPXE}`,
      `pxe-service=tag:!ipxe,x86-64_EFI,"metalcast: iPXE (UEFI)",${uefi}`,
      `pxe-service=tag:!ipxe,BC_EFI,"metalcast: iPXE (UEFI)",${uefi}`,
      `dhcp-boot=tag:ipxe,${bootUrl}`,
    );
  }
  return `${lines.join('\n')}\n`;
}
