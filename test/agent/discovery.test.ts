import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { lstat, mkdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { parseCpuList } from '../../agent/discovery/cpu.js';
import { discoverInventory, unameArch } from '../../agent/discovery/index.js';
import { createFakeMachine, makeUnreadable, uniqueFakeMachine } from '../helpers/fake-machine.js';

const GIB = 1024 ** 3;

describe('discoverInventory', () => {
  let base: string;
  let count = 0;
  /** A fresh folder per machine, so tests can damage their machine freely. */
  const machineDir = () => join(base, `m${count++}`);

  before(() => {
    base = mkdtempSync(join(tmpdir(), 'metalcast-discovery-'));
  });
  after(() => rmSync(base, { recursive: true, force: true }));

  describe('network interfaces', () => {
    it('reports the physical NIC with its MAC, speed, carrier and driver, and skips lo, bridges and veth', async () => {
      const machine = await createFakeMachine(machineDir(), { macs: ['02:6d:63:00:00:0a'] });
      // The fake is only a fair test if class entries are symlinks, as on a real kernel.
      assert.ok((await lstat(join(machine.root, 'sys/class/net/eno1'))).isSymbolicLink());
      assert.ok((await lstat(join(machine.root, 'sys/class/net/br0'))).isSymbolicLink());

      const inventory = await discoverInventory(machine.root);
      assert.deepEqual(inventory.interfaces, [
        { name: 'eno1', macAddress: '02:6d:63:00:00:0a', speedMbps: 1000, hasCarrier: true, driver: 'e1000e' },
      ]);
    });

    it('normalises an upper-case MAC to lower-case colon form', async () => {
      const machine = await createFakeMachine(machineDir(), { nics: [{ mac: 'AA:BB:CC:DD:EE:0F' }] });
      const { interfaces } = await discoverInventory(machine.root);
      assert.deepEqual(
        interfaces.map((nic) => nic.macAddress),
        ['aa:bb:cc:dd:ee:0f'],
      );
    });

    it('reports the permanent MAC of a bond slave, not the bond MAC in `address`', async () => {
      const machine = await createFakeMachine(machineDir(), {
        nics: [{ mac: '02:6d:63:00:01:01' }, { mac: '02:6d:63:00:01:02', bondAddress: '02:6d:63:00:01:01' }],
      });
      const { interfaces } = await discoverInventory(machine.root);
      assert.deepEqual(
        interfaces.map((nic) => nic.macAddress),
        ['02:6d:63:00:01:01', '02:6d:63:00:01:02'],
      );
    });

    it('skips non-Ethernet interfaces and all-zero MACs', async () => {
      const machine = await createFakeMachine(machineDir(), {
        nics: [
          { name: 'eno1', mac: '02:6d:63:00:02:01' },
          { name: 'ib0', mac: '02:6d:63:00:02:02', type: 32 },
          { name: 'eno3', mac: '00:00:00:00:00:00' },
        ],
      });
      const { interfaces } = await discoverInventory(machine.root);
      assert.deepEqual(
        interfaces.map((nic) => nic.name),
        ['eno1'],
      );
    });

    it('skips an interface with no device link even outside devices/virtual', async () => {
      const machine = await createFakeMachine(machineDir(), { macs: ['02:6d:63:00:03:01', '02:6d:63:00:03:02'] });
      await rm(join(machine.root, 'sys/class/net/eno2/device'));
      const { interfaces } = await discoverInventory(machine.root);
      assert.deepEqual(
        interfaces.map((nic) => nic.name),
        ['eno1'],
      );
    });

    it('gives 0 and false for a down link: speed -1 or missing, carrier unreadable or missing, no driver', async () => {
      const machine = await createFakeMachine(machineDir(), {
        nics: [
          { mac: '02:6d:63:00:04:01', speedMbps: -1, carrier: false },
          { mac: '02:6d:63:00:04:02' },
          { mac: '02:6d:63:00:04:03', speedMbps: 4294967295 },
        ],
      });
      const eno2 = join(machine.root, 'sys/class/net/eno2');
      // A link that is administratively down refuses reads of carrier and speed.
      await makeUnreadable(join(eno2, 'carrier'));
      await makeUnreadable(join(eno2, 'speed'));
      await rm(join(eno2, 'device/driver'));
      await rm(join(machine.root, 'sys/class/net/eno3/carrier'));

      const { interfaces } = await discoverInventory(machine.root);
      assert.deepEqual(
        interfaces.map(({ name, speedMbps, hasCarrier, driver }) => ({ name, speedMbps, hasCarrier, driver })),
        [
          { name: 'eno1', speedMbps: 0, hasCarrier: false, driver: 'e1000e' },
          { name: 'eno2', speedMbps: 0, hasCarrier: false, driver: '' },
          { name: 'eno3', speedMbps: 0, hasCarrier: false, driver: 'e1000e' },
        ],
      );
    });

    it('still finds physical NICs when the root folder itself has "virtual" in its path', async () => {
      const machine = await createFakeMachine(join(machineDir(), 'virtual', 'host'), { macs: ['02:6d:63:00:05:01'] });
      const { interfaces, disks } = await discoverInventory(machine.root);
      assert.equal(interfaces.length, 1);
      assert.equal(disks.length, 1);
    });
  });

  describe('disks', () => {
    it('reports size as 512-byte sectors, whatever the logical block size', async () => {
      const machine = await createFakeMachine(machineDir(), { disks: [{ name: 'sda', sizeBytes: 3 * GIB }] });
      const sda = join(machine.root, 'sys/block/sda');
      assert.equal((await readFile(join(sda, 'size'), 'utf8')).trim(), String((3 * GIB) / 512));
      assert.equal((await readFile(join(sda, 'queue/logical_block_size'), 'utf8')).trim(), '4096');

      const { disks } = await discoverInventory(machine.root);
      assert.equal(disks[0]?.sizeBytes, 3 * GIB);
    });

    it('reads model, serial and wwn from where SATA, NVMe and virtio each keep them, trimmed', async () => {
      const machine = await createFakeMachine(machineDir(), {
        disks: [
          { name: 'sda', sizeBytes: GIB, model: 'ST4000NM0035', serial: 'ZC1A2B3C', wwn: 'naa.5000c500a1b2c3d4', rotational: true },
          { name: 'nvme0n1', sizeBytes: 2 * GIB, model: 'SAMSUNG MZQL2960HCJR', serial: 'S64FNE0R123456', wwn: 'eui.0025388b91b2c3d4' },
          { name: 'vda', sizeBytes: GIB / 2, serial: 'virtio-serial-1' },
        ],
      });
      const { disks } = await discoverInventory(machine.root);
      assert.deepEqual(
        disks.map(({ name, model, serial, wwn, rotational }) => ({ name, model, serial, wwn, rotational })),
        [
          { name: 'nvme0n1', model: 'SAMSUNG MZQL2960HCJR', serial: 'S64FNE0R123456', wwn: 'eui.0025388b91b2c3d4', rotational: false },
          { name: 'sda', model: 'ST4000NM0035', serial: 'ZC1A2B3C', wwn: 'naa.5000c500a1b2c3d4', rotational: true },
          { name: 'vda', model: '', serial: 'virtio-serial-1', wwn: '', rotational: false },
        ],
      );
    });

    it('reports the device path as <root>/dev/<name>, the sparse disk file of the declared size', async () => {
      const machine = await createFakeMachine(machineDir(), { disks: [{ name: 'sda', sizeBytes: GIB }] });
      const { disks } = await discoverInventory(machine.root);
      assert.equal(disks[0]?.devicePath, join(machine.root, 'dev', 'sda'));
      assert.equal(disks[0]?.devicePath, machine.disks[0]?.path);
      const file = await stat(disks[0]!.devicePath);
      assert.equal(file.size, GIB);
      assert.ok(file.blocks * 512 < 1024 * 1024, 'the disk file should be sparse');
    });

    it('finds the by-path link of the whole disk, not of its partitions, preferring the shorter of two names', async () => {
      const machine = await createFakeMachine(machineDir(), {
        disks: [
          { name: 'sda', sizeBytes: GIB },
          { name: 'sdb', sizeBytes: GIB },
        ],
      });
      // Recent udev adds "…-ata-N.0" beside "…-ata-N" for the same disk.
      await symlink('../../sdb', join(machine.root, 'dev/disk/by-path/pci-0000:00:17.0-ata-2.0'));
      const { disks } = await discoverInventory(machine.root);
      const byPath = join(machine.root, 'dev/disk/by-path');
      assert.deepEqual(
        disks.map((disk) => disk.byPath),
        [join(byPath, 'pci-0000:00:17.0-ata-1'), join(byPath, 'pci-0000:00:17.0-ata-2')],
      );
      assert.deepEqual(
        disks.map((disk) => disk.byPath),
        machine.disks.map((disk) => disk.byPath),
      );
    });

    it('leaves by_path empty when /dev/disk/by-path is missing', async () => {
      const machine = await createFakeMachine(machineDir());
      await rm(join(machine.root, 'dev/disk'), { recursive: true });
      const { disks } = await discoverInventory(machine.root);
      assert.equal(disks[0]?.byPath, '');
    });

    it('skips loop and optical devices, empty, read-only and hidden disks, but keeps removable ones', async () => {
      const machine = await createFakeMachine(machineDir(), {
        disks: ['sda', 'sdb', 'sdc', 'sdd', 'sde'].map((name) => ({ name, sizeBytes: GIB, removable: name === 'sde' })),
      });
      const block = join(machine.root, 'sys/block');
      await writeFile(join(block, 'sdb/size'), '0\n');
      await writeFile(join(block, 'sdc/ro'), '1\n');
      await writeFile(join(block, 'sdd/hidden'), '1\n');
      // The decoys loop0 and sr0 have a non-zero size: their size is not what excludes them.
      assert.notEqual((await readFile(join(block, 'loop0/size'), 'utf8')).trim(), '0');
      assert.notEqual((await readFile(join(block, 'sr0/size'), 'utf8')).trim(), '0');

      const { disks } = await discoverInventory(machine.root);
      assert.deepEqual(
        disks.map((disk) => disk.name),
        ['sda', 'sde'],
      );
    });

    it('skips device-mapper, md and zram devices', async () => {
      const machine = await createFakeMachine(machineDir());
      for (const name of ['dm-0', 'md127', 'zram0']) {
        const dir = join(machine.root, 'sys/devices/virtual/block', name);
        await mkdir(dir, { recursive: true });
        await writeFile(join(dir, 'size'), '2097152\n');
        await symlink(`../devices/virtual/block/${name}`, join(machine.root, 'sys/block', name));
      }
      const { disks } = await discoverInventory(machine.root);
      assert.deepEqual(
        disks.map((disk) => disk.name),
        ['sda'],
      );
    });

    it('tolerates missing model, serial, wwn and rotational attributes', async () => {
      const machine = await createFakeMachine(machineDir(), { disks: [{ name: 'sda', sizeBytes: GIB, rotational: true, wwn: 'naa.1' }] });
      const device = join(machine.root, 'sys/block/sda/device');
      for (const file of ['model', 'vpd_pg80', 'wwid']) await rm(join(device, file));
      await rm(join(machine.root, 'sys/block/sda/queue'), { recursive: true });
      const { disks } = await discoverInventory(machine.root);
      assert.deepEqual(disks[0], {
        name: 'sda',
        devicePath: join(machine.root, 'dev/sda'),
        sizeBytes: GIB,
        model: '',
        serial: '',
        rotational: false,
        byPath: join(machine.root, 'dev/disk/by-path/pci-0000:00:17.0-ata-1'),
        wwn: '',
      });
    });
  });

  describe('cpu and memory', () => {
    it('counts processors and reads the model from cpuinfo, and memory from MemTotal', async () => {
      const machine = await createFakeMachine(machineDir(), {
        cpuCount: 6,
        cpuModel: 'AMD EPYC 7543 32-Core Processor',
        memoryBytes: 96 * GIB,
      });
      const { cpu, memory } = await discoverInventory(machine.root, { arch: 'aarch64' });
      assert.deepEqual(cpu, { count: 6, modelName: 'AMD EPYC 7543 32-Core Processor', architecture: 'aarch64' });
      assert.deepEqual(memory, { totalBytes: 96 * GIB });
    });

    it('falls back to the online CPU list, and gives 0 when meminfo is missing', async () => {
      const machine = await createFakeMachine(machineDir());
      await rm(join(machine.root, 'proc/cpuinfo'));
      await rm(join(machine.root, 'proc/meminfo'));
      await writeFile(join(machine.root, 'sys/devices/system/cpu/online'), '0-3,5\n');
      const { cpu, memory } = await discoverInventory(machine.root);
      assert.equal(cpu?.count, 5);
      assert.equal(cpu?.modelName, '');
      assert.equal(memory?.totalBytes, 0);
    });

    it('parses kernel CPU lists', () => {
      assert.equal(parseCpuList('0'), 1);
      assert.equal(parseCpuList('0-63\n'), 64);
      assert.equal(parseCpuList('0-3,5,8-9'), 7);
      assert.equal(parseCpuList(''), 0);
      assert.equal(parseCpuList('3-1'), 0);
    });

    it('reports the architecture in uname form by default', async () => {
      const machine = await createFakeMachine(machineDir());
      const { cpu } = await discoverInventory(machine.root);
      assert.equal(cpu?.architecture, unameArch(process.arch));
      assert.equal(unameArch('x64'), 'x86_64');
      assert.equal(unameArch('arm64'), 'aarch64');
      assert.equal(unameArch('riscv64'), 'riscv64');
    });
  });

  describe('system identity', () => {
    it('reads vendor, product, serial and uuid from DMI', async () => {
      const system = {
        vendor: 'Dell Inc.',
        productName: 'PowerEdge R640',
        serial: 'J8K2L93',
        uuid: '4c4c4544-0038-4b10-8032-cac04f4c3933',
      };
      const machine = await createFakeMachine(machineDir(), { system });
      assert.ok((await lstat(join(machine.root, 'sys/class/dmi/id'))).isSymbolicLink());
      const inventory = await discoverInventory(machine.root);
      assert.deepEqual(inventory.system, {
        vendor: 'Dell Inc.',
        productName: 'PowerEdge R640',
        serialNumber: 'J8K2L93',
        uuid: system.uuid,
      });
    });

    it('falls back to the chassis serial when the product serial is unreadable or a placeholder, and lower-cases the uuid', async () => {
      const machine = await createFakeMachine(machineDir(), { system: { uuid: '4C4C4544-0038-4B10-8032-CAC04F4C3933' } });
      const dmi = join(machine.root, 'sys/class/dmi/id');
      await makeUnreadable(join(dmi, 'product_serial'));
      await writeFile(join(dmi, 'chassis_serial'), 'CHASSIS-42\n');
      assert.equal((await discoverInventory(machine.root)).system?.serialNumber, 'CHASSIS-42');
      assert.equal((await discoverInventory(machine.root)).system?.uuid, '4c4c4544-0038-4b10-8032-cac04f4c3933');

      await rm(join(dmi, 'product_serial'), { recursive: true });
      await writeFile(join(dmi, 'product_serial'), 'To Be Filled By O.E.M.\n');
      await writeFile(join(dmi, 'chassis_serial'), 'Default string\n');
      assert.equal((await discoverInventory(machine.root)).system?.serialNumber, '');
    });

    it('gives empty strings on a machine without DMI', async () => {
      const machine = await createFakeMachine(machineDir());
      await rm(join(machine.root, 'sys/class/dmi'), { recursive: true });
      const { system } = await discoverInventory(machine.root);
      assert.deepEqual(system, { vendor: '', productName: '', serialNumber: '', uuid: '' });
    });
  });

  describe('whole machines', () => {
    it('discovers a machine with two NICs and three disks', async () => {
      const machine = await createFakeMachine(machineDir(), {
        macs: ['02:6d:63:00:06:01', '02:6d:63:00:06:02'],
        disks: [
          { name: 'sda', sizeBytes: 2 * GIB, rotational: true },
          { name: 'sdb', sizeBytes: GIB },
          { name: 'nvme0n1', sizeBytes: 4 * GIB },
        ],
      });
      const inventory = await discoverInventory(machine.root);
      assert.deepEqual(
        inventory.interfaces.map((nic) => nic.macAddress),
        machine.macs,
      );
      assert.deepEqual(
        inventory.disks.map(({ name, devicePath, sizeBytes }) => ({ name, path: devicePath, sizeBytes })),
        [
          { name: 'nvme0n1', path: join(machine.root, 'dev/nvme0n1'), sizeBytes: 4 * GIB },
          { name: 'sda', path: join(machine.root, 'dev/sda'), sizeBytes: 2 * GIB },
          { name: 'sdb', path: join(machine.root, 'dev/sdb'), sizeBytes: GIB },
        ],
      );
      assert.deepEqual(
        inventory.disks.map((disk) => disk.rotational),
        [false, true, false],
      );
    });

    it('gives machines built from different indexes distinct MACs, serials and uuids', async () => {
      const dir = machineDir();
      const machines = await Promise.all([0, 1, 2, 1000].map((index) => uniqueFakeMachine(join(dir, String(index)), index)));
      const inventories = await Promise.all(machines.map((machine) => discoverInventory(machine.root)));
      const macs = inventories.flatMap((inventory) => inventory.interfaces.map((nic) => nic.macAddress));
      const serials = inventories.map((inventory) => inventory.system?.serialNumber);
      const uuids = inventories.map((inventory) => inventory.system?.uuid);
      const diskSerials = inventories.map((inventory) => inventory.disks[0]?.serial);
      assert.equal(macs.length, 8);
      for (const values of [macs, serials, uuids, diskSerials]) assert.equal(new Set(values).size, values.length, String(values));
      assert.deepEqual(
        inventories[3]?.interfaces.map((nic) => nic.macAddress),
        machines[3]?.macs,
      );
    });

    it('refuses a root that does not exist or has no sys/ folder', async () => {
      const missing = join(base, 'no-such-machine');
      await assert.rejects(discoverInventory(missing), { message: `sysfs/procfs root '${missing}' does not exist or has no sys/ folder` });
      const empty = machineDir();
      await mkdir(empty);
      await assert.rejects(discoverInventory(empty), { message: `sysfs/procfs root '${empty}' does not exist or has no sys/ folder` });
    });

    it('runs against the real machine', async () => {
      const inventory = await discoverInventory('/');
      assert.ok((inventory.memory?.totalBytes ?? 0) > 0);
      assert.ok((inventory.cpu?.count ?? 0) >= 1);
    });
  });
});
