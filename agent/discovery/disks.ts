import { join } from 'node:path';
import type { Disk } from '../../gen/metalcast/v1/inventory.js';
import { isVirtualDevice, linkTargetName, listEntries, readAttribute, readBytes, readInteger, resolve } from './sysfs.js';

/**
 * Block devices that are never image targets, by kernel name. Most of them
 * also live under devices/virtual, which is checked separately; the names
 * keep the rule readable and catch them on kernels that place them elsewhere.
 * - loop, ram, zram, nbd: backed by files, memory or the network.
 * - dm-*, md*: LVM, dm-crypt, multipath and software RAID are assembled from
 *   disks that are listed themselves; an image goes onto those.
 * - sr*, fd*: optical and floppy drives.
 */
const SKIPPED_NAMES = /^(loop|ram|zram|nbd|dm-|md|sr|fd)\d/;

/** /sys/block/<name>/size counts 512-byte sectors whatever the device's logical block size. */
const SECTOR_BYTES = 512;

/**
 * Whole disks under <root>/sys/block that can hold an image, sorted by name.
 * Besides the names above, a disk is left out when its size is 0 (a card
 * reader without a card), when it is read-only (a write-protected card, the
 * eMMC boot areas mmcblk0boot0/1), or when the kernel marks it hidden
 * (the per-path nvme0c0n1 nodes behind NVMe multipath).
 * Removable disks such as USB sticks are kept: they are real targets, and
 * hiding them would leave an operator wondering where the stick went.
 *
 * Device paths are <root>/dev/<name>, which is /dev/sda on a real machine
 * (root '/'), and the disk image file of a fake machine built under a
 * folder. by_path follows the same rule.
 */
export async function discoverDisks(root: string): Promise<Disk[]> {
  const sys = await resolve(join(root, 'sys'));
  if (sys === undefined) return [];
  const devDir = join(root, 'dev');
  const classBlock = join(sys, 'block');
  const [names, byPath] = await Promise.all([listEntries(classBlock), byPathLinks(join(devDir, 'disk', 'by-path'))]);
  const found = await Promise.all(
    names.filter((name) => !SKIPPED_NAMES.test(name)).map((name) => readDisk(sys, join(classBlock, name), name, devDir, byPath)),
  );
  return found.filter((disk) => disk !== undefined);
}

async function readDisk(sys: string, dir: string, name: string, devDir: string, byPath: Map<string, string>): Promise<Disk | undefined> {
  const device = await resolve(dir);
  if (device === undefined || isVirtualDevice(sys, device)) return undefined;
  const [sectors, readOnly, hidden] = await Promise.all([
    readInteger(join(dir, 'size')),
    readAttribute(join(dir, 'ro')),
    readAttribute(join(dir, 'hidden')),
  ]);
  if (sectors === undefined || sectors <= 0 || readOnly === '1' || hidden === '1') return undefined;

  const [model, serial, wwn, rotational] = await Promise.all([
    // mmc cards name their model `name`, not `model`.
    firstOf(join(dir, 'device', 'model'), join(dir, 'device', 'name')),
    readSerial(dir),
    // NVMe namespaces carry `wwid` themselves; SCSI disks on the device.
    firstOf(join(dir, 'wwid'), join(dir, 'device', 'wwid')),
    readAttribute(join(dir, 'queue', 'rotational')),
  ]);
  const link = byPath.get(name);
  return {
    name,
    devicePath: join(devDir, name),
    sizeBytes: sectors * SECTOR_BYTES,
    model: model ?? '',
    serial: serial ?? '',
    rotational: rotational === '1',
    byPath: link === undefined ? '' : join(devDir, 'disk', 'by-path', link),
    wwn: wwn ?? '',
  };
}

/**
 * NVMe and mmc put `serial` on the device, virtio-blk on the disk itself,
 * and SCSI/SATA only in VPD page 0x80 (unit serial number).
 */
async function readSerial(dir: string): Promise<string | undefined> {
  return (
    (await firstOf(join(dir, 'device', 'serial'), join(dir, 'serial'))) ?? parseVpdSerial(await readBytes(join(dir, 'device', 'vpd_pg80')))
  );
}

/** SPC page 0x80: byte 1 is the page code, bytes 2-3 the length of the ASCII serial that follows. */
function parseVpdSerial(page: Buffer | undefined): string | undefined {
  if (page === undefined || page.length < 4 || page[1] !== 0x80) return undefined;
  const length = page.readUInt16BE(2);
  const serial = page
    .subarray(4, 4 + length)
    .toString('latin1')
    .replace(/\0/g, '')
    .trim();
  return serial === '' ? undefined : serial;
}

async function firstOf(...paths: string[]): Promise<string | undefined> {
  for (const path of paths) {
    const value = await readAttribute(path);
    if (value !== undefined) return value;
  }
  return undefined;
}

/**
 * Maps a disk name to the by-path link naming it. Partitions' links
 * ("…-part1") point at sda1 and so never match a disk. Recent udev creates
 * two links per ATA disk ("…-ata-1" and "…-ata-1.0"); the shorter, older
 * name wins so the choice is stable across udev versions.
 */
async function byPathLinks(folder: string): Promise<Map<string, string>> {
  const links = await Promise.all(
    (await listEntries(folder)).map(async (link) => ({ link, target: await linkTargetName(join(folder, link)) })),
  );
  const byDisk = new Map<string, string>();
  for (const { link, target } of links) {
    if (target === undefined) continue;
    const current = byDisk.get(target);
    if (current === undefined || link.length < current.length || (link.length === current.length && link < current)) {
      byDisk.set(target, link);
    }
  }
  return byDisk;
}
