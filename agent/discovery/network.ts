import { join } from 'node:path';
import { normaliseMac } from '../../common/mac.js';
import type { NetworkInterface } from '../../gen/metalcast/v1/inventory.js';
import { exists, isVirtualDevice, linkTargetName, listEntries, readAttribute, readInteger, resolve } from './sysfs.js';

/** ARPHRD_ETHER from <linux/if_arp.h>; Wi-Fi reports it too, InfiniBand (32) and CAN (280) do not. */
const ARPHRD_ETHER = 1;

/** The kernel's SPEED_UNKNOWN, printed as "-1" by current kernels and as 4294967295 by some older ones. */
const SPEED_UNKNOWN_UNSIGNED = 0xffff_ffff;

/**
 * Physical Ethernet interfaces under <root>/sys/class/net, sorted by name.
 * An interface counts as physical when its sysfs folder is not under
 * devices/virtual and it has a `device` link to the hardware behind it;
 * lo, bridges, bonds, veth, tun and VLANs have neither.
 */
export async function discoverInterfaces(root: string): Promise<NetworkInterface[]> {
  const sys = await resolve(join(root, 'sys'));
  if (sys === undefined) return [];
  const classNet = join(sys, 'class', 'net');
  const found = await Promise.all((await listEntries(classNet)).map((name) => readInterface(sys, join(classNet, name), name)));
  return found.filter((nic) => nic !== undefined);
}

async function readInterface(sys: string, dir: string, name: string): Promise<NetworkInterface | undefined> {
  if (name === 'lo') return undefined;
  const device = await resolve(dir);
  if (device === undefined || isVirtualDevice(sys, device)) return undefined;
  if (!(await exists(join(dir, 'device')))) return undefined;
  // A missing `type` never happens on a real kernel; only a readable,
  // non-Ethernet type excludes the interface, and the MAC check below still
  // rejects anything whose address is not six bytes.
  const type = await readInteger(join(dir, 'type'));
  if (type !== undefined && type !== ARPHRD_ETHER) return undefined;

  // Bonding rewrites a slave's `address` to the bond's MAC; the burned-in
  // one, which is what PXE and the controller know, survives only here.
  const rawMac = (await readAttribute(join(dir, 'bonding_slave', 'perm_hwaddr'))) ?? (await readAttribute(join(dir, 'address')));
  const macAddress = parseMac(rawMac);
  if (macAddress === undefined) return undefined;

  const [speed, carrier, driver] = await Promise.all([
    readInteger(join(dir, 'speed')),
    readAttribute(join(dir, 'carrier')),
    linkTargetName(join(dir, 'device', 'driver')),
  ]);
  return {
    name,
    macAddress,
    speedMbps: speed !== undefined && speed > 0 && speed < SPEED_UNKNOWN_UNSIGNED ? speed : 0,
    hasCarrier: carrier === '1',
    driver: driver ?? '',
  };
}

/**
 * Lower-case colon form, or undefined for an address that cannot identify a
 * machine: malformed, or all zeros (a NIC whose driver has not set one yet;
 * every such machine would share it).
 */
function parseMac(raw: string | undefined): string | undefined {
  if (raw === undefined) return undefined;
  try {
    const mac = normaliseMac(raw);
    return mac === '00:00:00:00:00:00' ? undefined : mac;
  } catch {
    return undefined;
  }
}
