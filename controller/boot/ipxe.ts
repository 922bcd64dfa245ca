/**
 * iPXE scripts for network-booting lab machines, as tested against the
 * iPXE in Debian 12's ipxe-qemu (1.0.0+git-20190125), which QEMU loads as
 * the virtio NIC's option ROM.
 *
 * The flow: QEMU's DHCP hands out `bootfile` = the entry script's URL (the
 * `netBootUrl` of lab/qemu.ts); iPXE fetches it over HTTP from 10.0.2.2,
 * which QEMU's user networking maps to the host's 127.0.0.1. The entry script
 * chains to a per-machine script named by the booting NIC's MAC, which either
 * boots the agent ramdisk, boots the local disk, or says that the MAC is
 * unknown and tries again a little later.
 */

/** Where the per-MAC script lives under `baseUrl`: iPXE fills in the MAC, hyphenated ("52-54-00-12-34-56"). */
// biome-ignore lint/suspicious/noTemplateCurlyInString: an iPXE setting, which iPXE expands
export const PER_MAC_PATH = 'ipxe/mac/${net0/mac:hexhyp}';

/** The MAC in a per-MAC script path, as aa:bb:cc:dd:ee:ff; undefined when the path is not one. */
export function macFromPath(path: string): string | undefined {
  const match = /^\/ipxe\/mac\/([0-9a-f]{2}(?:-[0-9a-f]{2}){5})$/i.exec(path);
  return match ? (match[1] as string).toLowerCase().replaceAll('-', ':') : undefined;
}

/**
 * The entry script (DHCP bootfile): chains to the per-MAC script, and when
 * that cannot be fetched (controller down), says so and tries again.
 */
export function entryScript(baseUrl: string, retrySeconds = 10): string {
  return `#!ipxe
:retry
chain --replace ${baseUrl}/${PER_MAC_PATH} || goto failed
:failed
echo metalcast: cannot fetch the boot script for \${net0/mac} from ${baseUrl}; trying again in ${retrySeconds} s
sleep ${retrySeconds}
goto retry
`;
}

/** For a MAC no node has: says so on the console, waits, and starts over with the entry script. */
export function unknownMacScript(baseUrl: string, entryPath: string, retrySeconds = 30): string {
  return `#!ipxe
echo metalcast: no node has MAC \${net0/mac}: enrol it (metalcast node create NAME --mac \${net0/mac}); trying again in ${retrySeconds} s
sleep ${retrySeconds}
chain --replace ${baseUrl}/${entryPath}
`;
}

/**
 * Boots the agent ramdisk with these kernel parameters (console=ttyS0 and the
 * metalcast.* keys). `initrd=<name>` is for UEFI: this iPXE's EFI build does
 * not hand the initrd to the kernel itself, the kernel's EFI stub loads it by
 * that name (iPXE names a fetched image by the last part of its URL). Booted
 * from BIOS, the kernel ignores it.
 */
export function ramdiskScript(options: { kernelUrl: string; initrdUrl: string; cmdline: string; label?: string }): string {
  const initrdName = new URL(options.initrdUrl).pathname.split('/').at(-1);
  return `#!ipxe
echo metalcast: booting the agent ramdisk${options.label ? ` for ${options.label}` : ''}
kernel ${options.kernelUrl} ${options.cmdline} initrd=${initrdName}
initrd ${options.initrdUrl}
boot
`;
}

/**
 * Boots the first BIOS disk. `sanboot` starts it at once; should it fail,
 * `exit` hands back to the firmware, which tries the next boot device
 * (after iPXE's 2 s "Ctrl-B" prompt).
 */
export function localDiskScript(label?: string): string {
  return `#!ipxe
echo metalcast: booting from the local disk${label ? ` (${label})` : ''}
sanboot --no-describe --drive 0x80 || exit
`;
}
