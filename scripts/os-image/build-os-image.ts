/**
 * npm run build:os-image: a small Debian 12 whole-disk image, from Debian's
 * packages, that a deployed machine boots with its own bootloader under UEFI
 * and that cloud-init configures from a config drive.
 *
 *   ~/.cache/metalcast/os-image/<inputs hash>/debian-12-metalcast.qcow2   compressed qcow2
 *   ~/.cache/metalcast/os-image/<inputs hash>/manifest.json              sizes, sha256, kernel, timings
 *   ~/.cache/metalcast/os-image/<inputs hash>/build.log                  mmdebstrap's output
 *
 * The disk (GPT): partition 1 an EFI system partition (FAT32, 64 MiB) holding
 * EFI/BOOT/BOOTX64.EFI, a GRUB built with grub-mkstandalone whose embedded
 * grub.cfg finds the root file system by UUID and boots /vmlinuz with
 * /initrd.img (the links Debian's kernel package keeps current); partition 2
 * the ext4 root (type "Linux x86-64 root"), sized to its contents plus room.
 *
 * No loop devices and no mounts of the image: mmdebstrap builds the root in a
 * directory (with the host's Debian sources, stdin from /dev/null), `mkfs.ext4
 * -d` turns the directory into a file system in a file, mkfs.fat and mcopy
 * (mtools) make the ESP, sgdisk writes the partition table into the disk file,
 * dd places the two file systems, and qemu-img converts the result to qcow2.
 *
 * Made small and quick: no recommends, no documentation, man pages or
 * translations (dpkg path-exclude), Debian's cloud kernel by default
 * (linux-image-cloud-amd64: virtio, NVMe, the common cloud NICs; --kernel
 * linux-image-amd64 for physical machines), and mkinitramfs run once at the
 * end instead of once per trigger (update-initramfs is diverted while
 * packages install).
 *
 * What the image does at boot: cloud-init with datasource_list [ConfigDrive,
 * None] and systemd-networkd as its network renderer. Given a config-2
 * partition or disk it sets the hostname, installs the SSH keys for the user
 * `debian` (sudo without password, as Debian's cloud images), writes the
 * network configuration from network_data.json and runs the user data. SSH
 * host keys are not in the image: cloud-init generates them at first boot, so
 * no two machines share one.
 *
 * Cached by a hash of its inputs (this script, the package list, the host's
 * Debian sources, the host's GRUB): a second run with the same inputs returns
 * at once. Runs under `nice`.
 *
 * Flags: --cache-dir DIR (default ~/.cache/metalcast/os-image), --kernel PKG,
 * --force (rebuild even when cached), --print-path (print only the image's
 * path; build it first when needed).
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  closeSync,
  createReadStream,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { formatBytes } from '../package-agent.js';
import { findTool, run } from '../ramdisk/host-tools.js';

export const OS_IMAGE_NAME = 'debian-12-metalcast.qcow2';
/** The user cloud-init gives the SSH keys to (Debian's cloud images call it the same). */
export const OS_IMAGE_USER = 'debian';
/** The Debian packages this build needs on the host. */
export const OS_IMAGE_APT_PACKAGES = 'mmdebstrap e2fsprogs dosfstools mtools gdisk grub-efi-amd64-bin qemu-utils';

/** What goes into the image besides Debian's minbase variant (Essential and Priority: required). */
export const OS_IMAGE_PACKAGES = [
  'systemd-sysv',
  'udev',
  'dbus',
  'cloud-init',
  'openssh-server',
  'sudo',
  'iproute2',
  'initramfs-tools',
  'zstd',
] as const;
export const DEFAULT_KERNEL_PACKAGE = 'linux-image-cloud-amd64';
const SUITE = 'bookworm';
const DEBIAN_SOURCES = ['/etc/apt/sources.list.d/debian.sources', '/etc/apt/sources.list'];

const MIB = 1024 * 1024;
const SECTOR = 512;
const ESP_MIB = 64;
/** The ESP starts at 1 MiB; the root follows it; 1 MiB at the end leaves room for the backup GPT. */
const ESP_START_SECTOR = 2048;
const MMDEBSTRAP_TIMEOUT_MS = 45 * 60_000;

/** Files that would make two machines deployed from this image the same machine, or that only take room. */
const DPKG_EXCLUDES = [
  'path-exclude=/usr/share/man/*',
  'path-exclude=/usr/share/info/*',
  'path-exclude=/usr/share/doc/*',
  'path-include=/usr/share/doc/*/copyright',
  'path-exclude=/usr/share/locale/*',
  'path-include=/usr/share/locale/locale.alias',
  'path-exclude=/usr/share/lintian/*',
];

/** cloud-init: look for a config drive only (no network metadata services to time out on), render networkd. */
const CLOUD_INIT_CFG = `# Written by metalcast's build:os-image.
# The machine's configuration comes from a config drive (label config-2) that
# metalcast's agent writes into a partition at the end of the disk.
datasource_list: [ConfigDrive, None]
system_info:
  network:
    renderers: [networkd]
`;

/** Shell run by mmdebstrap after the essential packages: keep update-initramfs from running once per trigger. */
const DIVERT_INITRAMFS = [
  'chroot "$1" dpkg-divert --quiet --local --rename --divert /usr/sbin/update-initramfs.metalcast --add /usr/sbin/update-initramfs',
  `printf '#!/bin/sh\\necho "update-initramfs: deferred by build:os-image"\\n' > "$1/usr/sbin/update-initramfs"`,
  'chmod 755 "$1/usr/sbin/update-initramfs"',
].join(' && ');

/** Shell run by mmdebstrap at the end, with /proc, /sys and /dev in place: one initramfs, networkd on, no host keys. */
const CUSTOMIZE = [
  'rm -f "$1/usr/sbin/update-initramfs"',
  'chroot "$1" dpkg-divert --quiet --local --rename --divert /usr/sbin/update-initramfs.metalcast --remove /usr/sbin/update-initramfs',
  'chroot "$1" update-initramfs -c -k all',
  'chroot "$1" systemctl enable systemd-networkd.service',
  'rm -f "$1"/etc/ssh/ssh_host_*',
].join(' && ');

export interface BuildOsImageOptions {
  /** Default ~/.cache/metalcast/os-image. */
  cacheDir?: string;
  /** Default linux-image-cloud-amd64. */
  kernelPackage?: string;
  /** Rebuild even when the cache holds an image built from the same inputs. */
  force?: boolean;
  /** Where mmdebstrap's progress goes besides build.log (default nowhere). */
  onLine?: (line: string) => void;
}

export interface OsImageManifest {
  file: string;
  /** Bytes of the qcow2 file. */
  bytes: number;
  sha256: string;
  virtualBytes: number;
  rootFsUuid: string;
  kernelPackage: string;
  kernelRelease: string;
  packages: string[];
  /** Bytes of the root file tree before mkfs. */
  rootTreeBytes: number;
  seconds: { mmdebstrap: number; filesystems: number; qcow2: number; total: number };
  builtAt: string;
  inputs: string;
}

export interface OsImage {
  path: string;
  manifest: OsImageManifest;
  reused: boolean;
}

export function defaultOsImageCacheDir(): string {
  return join(homedir(), '.cache', 'metalcast', 'os-image');
}

/** The hash that keys the cache: everything that changes what the build produces. */
export function osImageInputs(kernelPackage = DEFAULT_KERNEL_PACKAGE): string {
  const hash = createHash('sha256');
  hash.update(readFileSync(fileURLToPath(import.meta.url)));
  hash.update(JSON.stringify({ packages: OS_IMAGE_PACKAGES, kernelPackage, suite: SUITE }));
  const sources = hostSources();
  hash.update(sources ? readFileSync(sources) : 'no sources');
  hash.update(hostPackageVersion('grub-efi-amd64-bin'));
  return hash.digest('hex');
}

/** The cached image for these inputs, or undefined when it has not been built. */
export function cachedOsImage(options: Pick<BuildOsImageOptions, 'cacheDir' | 'kernelPackage'> = {}): OsImage | undefined {
  const dir = join(options.cacheDir ?? defaultOsImageCacheDir(), osImageInputs(options.kernelPackage).slice(0, 16));
  const manifestPath = join(dir, 'manifest.json');
  const path = join(dir, OS_IMAGE_NAME);
  if (!existsSync(manifestPath) || !existsSync(path)) return undefined;
  const manifest = JSON.parse(readFileSync(manifestPath, 'utf8')) as OsImageManifest;
  if (statSync(path).size !== manifest.bytes) return undefined;
  return { path, manifest, reused: true };
}

export async function buildOsImage(options: BuildOsImageOptions = {}): Promise<OsImage> {
  const kernelPackage = options.kernelPackage ?? DEFAULT_KERNEL_PACKAGE;
  if (!options.force) {
    const cached = cachedOsImage(options);
    if (cached) return cached;
  }
  checkHostTools();
  const inputs = osImageInputs(kernelPackage);
  const cacheRoot = options.cacheDir ?? defaultOsImageCacheDir();
  const finalDir = join(cacheRoot, inputs.slice(0, 16));
  // Built beside the cache entry and renamed into place, so a reader never sees half an image.
  const work = join(cacheRoot, `.build-${inputs.slice(0, 16)}-${process.pid}`);
  rmSync(work, { recursive: true, force: true });
  mkdirSync(work, { recursive: true });
  const started = performance.now();
  try {
    const rootDir = join(work, 'root');
    const logPath = join(work, 'build.log');
    await mmdebstrap(rootDir, kernelPackage, logPath, options.onLine);
    const debootstrapped = performance.now();

    const uuids = stableUuids(inputs);
    const kernelRelease = configureRoot(rootDir, uuids.rootFs, uuids.espSerial);
    const rootTreeBytes = Number(run('du', ['-sb', '--apparent-size', rootDir]).split(/\s/)[0]);
    const rawPath = join(work, 'disk.raw');
    const virtualBytes = makeDisk(work, rootDir, rawPath, uuids, rootTreeBytes);
    const filesystems = performance.now();

    const qcow2Work = join(work, OS_IMAGE_NAME);
    await runNice('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zlib', rawPath, qcow2Work], {
      timeoutMs: 20 * 60_000,
    });
    rmSync(rawPath, { force: true });
    rmSync(rootDir, { recursive: true, force: true });
    const done = performance.now();

    const manifest: OsImageManifest = {
      file: OS_IMAGE_NAME,
      bytes: statSync(qcow2Work).size,
      sha256: await sha256File(qcow2Work),
      virtualBytes,
      rootFsUuid: uuids.rootFs,
      kernelPackage,
      kernelRelease,
      packages: [...OS_IMAGE_PACKAGES, kernelPackage],
      rootTreeBytes,
      seconds: {
        mmdebstrap: seconds(debootstrapped - started),
        filesystems: seconds(filesystems - debootstrapped),
        qcow2: seconds(done - filesystems),
        total: seconds(done - started),
      },
      builtAt: new Date().toISOString(),
      inputs,
    };
    writeFileSync(join(work, 'manifest.json'), `${JSON.stringify(manifest, null, 2)}\n`);
    rmSync(finalDir, { recursive: true, force: true });
    renameSync(work, finalDir);
    return { path: join(finalDir, OS_IMAGE_NAME), manifest, reused: false };
  } catch (error) {
    // Keep the log of a failed build beside the cache for a look; drop the rest.
    const log = join(work, 'build.log');
    if (existsSync(log)) renameSync(log, join(cacheRoot, `failed-build-${inputs.slice(0, 16)}.log`));
    rmSync(work, { recursive: true, force: true });
    throw error;
  }
}

function seconds(ms: number): number {
  return Math.round(ms / 100) / 10;
}

function hostSources(): string | undefined {
  return DEBIAN_SOURCES.find((path) => existsSync(path) && readFileSync(path, 'utf8').includes('debian'));
}

function hostPackageVersion(name: string): string {
  try {
    // biome-ignore lint/suspicious/noTemplateCurlyInString: dpkg-query's own field syntax
    return run('dpkg-query', ['-W', '-f', '${Version}', name]);
  } catch {
    return 'not installed';
  }
}

function checkHostTools(): void {
  const missing = [
    'mmdebstrap',
    'mkfs.ext4',
    'e2fsck',
    'mkfs.fat',
    'mcopy',
    'mmd',
    'sgdisk',
    'grub-mkstandalone',
    'qemu-img',
    'dd',
    'du',
  ].filter((tool) => findTool(tool) === undefined);
  if (missing.length > 0) {
    throw new Error(`build:os-image needs ${missing.join(', ')}: apt-get install -y --no-install-recommends ${OS_IMAGE_APT_PACKAGES}`);
  }
  if (!existsSync('/usr/lib/grub/x86_64-efi')) {
    throw new Error('GRUB for x86_64-efi is missing: apt-get install -y --no-install-recommends grub-efi-amd64-bin');
  }
  if (!hostSources()) throw new Error(`no Debian sources in ${DEBIAN_SOURCES.join(' or ')}: mmdebstrap takes its mirror from there`);
  if (process.getuid?.() !== 0) {
    throw new Error('build:os-image runs mmdebstrap in root mode (files owned by root in the image): run it as root, as CI does');
  }
}

async function mmdebstrap(rootDir: string, kernelPackage: string, logPath: string, onLine?: (line: string) => void): Promise<void> {
  const sources = hostSources() as string;
  const args = [
    '--mode=root',
    '--variant=minbase',
    '--format=directory',
    `--include=${[...OS_IMAGE_PACKAGES, kernelPackage].join(',')}`,
    '--aptopt=APT::Install-Recommends "false"',
    '--aptopt=Acquire::Retries "3"',
    ...DPKG_EXCLUDES.map((rule) => `--dpkgopt=${rule}`),
    `--essential-hook=${DIVERT_INITRAMFS}`,
    `--customize-hook=${CUSTOMIZE}`,
    SUITE,
    rootDir,
    sources,
  ];
  await runNice('mmdebstrap', args, { timeoutMs: MMDEBSTRAP_TIMEOUT_MS, logPath, onLine });
}

/** Spawns a command under nice, stdin from /dev/null, its output to a log; rejects with the log's tail. */
function runNice(
  command: string,
  args: string[],
  options: { timeoutMs: number; logPath?: string; onLine?: (line: string) => void },
): Promise<void> {
  return new Promise((resolve, reject) => {
    const log = options.logPath ? openSync(options.logPath, 'a') : undefined;
    const child = spawn('nice', ['-n', '10', command, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive', LC_ALL: 'C.UTF-8' },
    });
    let tail = '';
    const take = (data: Buffer) => {
      if (log !== undefined) writeSync(log, data);
      tail = (tail + data.toString()).slice(-4000);
      if (options.onLine) for (const line of data.toString().split('\n')) if (line.trim()) options.onLine(line);
    };
    child.stdout.on('data', take);
    child.stderr.on('data', take);
    const timer = setTimeout(() => child.kill('SIGTERM'), options.timeoutMs);
    child.on('error', (error) => {
      clearTimeout(timer);
      if (log !== undefined) closeSync(log);
      reject(new Error(`${command}: ${error.message}`));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (log !== undefined) closeSync(log);
      if (code === 0) resolve();
      else reject(new Error(`${command} ${signal ? `was killed (${signal})` : `exited with ${code}`}:\n${tail}`));
    });
  });
}

/** UUIDs (v4 layout) derived from the inputs, so that the same inputs give the same disk. */
function stableUuids(inputs: string): { rootFs: string; disk: string; esp: string; root: string; espSerial: string } {
  const uuid = (label: string) => {
    const h = createHash('sha256').update(`${inputs}:${label}`).digest();
    h[6] = ((h[6] as number) & 0x0f) | 0x40;
    h[8] = ((h[8] as number) & 0x3f) | 0x80;
    const hex = h.subarray(0, 16).toString('hex');
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20, 32)}`;
  };
  const serial = createHash('sha256').update(`${inputs}:esp-serial`).digest('hex').slice(0, 8).toUpperCase();
  return { rootFs: uuid('rootfs'), disk: uuid('disk'), esp: uuid('esp'), root: uuid('root'), espSerial: serial };
}

/** The files that make the tree a machine: fstab, cloud-init's settings, no identity of its own. Returns the kernel release. */
function configureRoot(rootDir: string, rootFsUuid: string, espSerial: string): string {
  const releases = readdirSync(join(rootDir, 'boot'))
    .filter((name) => name.startsWith('vmlinuz-'))
    .map((name) => name.slice('vmlinuz-'.length));
  if (releases.length !== 1) throw new Error(`expected one kernel in the image's /boot, found: ${releases.join(', ') || 'none'}`);
  const release = releases[0] as string;
  if (!existsSync(join(rootDir, 'boot', `initrd.img-${release}`))) throw new Error(`the image has no initrd.img-${release}`);
  for (const [link, target] of [
    ['vmlinuz', `boot/vmlinuz-${release}`],
    ['initrd.img', `boot/initrd.img-${release}`],
  ] as const) {
    let current: string | undefined;
    try {
      current = readlinkSync(join(rootDir, link));
    } catch {
      current = undefined;
    }
    if (current !== target) {
      rmSync(join(rootDir, link), { force: true });
      run('ln', ['-s', target, join(rootDir, link)]);
    }
  }
  const espUuid = `${espSerial.slice(0, 4)}-${espSerial.slice(4)}`;
  writeFileSync(
    join(rootDir, 'etc', 'fstab'),
    `# <file system>  <mount point>  <type>  <options>  <dump>  <pass>\nUUID=${rootFsUuid}  /  ext4  errors=remount-ro  0  1\nUUID=${espUuid}  /boot/efi  vfat  umask=0077,nofail  0  2\n`,
  );
  mkdirSync(join(rootDir, 'boot', 'efi'), { recursive: true });
  writeFileSync(join(rootDir, 'etc', 'cloud', 'cloud.cfg.d', '90-metalcast.cfg'), CLOUD_INIT_CFG);
  // Each machine makes its own machine-id at first boot (an empty file means "not yet"), and gets its name from cloud-init.
  writeFileSync(join(rootDir, 'etc', 'machine-id'), '');
  rmSync(join(rootDir, 'var', 'lib', 'dbus', 'machine-id'), { force: true });
  writeFileSync(join(rootDir, 'etc', 'hostname'), 'localhost\n');
  for (const dir of ['var/lib/apt/lists', 'var/cache/apt', 'var/log/apt']) {
    const path = join(rootDir, dir);
    if (!existsSync(path)) continue;
    for (const entry of readdirSync(path)) {
      if (entry !== 'partial' && entry !== 'archives') rmSync(join(path, entry), { recursive: true, force: true });
    }
  }
  rmSync(join(rootDir, 'var', 'cache', 'apt', 'archives'), { recursive: true, force: true });
  mkdirSync(join(rootDir, 'var', 'cache', 'apt', 'archives', 'partial'), { recursive: true });
  return release;
}

/** GRUB's embedded configuration: serial and screen, no menu, the root by UUID, Debian's kernel links. */
function grubConfig(rootFsUuid: string): string {
  return `serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
search --no-floppy --fs-uuid --set=root ${rootFsUuid}
linux /vmlinuz root=UUID=${rootFsUuid} ro console=tty0 console=ttyS0,115200n8
initrd /initrd.img
boot
`;
}

/** The ESP, the root file system and the partition table, in one raw disk file. Returns its size in bytes. */
function makeDisk(work: string, rootDir: string, rawPath: string, uuids: ReturnType<typeof stableUuids>, rootTreeBytes: number): number {
  const env = { SOURCE_DATE_EPOCH: '1704067200' };
  // The root: its contents, a quarter more for metadata and growth, at least 384 MiB free, whole 64 MiB.
  const rootMiB = Math.ceil((rootTreeBytes * 1.25 + 384 * MIB) / (64 * MIB)) * 64;
  const rootFs = join(work, 'root.ext4');
  run(
    findTool('mkfs.ext4') as string,
    [
      '-q',
      '-F',
      '-t',
      'ext4',
      '-L',
      'root',
      '-U',
      uuids.rootFs,
      '-O',
      '^orphan_file,^metadata_csum_seed',
      '-E',
      `root_owner=0:0,hash_seed=${uuids.root}`,
      '-d',
      rootDir,
      rootFs,
      `${rootMiB}M`,
    ],
    { env, timeoutMs: 10 * 60_000 },
  );
  run(findTool('e2fsck') as string, ['-fn', rootFs], { timeoutMs: 5 * 60_000 });

  const efi = join(work, 'BOOTX64.EFI');
  const grubCfg = join(work, 'grub-embedded.cfg');
  writeFileSync(grubCfg, grubConfig(uuids.rootFs));
  run(
    'grub-mkstandalone',
    [
      '--format=x86_64-efi',
      `--output=${efi}`,
      '--modules=part_gpt part_msdos ext2 fat search search_fs_uuid linux normal configfile echo serial terminal gzio efi_gop all_video',
      '--locales=',
      '--fonts=',
      '--themes=',
      `boot/grub/grub.cfg=${grubCfg}`,
    ],
    { env },
  );
  const esp = join(work, 'esp.fat');
  run(findTool('mkfs.fat') as string, ['-C', '-F', '32', '-s', '1', '-n', 'EFI', '-i', uuids.espSerial, esp, String(ESP_MIB * 1024)], {
    env,
  });
  run('mmd', ['-i', esp, '::/EFI', '::/EFI/BOOT'], { env });
  run('mcopy', ['-i', esp, efi, '::/EFI/BOOT/BOOTX64.EFI'], { env });
  rmSync(efi);
  rmSync(grubCfg);

  const rootStart = ESP_START_SECTOR + (ESP_MIB * MIB) / SECTOR;
  const rootSectors = (rootMiB * MIB) / SECTOR;
  const totalBytes = (rootStart + rootSectors) * SECTOR + MIB;
  const fd = openSync(rawPath, 'w');
  closeSync(fd);
  run('truncate', ['-s', String(totalBytes), rawPath]);
  run(findTool('sgdisk') as string, [
    '--clear',
    `--disk-guid=${uuids.disk}`,
    `--new=1:${ESP_START_SECTOR}:${rootStart - 1}`,
    '--typecode=1:ef00',
    '--change-name=1:EFI System',
    `--partition-guid=1:${uuids.esp}`,
    `--new=2:${rootStart}:${rootStart + rootSectors - 1}`,
    '--typecode=2:8304',
    '--change-name=2:root',
    `--partition-guid=2:${uuids.root}`,
    rawPath,
  ]);
  for (const [file, sector] of [
    [esp, ESP_START_SECTOR],
    [rootFs, rootStart],
  ] as const) {
    run('dd', [`if=${file}`, `of=${rawPath}`, 'bs=1M', `seek=${(sector * SECTOR) / MIB}`, 'conv=notrunc,sparse', 'status=none'], {
      timeoutMs: 10 * 60_000,
    });
    rmSync(file, { force: true });
  }
  run(findTool('sgdisk') as string, ['--verify', rawPath]);
  return totalBytes;
}

function sha256File(path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    createReadStream(path)
      .on('data', (data) => hash.update(data))
      .on('error', reject)
      .on('end', () => resolve(hash.digest('hex')));
  });
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const { values } = parseArgs({
    options: {
      'cache-dir': { type: 'string' },
      kernel: { type: 'string' },
      force: { type: 'boolean' },
      'print-path': { type: 'boolean' },
      verbose: { type: 'boolean' },
    },
  });
  const started = performance.now();
  try {
    const image = await buildOsImage({
      cacheDir: values['cache-dir'],
      kernelPackage: values.kernel,
      force: values.force,
      onLine: values.verbose ? (line) => console.error(line) : undefined,
    });
    if (values['print-path']) {
      console.log(image.path);
    } else {
      const m = image.manifest;
      console.log(`Debian 12 OS image, ${image.reused ? 'cached' : 'built'} in ${seconds(performance.now() - started)} s:`);
      console.log(`  ${image.path}`);
      console.log(`  qcow2 ${formatBytes(m.bytes)}, virtual ${formatBytes(m.virtualBytes)}, root tree ${formatBytes(m.rootTreeBytes)}`);
      console.log(`  sha256 ${m.sha256}`);
      console.log(`  kernel ${m.kernelRelease} (${m.kernelPackage}); user '${OS_IMAGE_USER}'; cloud-init datasource ConfigDrive`);
      console.log(
        `  build: mmdebstrap ${m.seconds.mmdebstrap} s, file systems ${m.seconds.filesystems} s, qcow2 ${m.seconds.qcow2} s, total ${m.seconds.total} s`,
      );
    }
  } catch (error) {
    console.error(`build:os-image: ${(error as Error).message}`);
    process.exitCode = 1;
  }
}
