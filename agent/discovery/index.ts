import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { Inventory } from '../../gen/metalcast/v1/inventory.js';
import { discoverCpu, unameArch } from './cpu.js';
import { discoverDisks } from './disks.js';
import { discoverMemory } from './memory.js';
import { discoverInterfaces } from './network.js';
import { discoverSystem } from './system.js';

export { unameArch } from './cpu.js';

/** Options of {@link discoverInventory}. */
export interface DiscoveryOptions {
  /**
   * Machine architecture to report, in `uname -m` form. Default: the
   * architecture of this Node process ("x64" reported as "x86_64", "arm64"
   * as "aarch64"), which a fake root cannot change.
   */
  arch?: string;
}

/**
 * Reads the machine's inventory from sysfs, procfs and DMI under root: '/'
 * on a real machine, or a folder laid out the same way (a fake machine in
 * tests and demos, or the host's filesystem mounted into a container).
 * Disk device paths are <root>/dev/<name>, so a fake machine's disks are
 * files inside its folder.
 *
 * A missing or unreadable attribute gives its default ('' , 0, false) rather
 * than an error; only a root without a sys/ folder is refused, since that is
 * a wrong path rather than an unusual machine.
 */
export async function discoverInventory(root: string, options: DiscoveryOptions = {}): Promise<Inventory> {
  const isDirectory = await stat(join(root, 'sys')).then(
    (s) => s.isDirectory(),
    () => false,
  );
  if (!isDirectory) throw new Error(`sysfs/procfs root '${root}' does not exist or has no sys/ folder`);

  const [interfaces, disks, cpu, memory, system] = await Promise.all([
    discoverInterfaces(root),
    discoverDisks(root),
    discoverCpu(root, options.arch ?? unameArch(process.arch)),
    discoverMemory(root),
    discoverSystem(root),
  ]);
  return { interfaces, disks, cpu, memory, system };
}
