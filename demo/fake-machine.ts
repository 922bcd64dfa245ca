import { mkdir, rm, symlink, truncate, writeFile } from 'node:fs/promises';
import { basename, dirname, join, relative } from 'node:path';
import { normaliseMac } from '../common/mac.js';

/**
 * Fake machines: folder trees laid out the way a Linux kernel presents
 * sysfs, procfs and /dev, so that discovery (and the agent and demo around
 * it) can run as many distinct machines as needed on one host. Class entries
 * are relative symlinks into /sys/devices exactly as on a real kernel, so
 * code that reads them as plain folders, or forgets that /sys/block/<disk>/size
 * counts 512-byte sectors, fails here as it would in production.
 */

/** One physical NIC. */
export interface FakeNicSpec {
  /** Interface name. Default: eno1, eno2, … in order. */
  name?: string;
  /** Burned-in MAC, the one discovery must report. */
  mac: string;
  /** Content of `speed`. Default 1000; the kernel shows -1 when the speed is unknown. */
  speedMbps?: number;
  /** Content of `carrier`. Default true. */
  carrier?: boolean;
  /** Driver bound to the PCI device. Default 'e1000e'. */
  driver?: string;
  /** ARPHRD type in `type`. Default 1 (Ethernet); 32 is InfiniBand. */
  type?: number;
  /**
   * Makes the NIC a bond slave: `address` then shows this (the bond's MAC)
   * and only `bonding_slave/perm_hwaddr` shows `mac`. Default: not bonded.
   */
  bondAddress?: string;
}

/** One whole disk. The name picks the layout: nvme<C>n<N> NVMe, vd<x> virtio-blk, anything else SATA. */
export interface FakeDiskSpec {
  /** Kernel name, for example 'sda', 'nvme0n1' or 'vda'. */
  name: string;
  /** Capacity; a multiple of 512. The disk file is sparse, so size costs nothing. */
  sizeBytes: number;
  /** Model string. Default 'METALCAST FAKE DISK'. */
  model?: string;
  /** Serial number. Default 'FAKE<name>'. */
  serial?: string;
  /** Spinning disk. Default false. */
  rotational?: boolean;
  /** World wide name, for example 'naa.5000c500a1b2c3d4'. Default: none. */
  wwn?: string;
  /** Content of `removable`. Default false. */
  removable?: boolean;
}

/** DMI identity. */
export interface FakeSystemSpec {
  vendor: string;
  productName: string;
  serial: string;
  uuid: string;
}

/** What to build; every field has a default. */
export interface FakeMachineSpec {
  /** Shorthand for NICs with default settings, one per MAC. Default ['02:6d:63:00:00:01']. Not with `nics`. */
  macs?: string[];
  /** NICs with full control. Not with `macs`. */
  nics?: FakeNicSpec[];
  /** Default: one 1 GiB SATA SSD 'sda'. */
  disks?: FakeDiskSpec[];
  /** Default: vendor 'Metalcast', product 'Fake Machine', serial 'FAKE0001', a fixed uuid. */
  system?: Partial<FakeSystemSpec>;
  /** Logical CPUs. Default 4. */
  cpuCount?: number;
  /** Default 'Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz'. */
  cpuModel?: string;
  /** Multiple of 1024. Default 8 GiB. */
  memoryBytes?: number;
  /**
   * Adds what discovery must leave out: lo, a bridge br0 carrying the first
   * NIC's MAC, a veth, loop0 (with a size), and an optical drive sr0 with
   * media. Default true.
   */
  decoys?: boolean;
}

/** A built fake machine, with the values discovery should report. */
export interface FakeMachine {
  /** Pass this to discoverInventory. */
  root: string;
  /** Burned-in MACs, normalised, in NIC order. */
  macs: string[];
  nics: Array<Required<Omit<FakeNicSpec, 'bondAddress'>>>;
  /** `path` is the sparse disk file, the device path discovery reports. */
  disks: Array<{ name: string; path: string; sizeBytes: number; byPath: string }>;
  system: FakeSystemSpec;
  cpu: { count: number; model: string };
  memoryBytes: number;
}

const GIB = 1024 ** 3;
const DEFAULT_SYSTEM: FakeSystemSpec = {
  vendor: 'Metalcast',
  productName: 'Fake Machine',
  serial: 'FAKE0001',
  uuid: '6d657461-6c63-4000-8000-000000000001',
};

/**
 * Builds a fake machine under dir, which should be empty or absent. Only the
 * attributes discovery reads are written, plus enough around them (driver
 * links, partitions and their by-path links) to make mistakes visible.
 */
export async function createFakeMachine(dir: string, spec: FakeMachineSpec = {}): Promise<FakeMachine> {
  if (spec.macs !== undefined && spec.nics !== undefined) throw new Error('give either macs or nics, not both');
  const nicSpecs: FakeNicSpec[] = spec.nics ?? (spec.macs ?? ['02:6d:63:00:00:01']).map((mac) => ({ mac }));
  const diskSpecs = spec.disks ?? [{ name: 'sda', sizeBytes: GIB }];
  const system = { ...DEFAULT_SYSTEM, ...spec.system };
  const cpu = { count: spec.cpuCount ?? 4, model: spec.cpuModel ?? 'Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz' };
  const memoryBytes = spec.memoryBytes ?? 8 * GIB;
  if (memoryBytes % 1024 !== 0) throw new Error(`memoryBytes ${memoryBytes} is not a multiple of 1024`);

  const sys = join(dir, 'sys');
  const nics = nicSpecs.map((nic, i) => ({
    name: nic.name ?? `eno${i + 1}`,
    mac: normaliseMac(nic.mac),
    speedMbps: nic.speedMbps ?? 1000,
    carrier: nic.carrier ?? true,
    driver: nic.driver ?? 'e1000e',
    type: nic.type ?? 1,
  }));
  for (const [i, nic] of nics.entries()) {
    // The first NIC sits on the chipset as on most servers, the rest on a card behind a root port.
    const pci = i === 0 ? 'pci0000:00/0000:00:1f.6' : `pci0000:00/0000:00:1c.0/0000:${hex2(i)}:00.0`;
    const bondAddress = nicSpecs[i]?.bondAddress;
    await writeNic(sys, join(sys, 'devices', pci), nic.name, {
      address: bondAddress ?? nicSpecs[i]!.mac,
      type: String(nic.type),
      speed: String(nic.speedMbps),
      carrier: nic.carrier ? '1' : '0',
      operstate: nic.carrier ? 'up' : 'down',
      ...(bondAddress === undefined ? {} : { 'bonding_slave/perm_hwaddr': nicSpecs[i]!.mac }),
    });
    const driver = join(sys, 'bus', 'pci', 'drivers', nic.driver);
    await mkdir(driver, { recursive: true });
    await link(join(sys, 'devices', pci, 'driver'), driver);
  }

  const disks: FakeMachine['disks'] = [];
  let sata = 0;
  let virtio = 0;
  for (const disk of diskSpecs) {
    if (disk.sizeBytes <= 0 || disk.sizeBytes % 512 !== 0)
      throw new Error(`disk ${disk.name}: sizeBytes ${disk.sizeBytes} is not a positive multiple of 512`);
    const layout = diskLayout(disk.name, sata, virtio);
    if (layout.kind === 'sata') sata++;
    if (layout.kind === 'virtio') virtio++;
    const byPath = await writeDisk(dir, disk, layout);
    disks.push({ name: disk.name, path: join(dir, 'dev', disk.name), sizeBytes: disk.sizeBytes, byPath });
  }

  if (spec.decoys ?? true) await writeDecoys(dir, nics[0]?.mac ?? '02:6d:63:ff:ff:ff', sata);

  const dmi = join(sys, 'devices', 'virtual', 'dmi', 'id');
  await writeAttributes(dmi, {
    sys_vendor: system.vendor,
    product_name: system.productName,
    product_serial: system.serial,
    chassis_serial: system.serial,
    product_uuid: system.uuid,
    board_vendor: system.vendor,
    bios_vendor: 'Metalcast BIOS',
  });
  await link(join(sys, 'class', 'dmi', 'id'), dmi);

  await writeAttributes(join(sys, 'devices', 'system', 'cpu'), { online: cpu.count === 1 ? '0' : `0-${cpu.count - 1}` });
  await writeAttributes(join(dir, 'proc'), { cpuinfo: cpuinfo(cpu.count, cpu.model), meminfo: meminfo(memoryBytes) });

  return { root: dir, macs: nics.map((nic) => nic.mac), nics, disks, system, cpu, memoryBytes };
}

/**
 * A fake machine whose MACs, serials and uuid are derived from index, so
 * that machines 0…N built side by side never collide: two NICs with
 * locally administered MACs 02:6d:63:xx:xx:xx, one 1 GiB disk. Overrides win.
 */
export async function uniqueFakeMachine(dir: string, index: number, overrides: FakeMachineSpec = {}): Promise<FakeMachine> {
  if (!Number.isInteger(index) || index < 0 || index >= 2 ** 22) throw new Error(`index ${index} is not a whole number in [0, 4194303]`);
  const mac = (nic: number) => {
    const value = index * 4 + nic;
    return `02:6d:63:${hex2(value >> 16)}:${hex2((value >> 8) & 0xff)}:${hex2(value & 0xff)}`;
  };
  const serial = `MC${String(index).padStart(8, '0')}`;
  return createFakeMachine(dir, {
    macs: overrides.nics ? undefined : [mac(0), mac(1)],
    disks: [{ name: 'sda', sizeBytes: GIB, serial: `${serial}-D0`, model: 'METALCAST FAKE DISK' }],
    ...overrides,
    system: {
      serial,
      uuid: `6d657461-6c63-4000-8000-${index.toString(16).padStart(12, '0')}`,
      productName: `Fake Machine ${index}`,
      ...overrides.system,
    },
  });
}

/**
 * Replaces a file with an empty folder, so that reading it fails (EISDIR)
 * the way `carrier` of a down link or a root-only DMI file does. chmod cannot
 * do this: tests may run as root, which reads anything.
 */
export async function makeUnreadable(path: string): Promise<void> {
  await rm(path, { force: true });
  await mkdir(path, { recursive: true });
}

type DiskLayout =
  | { kind: 'sata'; port: number }
  | { kind: 'nvme'; controller: number; namespace: number }
  | { kind: 'virtio'; index: number };

function diskLayout(name: string, sata: number, virtio: number): DiskLayout {
  const nvme = /^nvme(\d+)n(\d+)$/.exec(name);
  if (nvme) return { kind: 'nvme', controller: Number(nvme[1]), namespace: Number(nvme[2]) };
  if (/^vd[a-z]+$/.test(name)) return { kind: 'virtio', index: virtio };
  return { kind: 'sata', port: sata };
}

/** Writes one disk in its bus's layout and returns its by-path link (under <root>/dev). */
async function writeDisk(root: string, disk: FakeDiskSpec, layout: DiskLayout): Promise<string> {
  const sys = join(root, 'sys');
  const model = disk.model ?? 'METALCAST FAKE DISK';
  const serial = disk.serial ?? `FAKE${disk.name}`;
  let deviceDir: string;
  let diskDir: string;
  let byPath: string;
  let partition: string;
  if (layout.kind === 'nvme') {
    const pci = `0000:${hex2(0x3d + layout.controller)}:00.0`;
    deviceDir = join(sys, 'devices', 'pci0000:00', '0000:00:1d.0', pci, 'nvme', `nvme${layout.controller}`);
    diskDir = join(deviceDir, disk.name);
    byPath = `pci-${pci}-nvme-${layout.namespace}`;
    partition = `${disk.name}p1`;
    // NVMe pads model (40) and serial (20) with spaces, and puts wwid on the namespace.
    await writeAttributes(deviceDir, { model: model.padEnd(40), serial: serial.padEnd(20) });
    if (disk.wwn) await writeAttributes(diskDir, { wwid: disk.wwn });
  } else if (layout.kind === 'virtio') {
    deviceDir = join(sys, 'devices', 'pci0000:00', `0000:00:${hex2(4 + layout.index)}.0`, `virtio${layout.index + 1}`);
    diskDir = join(deviceDir, 'block', disk.name);
    byPath = `pci-0000:00:${hex2(4 + layout.index)}.0`;
    partition = `${disk.name}1`;
    // virtio-blk has no model, and its serial is an attribute of the disk itself.
    await writeAttributes(deviceDir, { vendor: '0x1af4', device: '0x0002' });
    await writeAttributes(diskDir, { serial });
  } else {
    const { port } = layout;
    deviceDir = join(sys, 'devices', 'pci0000:00', '0000:00:17.0', `ata${port + 1}`, `host${port}`, `target${port}:0:0`, `${port}:0:0:0`);
    diskDir = join(deviceDir, 'block', disk.name);
    byPath = `pci-0000:00:17.0-ata-${port + 1}`;
    partition = `${disk.name}1`;
    // SCSI pads vendor (8) and model (16); the serial is only in VPD page 0x80.
    await writeAttributes(deviceDir, { vendor: 'ATA'.padEnd(8), model: model.padEnd(16), rev: '1.0 ' });
    await writeFile(join(deviceDir, 'vpd_pg80'), vpdSerialPage(serial));
    if (disk.wwn) await writeAttributes(deviceDir, { wwid: disk.wwn });
  }
  const sectors = disk.sizeBytes / 512;
  await writeAttributes(diskDir, {
    size: String(sectors),
    ro: '0',
    removable: disk.removable ? '1' : '0',
    hidden: '0',
    'queue/rotational': disk.rotational ? '1' : '0',
    'queue/logical_block_size': '4096',
    [`${partition}/partition`]: '1',
    [`${partition}/size`]: String(Math.max(1, sectors - 2048)),
  });
  await link(join(diskDir, 'device'), deviceDir);
  await link(join(sys, 'block', disk.name), diskDir);

  const dev = join(root, 'dev');
  await mkdir(dev, { recursive: true });
  await writeFile(join(dev, disk.name), '');
  await truncate(join(dev, disk.name), disk.sizeBytes);
  await link(join(dev, 'disk', 'by-path', byPath), join(dev, disk.name));
  await link(join(dev, 'disk', 'by-path', `${byPath}-part1`), join(dev, partition));
  return join(dev, 'disk', 'by-path', byPath);
}

async function writeDecoys(root: string, firstMac: string, sataPorts: number): Promise<void> {
  const sys = join(root, 'sys');
  const virtualNet = join(sys, 'devices', 'virtual', 'net');
  await writeNic(sys, undefined, 'lo', { address: '00:00:00:00:00:00', type: '772', carrier: '1', operstate: 'unknown' }, virtualNet);
  // A bridge takes a member's MAC: were it reported, the machine would list that MAC twice.
  await writeNic(
    sys,
    undefined,
    'br0',
    { address: firstMac, type: '1', carrier: '1', operstate: 'up', 'bridge/stp_state': '0' },
    virtualNet,
  );
  await writeNic(
    sys,
    undefined,
    'veth0',
    { address: 'fe:54:00:aa:bb:cc', type: '1', carrier: '1', speed: '10000', operstate: 'up' },
    virtualNet,
  );

  const loop = join(sys, 'devices', 'virtual', 'block', 'loop0');
  await writeAttributes(loop, {
    size: '204800',
    ro: '0',
    removable: '0',
    'queue/rotational': '0',
    'loop/backing_file': '/var/lib/snap.img',
  });
  await link(join(sys, 'block', 'loop0'), loop);

  // An optical drive with a disc in it: size is not 0, so only its name gives it away.
  const port = sataPorts + 8;
  const cdrom = join(sys, 'devices', 'pci0000:00', '0000:00:17.0', `ata${port + 1}`, `host${port}`, `target${port}:0:0`, `${port}:0:0:0`);
  await writeAttributes(cdrom, { vendor: 'HL-DT-ST', model: 'DVDRAM GUD0N    ' });
  await writeAttributes(join(cdrom, 'block', 'sr0'), { size: '1433600', ro: '0', removable: '1', 'queue/rotational': '1' });
  await link(join(cdrom, 'block', 'sr0', 'device'), cdrom);
  await link(join(sys, 'block', 'sr0'), join(cdrom, 'block', 'sr0'));
  await link(join(root, 'dev', 'disk', 'by-path', `pci-0000:00:17.0-ata-${port + 1}`), join(root, 'dev', 'sr0'));
}

/**
 * Writes <device>/net/<name> (or <virtualNet>/<name>) with its attributes,
 * the `device` link back to the hardware for physical NICs, and the
 * /sys/class/net entry.
 */
async function writeNic(
  sys: string,
  device: string | undefined,
  name: string,
  attributes: Record<string, string>,
  virtualNet?: string,
): Promise<void> {
  const netDir = device === undefined ? join(virtualNet!, name) : join(device, 'net', name);
  await writeAttributes(netDir, attributes);
  if (device !== undefined) await link(join(netDir, 'device'), device);
  await link(join(sys, 'class', 'net', name), netDir);
}

/** Writes name → content files under dir, each ending in a newline as sysfs does; names may contain '/'. */
async function writeAttributes(dir: string, attributes: Record<string, string>): Promise<void> {
  for (const [name, content] of Object.entries(attributes)) {
    const path = join(dir, name);
    await mkdir(dirname(path), { recursive: true });
    await writeFile(path, `${content}\n`);
  }
}

/**
 * A relative symlink at `at` pointing to `target`, spelled as sysfs spells
 * them: up to the target's parent, then down by name, so a device link
 * reads "../../../0000:00:1f.6" rather than the equivalent "../..".
 */
async function link(at: string, target: string): Promise<void> {
  await mkdir(dirname(at), { recursive: true });
  await symlink(join(relative(dirname(at), dirname(target)), basename(target)), at);
}

/** SPC VPD page 0x80 (unit serial number): 4-byte header, then the serial, right-aligned in 20 bytes as ATA disks show it. */
function vpdSerialPage(serial: string): Buffer {
  const text = Buffer.from(serial.padStart(20), 'latin1');
  const header = Buffer.from([0x00, 0x80, text.length >> 8, text.length & 0xff]);
  return Buffer.concat([header, text]);
}

function cpuinfo(count: number, model: string): string {
  const blocks: string[] = [];
  for (let i = 0; i < count; i++) {
    blocks.push(
      [
        `processor\t: ${i}`,
        'vendor_id\t: GenuineIntel',
        'cpu family\t: 6',
        'model\t\t: 85',
        `model name\t: ${model}`,
        'cpu MHz\t\t: 2100.000',
        `cpu cores\t: ${count}`,
        'flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr',
        '',
      ].join('\n'),
    );
  }
  return blocks.join('\n');
}

function meminfo(bytes: number): string {
  const kb = bytes / 1024;
  return [
    `MemTotal:       ${kb} kB`,
    `MemFree:        ${Math.floor(kb / 2)} kB`,
    `MemAvailable:   ${Math.floor(kb * 0.75)} kB`,
    'Buffers:          10240 kB',
  ].join('\n');
}

function hex2(value: number): string {
  return value.toString(16).padStart(2, '0');
}
