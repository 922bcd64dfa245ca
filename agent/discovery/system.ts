import { join } from 'node:path';
import type { SystemIdentity } from '../../gen/metalcast/v1/inventory.js';
import { readAttribute } from './sysfs.js';

/**
 * Strings firmware vendors leave in DMI fields they did not fill in. Reported
 * as-is they would give thousands of machines the same "serial", so they are
 * treated as empty. Compared case-insensitively.
 */
const PLACEHOLDERS = new Set(
  [
    'to be filled by o.e.m.',
    'default string',
    'system serial number',
    'chassis serial number',
    'not specified',
    'not applicable',
    'none',
    '0123456789',
    '00000000-0000-0000-0000-000000000000',
    'ffffffff-ffff-ffff-ffff-ffffffffffff',
  ].map((s) => s.toLowerCase()),
);

/**
 * Vendor, product, serial and UUID from <root>/sys/class/dmi/id. The serial
 * and UUID are readable by root only, and machines without DMI (most arm64
 * boards) have no folder at all: either way the fields are ''. The serial
 * falls back to the chassis serial, which some vendors fill in instead.
 */
export async function discoverSystem(root: string): Promise<SystemIdentity> {
  const dmi = join(root, 'sys', 'class', 'dmi', 'id');
  const read = async (name: string) => clean(await readAttribute(join(dmi, name)));
  const [vendor, productName, productSerial, chassisSerial, uuid] = await Promise.all([
    read('sys_vendor'),
    read('product_name'),
    read('product_serial'),
    read('chassis_serial'),
    read('product_uuid'),
  ]);
  return {
    vendor,
    productName,
    serialNumber: productSerial || chassisSerial,
    uuid: uuid.toLowerCase(),
  };
}

function clean(value: string | undefined): string {
  return value === undefined || PLACEHOLDERS.has(value.toLowerCase()) ? '' : value;
}
