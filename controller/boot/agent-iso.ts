import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { copyFile, mkdir, mkdtemp, readdir, rename, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';

/*
 * The agent ISO for virtual-media boot: the agent ramdisk (npm run
 * build:ramdisk: Debian's kernel and our initramfs) on a CD image that
 * boots in BIOS and UEFI firmware alike, with the kernel command line of
 * agentCmdline() in its GRUB menu.
 *
 * Built by Debian's grub-mkrescue (package grub-common), which lays out the
 * El Torito catalog with xorriso: a BIOS boot image from grub-pc-bin
 * (i386-pc/eltorito.img) and an EFI system partition image from
 * grub-efi-amd64-bin (efi.img, made with mtools), on a hybrid ISO that also
 * boots as a disk. GRUB talks on the serial console and the screen, and
 * boots at once (timeout 0).
 *
 * ISOs are cached in a folder, named by the sha256 of what goes in (the
 * kernel's and the initramfs's bytes, the command line and this builder's
 * version): nodes whose command lines are the same share one ISO, a new
 * ramdisk or controller address makes a new one, and nothing is built
 * twice. The newest few are kept.
 */

/** Bumped when the ISO's layout changes, so that cached ISOs are rebuilt. */
const BUILDER_VERSION = 'agent-iso-2';
const BUILD_TIMEOUT_MS = 300_000;
/** ISOs kept in the cache folder; older ones are removed after a build. */
const KEEP_ISOS = 8;
/** What to install when a tool is missing. */
export const AGENT_ISO_APT_PACKAGES = 'grub-common grub-pc-bin grub-efi-amd64-bin xorriso mtools';

export interface AgentIsoInputs {
  kernelPath: string;
  initrdPath: string;
  /** The kernel command line, as agentCmdline() makes it. */
  cmdline: string;
}

export interface AgentIso {
  /** sha256 of the inputs (hex): the ISO's name in the cache and in its URL. */
  key: string;
  path: string;
  sizeBytes: number;
}

/** The sha256 of a file's bytes, remembered by path, size and modification time. */
const fileDigests = new Map<string, { size: number; mtimeMs: number; digest: string }>();

async function fileDigest(path: string): Promise<string> {
  let info: Awaited<ReturnType<typeof stat>>;
  try {
    info = await stat(path);
  } catch (error) {
    throw new Error(
      `${path} is missing (${(error as NodeJS.ErrnoException).code}): build the agent ramdisk with npm run build:ramdisk, or point --boot-dir at it`,
    );
  }
  const known = fileDigests.get(path);
  if (known && known.size === info.size && known.mtimeMs === info.mtimeMs) return known.digest;
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  const digest = hash.digest('hex');
  fileDigests.set(path, { size: info.size, mtimeMs: info.mtimeMs, digest });
  return digest;
}

/**
 * Splits a kernel command line into parameters as the kernel does
 * (lib/cmdline.c next_arg): whitespace separates, except inside double
 * quotes; the quotes around a whole parameter or around its value are not
 * part of it (`key="two words"` is key, then `two words`).
 */
export function kernelParameters(cmdline: string): string[] {
  const params: string[] = [];
  for (const raw of cmdline.match(/(?:[^\s"]+|"[^"]*"?)+/g) ?? []) {
    let param = raw.startsWith('"') ? raw.slice(1, raw.endsWith('"') && raw.length > 1 ? -1 : undefined) : raw;
    const equals = param.indexOf('=');
    const value = equals < 0 ? '' : param.slice(equals + 1);
    if (value.startsWith('"'))
      param = `${param.slice(0, equals + 1)}${value.slice(1, value.endsWith('"') && value.length > 1 ? -1 : undefined)}`;
    params.push(param);
  }
  return params;
}

/**
 * The kernel command line as GRUB `linux` arguments. GRUB hands each
 * argument to the kernel, but puts a backslash before every ", ' and \ in it
 * and double quotes around one that holds a space
 * (grub_create_loader_cmdline), and the kernel knows no backslash escapes.
 * So each kernel parameter goes to GRUB without its quotes, as one
 * single-quoted word (GRUB expands nothing in it): `key="two words"` becomes
 * 'key=two words', which GRUB hands on as "key=two words", the same
 * parameter to the kernel (and to the agent, which splits as the kernel
 * does). A parameter that still holds ", ' or \ cannot reach the kernel
 * through GRUB unchanged: an Error names it.
 */
export function grubArguments(cmdline: string): string {
  return kernelParameters(cmdline)
    .map((param) => {
      const bad = /["'\\]/.exec(param)?.[0];
      if (bad)
        throw new Error(
          `the kernel parameter ${param} cannot go on the agent ISO: GRUB would hand the kernel a backslash before its ${bad} (take quotes other than "…" around a value, and backslashes, out of boot.kernel_args)`,
        );
      return `'${param}'`;
    })
    .join(' ');
}

/** GRUB's menu: serial and screen, no wait, one entry. */
export function grubConfig(cmdline: string): string {
  return `# metalcast agent ISO (${BUILDER_VERSION})
set timeout=0
set default=0
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
menuentry 'metalcast agent ramdisk' {
  linux /boot/vmlinuz ${grubArguments(cmdline)}
  initrd /boot/initramfs.cpio.gz
}
`;
}

/**
 * Makes (or finds) agent ISOs in one cache folder. Concurrent requests for
 * the same ISO share one build.
 */
export class AgentIsoBuilder {
  private readonly building = new Map<string, Promise<AgentIso>>();

  constructor(private readonly cacheDir: string) {}

  /** The key an ISO of these inputs has (reads the files' digests; builds nothing). */
  async keyOf(inputs: AgentIsoInputs): Promise<string> {
    const [kernel, initrd] = await Promise.all([fileDigest(inputs.kernelPath), fileDigest(inputs.initrdPath)]);
    return createHash('sha256')
      .update(JSON.stringify([BUILDER_VERSION, kernel, initrd, inputs.cmdline]))
      .digest('hex');
  }

  /** Where the ISO of `key` is, once built. */
  pathOf(key: string): string {
    return join(this.cacheDir, `${key}.iso`);
  }

  async build(inputs: AgentIsoInputs): Promise<AgentIso> {
    const key = await this.keyOf(inputs);
    const path = this.pathOf(key);
    const cached = await stat(path).catch(() => undefined);
    if (cached) return { key, path, sizeBytes: cached.size };
    let pending = this.building.get(key);
    if (!pending) {
      pending = this.make(key, inputs).finally(() => this.building.delete(key));
      this.building.set(key, pending);
    }
    return pending;
  }

  private async make(key: string, inputs: AgentIsoInputs): Promise<AgentIso> {
    await mkdir(this.cacheDir, { recursive: true });
    const stage = await mkdtemp(join(this.cacheDir, '.stage-'));
    const out = join(stage, 'agent.iso');
    try {
      await mkdir(join(stage, 'tree', 'boot', 'grub'), { recursive: true });
      await copyFile(inputs.kernelPath, join(stage, 'tree', 'boot', 'vmlinuz'));
      await copyFile(inputs.initrdPath, join(stage, 'tree', 'boot', 'initramfs.cpio.gz'));
      await writeFile(join(stage, 'tree', 'boot', 'grub', 'grub.cfg'), grubConfig(inputs.cmdline));
      try {
        await promisify(execFile)('grub-mkrescue', ['--output', out, '--locales=', '--fonts=', '--themes=', join(stage, 'tree')], {
          timeout: BUILD_TIMEOUT_MS,
          maxBuffer: 4 * 1024 * 1024,
        });
      } catch (error) {
        const failure = error as NodeJS.ErrnoException & { stderr?: string };
        const why =
          failure.code === 'ENOENT'
            ? `grub-mkrescue is not installed (apt-get install -y ${AGENT_ISO_APT_PACKAGES})`
            : `grub-mkrescue failed: ${(failure.stderr ?? failure.message).trim().split('\n').slice(-3).join(' / ')} (it needs ${AGENT_ISO_APT_PACKAGES})`;
        throw new Error(`cannot build the agent ISO: ${why}`);
      }
      const path = this.pathOf(key);
      await rename(out, path);
      const info = await stat(path);
      await this.prune(path);
      return { key, path, sizeBytes: info.size };
    } finally {
      await rm(stage, { recursive: true, force: true });
    }
  }

  /** Keeps the newest KEEP_ISOS ISOs (and always `keep`). */
  private async prune(keep: string): Promise<void> {
    const names = (await readdir(this.cacheDir)).filter((name) => /^[0-9a-f]{64}\.iso$/.test(name));
    if (names.length <= KEEP_ISOS) return;
    const dated = await Promise.all(
      names.map(async (name) => ({ path: join(this.cacheDir, name), mtimeMs: (await stat(join(this.cacheDir, name))).mtimeMs })),
    );
    dated.sort((a, b) => b.mtimeMs - a.mtimeMs);
    for (const old of dated.slice(KEEP_ISOS)) if (old.path !== keep) await unlink(old.path).catch(() => {});
  }
}
