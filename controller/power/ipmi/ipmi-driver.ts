import type { BootMode, PowerBootDevice, PowerDriver, PowerState, PowerValidation } from '../power-driver.js';
import { IpmiError, Ipmitool, type IpmitoolOptions } from './ipmitool.js';

/** Node properties the ipmi driver reads. */
export const IPMI_ADDRESS_PROPERTY = 'power.ipmi.address';
export const IPMI_PORT_PROPERTY = 'power.ipmi.port';
export const IPMI_USERNAME_PROPERTY = 'power.ipmi.username';
export const IPMI_CIPHER_SUITE_PROPERTY = 'power.ipmi.cipher_suite';
/** The node secret holding the BMC password. */
export const IPMI_PASSWORD_SECRET = 'power.ipmi.password';
/** The firmware mode boot overrides ask for: uefi (default) or bios. */
export const BOOT_MODE_PROPERTY = 'boot.mode';

/** ipmitool's names for our boot devices (`chassis bootdev …`). */
const BOOTDEV: Record<PowerBootDevice, string> = { network: 'pxe', disk: 'disk', cd: 'cdrom' };

/**
 * Powers a machine through its BMC over IPMI v2.0, with Debian's ipmitool
 * (controller/power/ipmi/ipmitool.ts: password through the environment,
 * cipher suite, per-BMC pacing, timeouts, bounded retries). Boot device
 * overrides are `chassis bootdev pxe|disk|cdrom` with `options=persistent`
 * (so that a reboot the OS starts keeps the choice) and `efiboot` when the
 * node's boot.mode is uefi.
 */
export class IpmiPowerDriver implements PowerDriver {
  readonly name = 'ipmi';

  constructor(
    private readonly tool: Ipmitool,
    private readonly bootMode: BootMode = 'uefi',
  ) {}

  async powerOn(bootDevice: PowerBootDevice): Promise<void> {
    await this.setBootDevice(bootDevice);
    // A power on from a fresh reset: a machine already on is reset, so that it boots the device just set.
    await this.tool.run(['chassis', 'power', (await this.state()) === 'on' ? 'reset' : 'on']);
  }

  async powerOff(): Promise<void> {
    if ((await this.state()) === 'off') return;
    await this.tool.run(['chassis', 'power', 'off']);
  }

  async reset(): Promise<void> {
    await this.tool.run(['chassis', 'power', (await this.state()) === 'on' ? 'reset' : 'on']);
  }

  async setBootDevice(device: PowerBootDevice): Promise<void> {
    const options = ['persistent', ...(this.bootMode === 'uefi' ? ['efiboot'] : [])];
    try {
      await this.tool.run(['chassis', 'bootdev', BOOTDEV[device], `options=${options.join(',')}`]);
    } catch (error) {
      if (error instanceof IpmiError && error.kind === 'refused') {
        throw new IpmiError(
          `${error.message}. The BMC refused the boot device override (Set System Boot Options, ${BOOTDEV[device]}): it may not support booting from ${device} by IPMI; set the machine's boot order in its firmware instead`,
          'refused',
        );
      }
      throw error;
    }
  }

  async state(): Promise<PowerState> {
    const out = await this.tool.run(['chassis', 'power', 'status']);
    if (/Chassis Power is on/i.test(out)) return 'on';
    if (/Chassis Power is off/i.test(out)) return 'off';
    throw new IpmiError(`${this.tool.label}: 'chassis power status' answered '${out.trim()}', neither on nor off`, 'refused');
  }

  close(): void {}

  async validate(): Promise<PowerValidation[]> {
    const results: PowerValidation[] = [];
    try {
      const state = await this.state();
      results.push({ check: 'credentials', ok: true, detail: `logged in; the machine is ${state}` });
    } catch (error) {
      results.push({ check: 'credentials', ok: false, detail: (error as Error).message });
      return results;
    }
    try {
      const out = await this.tool.run(['chassis', 'bootparam', 'get', '5']);
      const selector = /Boot Device Selector\s*:\s*(.+)/i.exec(out)?.[1]?.trim() ?? 'readable';
      results.push({ check: 'boot override', ok: true, detail: `boot flags readable (${selector})` });
    } catch (error) {
      results.push({ check: 'boot override', ok: false, detail: (error as Error).message });
    }
    results.push({ check: 'virtual media', ok: false, detail: 'IPMI has no virtual media: use boot.method=network' });
    return results;
  }
}

/**
 * The `ipmi` driver from a node's properties and secrets; throws a message
 * naming the property to fix (never a secret's value).
 */
export function ipmiDriverFromNode(
  properties: Record<string, string>,
  secrets: Record<string, string>,
  options: IpmitoolOptions = {},
): IpmiPowerDriver {
  const address = properties[IPMI_ADDRESS_PROPERTY]?.trim() ?? '';
  if (address === '' || /\s/.test(address) || address.startsWith('-'))
    throw new Error(`the ipmi power driver needs ${IPMI_ADDRESS_PROPERTY}: the BMC's host name or IP address`);
  const port = numberProperty(properties, IPMI_PORT_PROPERTY, 623, 1, 65_535);
  const cipherSuite = numberProperty(properties, IPMI_CIPHER_SUITE_PROPERTY, 3, 0, 255);
  const username = properties[IPMI_USERNAME_PROPERTY] ?? '';
  if (username.startsWith('-') || username.length > 16)
    throw new Error(`${IPMI_USERNAME_PROPERTY}: '${username}' is not an IPMI user name (at most 16 characters)`);
  const password = secrets[IPMI_PASSWORD_SECRET];
  if (password === undefined) throw new Error(`the ipmi power driver needs the node secret ${IPMI_PASSWORD_SECRET}`);
  const mode = properties[BOOT_MODE_PROPERTY] || 'uefi';
  if (mode !== 'uefi' && mode !== 'bios') throw new Error(`${BOOT_MODE_PROPERTY}: '${mode}' is neither uefi nor bios`);
  return new IpmiPowerDriver(new Ipmitool({ address, port, username, password, cipherSuite }, options), mode);
}

function numberProperty(properties: Record<string, string>, key: string, fallback: number, min: number, max: number): number {
  const raw = properties[key]?.trim() ?? '';
  if (raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < min || value > max)
    throw new Error(`${key}: '${raw}' is not a whole number from ${min} to ${max}`);
  return value;
}
