import { PowerError, type PowerDriver } from './power-driver.js';
import type { BootMode } from './power-driver.js';
import { BOOT_MODE_PROPERTY, QEMU_NIC_PROPERTY, QemuPowerDriver, QMP_SOCKET_PROPERTY } from './qemu.js';

/** The node property naming the power driver; a node without it is powered by hand. */
export const POWER_DRIVER_PROPERTY = 'power.driver';

/**
 * Makes a node's driver from the node's properties and its secrets (BMC
 * passwords, keyed like properties: power.redfish.password); throws a message
 * naming the property to fix, never a secret's value.
 */
export type PowerDriverFactory = (properties: Record<string, string>, secrets: Record<string, string>) => PowerDriver;

/**
 * The power drivers a controller knows, by name. `qemu` is built in; tests
 * register `fake`. Redfish and IPMI register here when they come.
 */
export class PowerDrivers {
  private readonly factories = new Map<string, PowerDriverFactory>([
    [
      'qemu',
      (properties) => {
        const socket = properties[QMP_SOCKET_PROPERTY];
        if (!socket) throw new Error(`the qemu power driver needs the property ${QMP_SOCKET_PROPERTY} (the QMP unix socket path)`);
        const mode = properties[BOOT_MODE_PROPERTY];
        if (mode !== undefined && mode !== '' && mode !== 'uefi' && mode !== 'bios') {
          throw new Error(`${BOOT_MODE_PROPERTY}=${mode} is not a boot mode: uefi or bios`);
        }
        return new QemuPowerDriver(socket, properties[QEMU_NIC_PROPERTY] || 'nic0', (mode || undefined) as BootMode | undefined);
      },
    ],
  ]);

  register(name: string, factory: PowerDriverFactory): this {
    this.factories.set(name, factory);
    return this;
  }

  /** The node's driver, undefined when the node has none (powered by hand); PowerError when its properties are wrong. */
  forNode(node: { name: string; properties: Record<string, string>; secrets?: Record<string, string> }): PowerDriver | undefined {
    const name = node.properties[POWER_DRIVER_PROPERTY];
    if (name === undefined || name === '') return undefined;
    const factory = this.factories.get(name);
    if (!factory) {
      throw new PowerError(
        `node '${node.name}' has ${POWER_DRIVER_PROPERTY}=${name}, which is not a power driver; known: ${[...this.factories.keys()].join(', ')}`,
      );
    }
    try {
      return factory(node.properties, node.secrets ?? {});
    } catch (error) {
      throw new PowerError(`node '${node.name}': ${(error as Error).message}`);
    }
  }
}
