/**
 * What the ramdisk and test-image builds take from this host (Debian's
 * kernel, busybox-static) and the small helpers both use to run tools.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const COMMAND_TIMEOUT_MS = 120_000;

/** The Debian packages the builds need, for messages and for CI. */
export const RAMDISK_APT_PACKAGES = 'linux-image-amd64 busybox-static';

/** The newest kernel release that has both its image in /boot and its modules.dep. */
export function newestKernel(): string {
  const releases = existsSync('/boot')
    ? readdirSync('/boot')
        .filter((name) => name.startsWith('vmlinuz-'))
        .map((name) => name.slice('vmlinuz-'.length))
        .filter((release) => existsSync(join('/lib/modules', release, 'modules.dep')))
    : [];
  if (releases.length === 0) {
    throw new Error("no kernel with modules in /boot and /lib/modules: install Debian's with: apt-get install -y linux-image-amd64");
  }
  return releases.sort((a, b) => a.localeCompare(b, 'en', { numeric: true })).at(-1) as string;
}

/** The kernel image of a release, read (Debian installs it readable by root only). */
export function readKernel(release: string): Buffer {
  const path = join('/boot', `vmlinuz-${release}`);
  try {
    return readFileSync(path);
  } catch (error) {
    throw new Error(`cannot read the kernel ${path}: ${(error as Error).message} (Debian installs it readable by root only)`);
  }
}

/** busybox-static's binary and the applets it links to, as paths relative to / ("bin/sh", "usr/bin/env"). */
export function staticBusybox(): { data: Buffer; applets: string[] } {
  const source = ['/bin/busybox', '/usr/bin/busybox'].find((path) => existsSync(path));
  if (!source) throw new Error('busybox is not installed: apt-get install -y busybox-static');
  const data = readFileSync(source);
  if (elfInterpreter(data) !== undefined) {
    throw new Error(`${source} is linked dynamically (Debian's busybox package); this build needs: apt-get install -y busybox-static`);
  }
  return { data, applets: run(source, ['--list-full']).split('\n').filter(Boolean) };
}

/** PT_INTERP of a 64-bit little-endian ELF file: the dynamic loader it asks for, or undefined for a static program. */
export function elfInterpreter(data: Buffer): string | undefined {
  if (data.length < 64 || data.readUInt32BE(0) !== 0x7f454c46) throw new Error('not an ELF file');
  if (data[4] !== 2 || data[5] !== 1) throw new Error('not a 64-bit little-endian ELF file');
  const phoff = Number(data.readBigUInt64LE(0x20));
  const phentsize = data.readUInt16LE(0x36);
  const phnum = data.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) {
    const at = phoff + i * phentsize;
    if (data.readUInt32LE(at) !== 3 /* PT_INTERP */) continue;
    const offset = Number(data.readBigUInt64LE(at + 8));
    const size = Number(data.readBigUInt64LE(at + 32));
    return data
      .subarray(offset, offset + size)
      .toString('latin1')
      .replace(/\0+$/, '');
  }
  return undefined;
}

/** A tool's path: on the PATH, or in the sbin folders a non-root PATH leaves out (mkfs.fat). */
export function findTool(tool: string): string | undefined {
  const dirs = [...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/sbin'].filter((dir) => dir !== '');
  return dirs.map((dir) => join(dir, tool)).find((path) => existsSync(path));
}

export interface RunOptions {
  /** What to install when the command is missing: "apt-get install -y mtools". */
  hint?: string;
  /** Default 120 s. */
  timeoutMs?: number;
  /** Variables added to this process's environment. */
  env?: Record<string, string>;
}

/** Runs a command to completion; throws with its stderr (or the install hint when it is missing). */
export function run(command: string, args: string[], options: RunOptions & { binary: true }): Buffer;
export function run(command: string, args: string[], options?: RunOptions & { binary?: false }): string;
export function run(command: string, args: string[], options: RunOptions & { binary?: boolean } = {}): Buffer | string {
  try {
    const out = execFileSync(command, args, {
      timeout: options.timeoutMs ?? COMMAND_TIMEOUT_MS,
      maxBuffer: 512 * 1024 * 1024,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: options.env ? { ...process.env, ...options.env } : process.env,
    });
    return options.binary ? out : out.toString('utf8');
  } catch (error) {
    const failure = error as NodeJS.ErrnoException & { stderr?: Buffer };
    const why = failure.code === 'ENOENT' ? `${command} is not installed${options.hint ? ` (${options.hint})` : ''}` : failure.message;
    throw new Error(`${command} ${args.join(' ')}: ${failure.stderr?.toString().trim() || why}`);
  }
}

/** Readers (a controller serving the file, a test) never see a half-written one. */
export function writeAtomically(path: string, data: Buffer | Uint8Array): void {
  const work = `${path}.tmp-${process.pid}`;
  writeFileSync(work, data);
  renameSync(work, path);
}
