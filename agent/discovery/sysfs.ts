import { readdir, readFile, readlink, realpath, stat } from 'node:fs/promises';
import { basename, relative, sep } from 'node:path';

// Every reader here turns a failure into "unknown" (undefined or []), because
// the kernel refuses reads in ordinary situations: `carrier` and `speed` of a
// link that is down give EINVAL, DMI serials give EACCES to non-root, and
// attributes come and go with drivers. Discovery reports what it could read.

/** Reads a text attribute, trimmed; undefined when missing, unreadable or empty. */
export async function readAttribute(path: string): Promise<string | undefined> {
  try {
    const value = (await readFile(path, 'utf8')).trim();
    return value === '' ? undefined : value;
  } catch {
    return undefined;
  }
}

/** Reads a decimal integer attribute (sign allowed, "-1" is common); undefined otherwise. */
export async function readInteger(path: string): Promise<number | undefined> {
  const value = await readAttribute(path);
  if (value === undefined || !/^-?\d+$/.test(value)) return undefined;
  const number = Number(value);
  return Number.isSafeInteger(number) ? number : undefined;
}

/** Reads a binary attribute such as a SCSI VPD page; undefined when missing or unreadable. */
export async function readBytes(path: string): Promise<Buffer | undefined> {
  try {
    return await readFile(path);
  } catch {
    return undefined;
  }
}

/** Entry names of a folder, sorted so output does not depend on readdir order; [] when missing. */
export async function listEntries(path: string): Promise<string[]> {
  try {
    return (await readdir(path)).sort();
  } catch {
    return [];
  }
}

/** Basename of a symlink's target, for example "e1000e" for a driver link; undefined when not a link. */
export async function linkTargetName(path: string): Promise<string | undefined> {
  try {
    return basename(await readlink(path));
  } catch {
    return undefined;
  }
}

/** Path with every symlink resolved; undefined when it (or the link's target) is missing. */
export async function resolve(path: string): Promise<string | undefined> {
  try {
    return await realpath(path);
  } catch {
    return undefined;
  }
}

/** True when something (following symlinks) exists at path. */
export async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * True when a resolved device path lies under <sys>/devices/virtual, where the
 * kernel puts devices with no hardware behind them (lo, bridges, veth, loop,
 * dm, md, zram). Judged relative to the resolved sys folder so that a fake
 * root whose own path happens to contain "/virtual/" is not misread.
 */
export function isVirtualDevice(resolvedSys: string, resolvedDevice: string): boolean {
  const inside = relative(resolvedSys, resolvedDevice).split(sep);
  return inside[0] === 'devices' && inside[1] === 'virtual';
}
