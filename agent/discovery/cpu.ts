import { join } from 'node:path';
import type { Cpu } from '../../gen/metalcast/v1/inventory.js';
import { readAttribute } from './sysfs.js';

/** Node's process.arch names mapped to the `uname -m` names operators know. */
const UNAME_ARCH: Readonly<Record<string, string>> = {
  x64: 'x86_64',
  ia32: 'i686',
  arm64: 'aarch64',
  arm: 'armv7l',
  ppc64: 'ppc64le',
  loong64: 'loongarch64',
};

/**
 * cpuinfo keys that carry the model, by architecture: x86 uses "model name";
 * 32-bit ARM "Processor", MIPS "cpu model", POWER "cpu". arm64 kernels print
 * none of them, and the model stays empty.
 */
const MODEL_KEYS = ['model name', 'Processor', 'cpu model', 'cpu'];

/** The `uname -m` name for a Node architecture name; unknown names pass through. */
export function unameArch(nodeArch: string): string {
  return UNAME_ARCH[nodeArch] ?? nodeArch;
}

/**
 * Counts the "processor" entries of <root>/proc/cpuinfo, which lists online
 * CPUs only; where cpuinfo has none in that form (s390x prints
 * "processor 0: …"), counts <root>/sys/devices/system/cpu/online instead.
 */
export async function discoverCpu(root: string, architecture: string): Promise<Cpu> {
  const fields = parseCpuinfo((await readAttribute(join(root, 'proc', 'cpuinfo'))) ?? '');
  let count = fields.filter(([key]) => key === 'processor').length;
  if (count === 0) count = parseCpuList((await readAttribute(join(root, 'sys', 'devices', 'system', 'cpu', 'online'))) ?? '');
  let modelName = '';
  for (const wanted of MODEL_KEYS) {
    const field = fields.find(([key, value]) => key === wanted && value !== '');
    if (field) {
      modelName = field[1];
      break;
    }
  }
  return { count, modelName, architecture };
}

/** "key\t: value" lines as [key, value] pairs, in order. */
function parseCpuinfo(text: string): Array<[string, string]> {
  const fields: Array<[string, string]> = [];
  for (const line of text.split('\n')) {
    const colon = line.indexOf(':');
    if (colon > 0) fields.push([line.slice(0, colon).trim(), line.slice(colon + 1).trim()]);
  }
  return fields;
}

/** Counts a kernel CPU list such as "0-3,5,8-9" (7 CPUs); 0 when it is malformed. */
export function parseCpuList(text: string): number {
  let count = 0;
  for (const part of text.trim().split(',')) {
    const match = /^(\d+)(?:-(\d+))?$/.exec(part);
    if (!match) return 0;
    const first = Number(match[1]);
    const last = match[2] === undefined ? first : Number(match[2]);
    if (last < first) return 0;
    count += last - first + 1;
  }
  return count;
}
