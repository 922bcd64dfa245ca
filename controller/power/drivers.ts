import { grubArguments } from '../boot/agent-iso.js';
import type { SecretBox } from '../secrets/secret-box.js';
import { ipmiDriverFromNode } from './ipmi/ipmi-driver.js';
import { PowerError, type PowerDriver } from './power-driver.js';
import type { BootMode } from './power-driver.js';
import { BOOT_MODE_PROPERTY, QEMU_NIC_PROPERTY, QemuPowerDriver, QMP_SOCKET_PROPERTY } from './qemu.js';

/** The node property naming the power driver; a node without it is powered by hand. */
export const POWER_DRIVER_PROPERTY = 'power.driver';
/** How a node boots into the agent: `network` (PXE/iPXE, the default) or `virtual-media` (a CD its BMC inserts). */
export const BOOT_METHOD_PROPERTY = 'boot.method';
export const BOOT_METHODS = ['network', 'virtual-media'] as const;
/** Extra agent kernel arguments (controller/boot/boot-endpoint.ts names it too; kept here so that power needs nothing of boot but the ISO's rules). */
const KERNEL_ARGS_PROPERTY = 'boot.kernel_args';

/**
 * Makes a node's driver from the node's properties and its secrets (BMC
 * passwords, keyed like properties: power.redfish.password); throws a message
 * naming the property to fix, never a secret's value. A factory does no I/O:
 * it is also how the API checks a node's power settings when they are set.
 */
export type PowerDriverFactory = (properties: Record<string, string>, secrets: Record<string, string>) => PowerDriver;

/** What forNode needs of a node. */
export interface PowerNode {
  name: string;
  properties: Record<string, string>;
  /**
   * The node's secrets by name: as the store keeps them (sealed) when these
   * drivers were given the controller's SecretBox (useSecrets), plain otherwise.
   */
  secrets?: Record<string, string>;
}

/**
 * The power drivers a controller knows, by name. `qemu` is built in; tests
 * register `fake`; `ipmi` is built in too; `redfish` registers in the controller's wiring.
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
    // Stateless but for the per-BMC pacing in ipmitool.ts, so built in like qemu.
    ['ipmi', (properties, secrets) => ipmiDriverFromNode(properties, secrets)],
  ]);
  private box: SecretBox | undefined;

  register(name: string, factory: PowerDriverFactory): this {
    this.factories.set(name, factory);
    return this;
  }

  /** Whether a driver of this name is registered. */
  has(name: string): boolean {
    return this.factories.has(name);
  }

  /** From now on, node secrets handed to forNode are sealed by this box, and opened here just before a driver is made. */
  useSecrets(box: SecretBox): this {
    this.box = box;
    return this;
  }

  /** The node's driver, undefined when the node has none (powered by hand); PowerError when its settings are wrong. */
  forNode(node: PowerNode): PowerDriver | undefined {
    const factory = this.factoryFor(node);
    if (!factory) return undefined;
    try {
      const secrets = this.box ? this.box.openAll(node.secrets ?? {}) : (node.secrets ?? {});
      return factory(node.properties, secrets);
    } catch (error) {
      throw new PowerError(`node '${node.name}': ${(error as Error).message}`);
    }
  }

  /**
   * Checks a node's power settings without touching its BMC: the driver is
   * made (with stand-ins for secrets that are set) and let go. PowerError
   * naming what to fix, as forNode would throw it at power time.
   */
  check(node: { name: string; properties: Record<string, string>; secretKeys: readonly string[] }): void {
    const method = node.properties[BOOT_METHOD_PROPERTY];
    if (method !== undefined && !(BOOT_METHODS as readonly string[]).includes(method))
      throw new PowerError(`node '${node.name}': ${BOOT_METHOD_PROPERTY} '${method}' is not one of ${BOOT_METHODS.join(', ')}`);
    const factory = this.factoryFor(node);
    if (!factory) {
      if (method === 'virtual-media')
        throw new PowerError(
          `node '${node.name}': ${BOOT_METHOD_PROPERTY}=virtual-media needs a power driver with virtual media (redfish)`,
        );
      return;
    }
    let driver: PowerDriver | undefined;
    try {
      driver = factory(node.properties, Object.fromEntries(node.secretKeys.map((key) => [key, 'stand-in'])));
    } catch (error) {
      throw new PowerError(`node '${node.name}': ${(error as Error).message}`);
    } finally {
      driver?.close();
    }
    if (method === 'virtual-media' && !driver.insertMedia)
      throw new PowerError(
        `node '${node.name}': ${BOOT_METHOD_PROPERTY}=virtual-media needs a power driver with virtual media; the ${driver.name} driver has none (use redfish, or boot.method=network)`,
      );
    // The agent ISO's GRUB cannot pass every kernel parameter unchanged: refused now rather than at the node's next boot.
    const kernelArgs = node.properties[KERNEL_ARGS_PROPERTY];
    if (method === 'virtual-media' && kernelArgs) {
      try {
        grubArguments(kernelArgs);
      } catch (error) {
        throw new PowerError(`node '${node.name}': ${KERNEL_ARGS_PROPERTY}: ${(error as Error).message}`);
      }
    }
  }

  private factoryFor(node: { name: string; properties: Record<string, string> }): PowerDriverFactory | undefined {
    const name = node.properties[POWER_DRIVER_PROPERTY];
    if (name === undefined || name === '') return undefined;
    const factory = this.factories.get(name);
    if (!factory) {
      throw new PowerError(
        `node '${node.name}' has ${POWER_DRIVER_PROPERTY}=${name}, which is not a power driver; known: ${[...this.factories.keys()].join(', ')}`,
      );
    }
    return factory;
  }
}
