/**
 * npm run build:test-image: a small raw disk image that really boots, for the
 * lab to deploy and then boot from the disk, proving the image it wrote is
 * bootable.
 *
 *   dist/test-image/metalcast-test-image.raw          MBR disk: syslinux's MBR, one active FAT16 partition
 *                                                     at 1 MiB with SYSLINUX, Debian's kernel and a busybox
 *                                                     initramfs whose /init prints the marker and powers off
 *   dist/test-image/metalcast-test-image.raw.sha256   its sha256, as sha256sum writes it
 *
 * On the first serial port the booted image prints one line,
 *   METALCAST-TEST-IMAGE-BOOTED kernel=<release> cmdline=<...>
 * then powers the machine off (a QEMU guest's process exits).
 *
 * No loop devices and no mounting: the file system is made in its own file
 * with mkfs.fat (dosfstools), filled with mcopy (mtools), made bootable with
 * the mtools-based `syslinux --install` (syslinux), and placed after a
 * partition table written here. Debian packages: syslinux syslinux-common
 * mtools dosfstools linux-image-amd64 busybox-static.
 *
 * Flags: --out DIR, --force (rebuild even when the inputs did not change).
 */
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { gzipSync } from 'node:zlib';
import { REPO_ROOT } from '../build.js';
import { formatBytes } from '../package-agent.js';
import { addBaseLayout, addBusybox, CpioBuilder } from './cpio.js';
import { findTool, newestKernel, readKernel, run, staticBusybox, writeAtomically } from './host-tools.js';

export const TEST_IMAGE_DIR = join(REPO_ROOT, 'dist', 'test-image');
export const TEST_IMAGE_NAME = 'metalcast-test-image.raw';
/** What the booted image prints on its console. */
export const TEST_IMAGE_MARKER = 'METALCAST-TEST-IMAGE-BOOTED';
/** The Debian packages this build needs besides the kernel and busybox-static. */
export const TEST_IMAGE_APT_PACKAGES = 'syslinux syslinux-common mtools dosfstools';

const SECTOR = 512;
const MIB = 1024 * 1024;
/** The partition starts at 1 MiB, as partitioning tools align it. */
const PARTITION_START_SECTORS = 2048;
const SYSLINUX_MBR = '/usr/lib/syslinux/mbr/mbr.bin';
/** MBR partition type 0x0e: FAT16 addressed by LBA. */
const FAT16_LBA = 0x0e;

/** The image's /init: the marker with what it found, then power off (busybox's poweroff -f needs no init). */
const TEST_INIT = `#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo
echo "${TEST_IMAGE_MARKER} kernel=$(uname -r) cmdline=$(cat /proc/cmdline)"
echo
sleep 1
poweroff -f
`;

const SYSLINUX_CFG = `SERIAL 0 115200
DEFAULT metalcast-test-image
PROMPT 0
TIMEOUT 0
LABEL metalcast-test-image
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND console=tty0 console=ttyS0,115200 quiet panic=-1 no_timer_check
`;

export interface BuildTestImageOptions {
  /** Default dist/test-image/. */
  outDir?: string;
  /** Rebuild even when nothing changed (default false). */
  force?: boolean;
}

export interface TestImage {
  path: string;
  bytes: number;
  sha256: string;
  kernelVersion: string;
  /** True when the image on disk was built from the same inputs and kept. */
  reused: boolean;
}

export function buildTestImage(options: BuildTestImageOptions = {}): TestImage {
  const outDir = options.outDir ?? TEST_IMAGE_DIR;
  mkdirSync(outDir, { recursive: true });
  const imagePath = join(outDir, TEST_IMAGE_NAME);
  const sumPath = `${imagePath}.sha256`;
  const stampPath = join(outDir, 'inputs.sha256');

  const kernelVersion = newestKernel();
  const kernel = readKernel(kernelVersion);
  const busybox = staticBusybox();
  const inputs = createHash('sha256')
    .update(kernel)
    .update(busybox.data)
    .update(TEST_INIT)
    .update(SYSLINUX_CFG)
    .update(readFileSync(fileURLToPath(import.meta.url)))
    .digest('hex');
  if (!options.force && existsSync(imagePath) && existsSync(sumPath) && readOptional(stampPath) === inputs) {
    const sha256 = (readFileSync(sumPath, 'utf8').split(/\s/)[0] as string).trim();
    return { path: imagePath, bytes: statSync(imagePath).size, sha256, kernelVersion, reused: true };
  }

  const cpio = new CpioBuilder();
  addBaseLayout(cpio);
  addBusybox(cpio, busybox);
  cpio.file('init', Buffer.from(TEST_INIT), 0o755);
  const initrd = gzipSync(Buffer.concat(cpio.chunks()), { level: 9 });

  const work = mkdtempSync(join(tmpdir(), 'metalcast-test-image-'));
  try {
    const files = { vmlinuz: kernel, 'initrd.gz': initrd, 'syslinux.cfg': Buffer.from(SYSLINUX_CFG) };
    for (const [name, data] of Object.entries(files)) writeAtomically(join(work, name), data);
    // Room for the files, SYSLINUX and the FAT itself, in whole MiB.
    const partitionBytes = Math.ceil((kernel.length + initrd.length) / MIB + 2) * MIB;
    const fat = join(work, 'partition.fat');
    // mtools stamps files with SOURCE_DATE_EPOCH when it is set: a fixed time, so that equal inputs give equal bytes.
    const mtools = { hint: `apt-get install -y ${TEST_IMAGE_APT_PACKAGES}`, env: { SOURCE_DATE_EPOCH: '1577836800' } };
    // -h: the partition's first sector, which the boot sector records; --invariant: a fixed volume id and time.
    run(
      findTool('mkfs.fat') ?? 'mkfs.fat',
      [
        '-C',
        '-F',
        '16',
        '-n',
        'METALCAST',
        '-i',
        '4d430001',
        '--invariant',
        '-h',
        String(PARTITION_START_SECTORS),
        fat,
        String(partitionBytes / 1024),
      ],
      mtools,
    );
    for (const name of Object.keys(files)) run('mcopy', ['-i', fat, join(work, name), `::/${name}`], mtools);
    run('syslinux', ['--install', fat], mtools);

    const partition = readFileSync(fat);
    const disk = Buffer.alloc(PARTITION_START_SECTORS * SECTOR + partition.length);
    writeMbr(disk, partition.length / SECTOR);
    partition.copy(disk, PARTITION_START_SECTORS * SECTOR);
    writeAtomically(imagePath, disk);
    const sha256 = createHash('sha256').update(disk).digest('hex');
    writeAtomically(sumPath, Buffer.from(`${sha256}  ${TEST_IMAGE_NAME}\n`));
    writeAtomically(stampPath, Buffer.from(`${inputs}\n`));
    return { path: imagePath, bytes: disk.length, sha256, kernelVersion, reused: false };
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

/**
 * SYSLINUX's MBR boot code (it loads the active partition's first sector),
 * a fixed disk signature, and one active partition of type FAT16 LBA.
 */
function writeMbr(disk: Buffer, partitionSectors: number): void {
  let code: Buffer;
  try {
    code = readFileSync(SYSLINUX_MBR);
  } catch {
    throw new Error(`${SYSLINUX_MBR} is missing: apt-get install -y syslinux-common`);
  }
  if (code.length > 440) throw new Error(`${SYSLINUX_MBR} is ${code.length} bytes; an MBR has room for 440`);
  code.copy(disk, 0);
  disk.writeUInt32LE(0x4d430001, 440);
  const entry = 446;
  disk[entry] = 0x80; // active
  // CHS fields: "use LBA" (1023/254/63), as tools write for partitions past the CHS limit or on LBA-only disks.
  disk.set([0xfe, 0xff, 0xff], entry + 1);
  disk[entry + 4] = FAT16_LBA;
  disk.set([0xfe, 0xff, 0xff], entry + 5);
  disk.writeUInt32LE(PARTITION_START_SECTORS, entry + 8);
  disk.writeUInt32LE(partitionSectors, entry + 12);
  disk[510] = 0x55;
  disk[511] = 0xaa;
}

function readOptional(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8').trim();
  } catch {
    return undefined;
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const { values } = parseArgs({ options: { out: { type: 'string' }, force: { type: 'boolean' } } });
  const started = performance.now();
  try {
    const image = buildTestImage({ outDir: values.out, force: values.force });
    console.log(
      `test image (kernel ${image.kernelVersion}), ${image.reused ? 'unchanged' : 'built'} in ${Math.round(performance.now() - started)} ms:`,
    );
    console.log(`  ${relative(process.cwd(), image.path)}  ${formatBytes(image.bytes)}  sha256 ${image.sha256}`);
    console.log(`  boots to a console line '${TEST_IMAGE_MARKER} ...', then powers off`);
  } catch (error) {
    console.error(`build:test-image: ${(error as Error).message}`);
    process.exitCode = 1;
  }
}
