import { join } from 'node:path';
import type { Memory } from '../../gen/metalcast/v1/inventory.js';
import { readAttribute } from './sysfs.js';

/** MemTotal from <root>/proc/meminfo, which the kernel prints in KiB despite the "kB" unit; 0 when unreadable. */
export async function discoverMemory(root: string): Promise<Memory> {
  const meminfo = (await readAttribute(join(root, 'proc', 'meminfo'))) ?? '';
  const match = /^MemTotal:\s+(\d+)\s*kB$/m.exec(meminfo);
  return { totalBytes: match ? Number(match[1]) * 1024 : 0 };
}
