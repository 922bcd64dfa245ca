/**
 * How the controller switches a machine on and off and picks what it boots
 * from, the way a BMC does. One driver instance per node, made from the
 * node's properties (controller/power/drivers.ts); `qemu` drives lab guests
 * through QMP, `fake` records actions for tests, and Redfish and IPMI
 * drivers go here later.
 */
export type PowerBootDevice = 'network' | 'disk';
export type PowerState = 'on' | 'off';

export interface PowerDriver {
  /** The driver's name, as in the node property power.driver: it names the driver in errors. */
  readonly name: string;
  /** Sets the boot device, then powers on from a fresh reset (a reset when already on). */
  powerOn(bootDevice: PowerBootDevice): Promise<void>;
  /** Hard power off; nothing when off. */
  powerOff(): Promise<void>;
  /** Hard reset; powers on when off. */
  reset(): Promise<void>;
  /** Boots from this at the next power on or reset. */
  setBootDevice(device: PowerBootDevice): Promise<void>;
  state(): Promise<PowerState>;
  /** Lets go of connections; the machine is left as it is. */
  close(): void;
}

/** A power action that failed; the message says through which driver and why. */
export class PowerError extends Error {
  override name = 'PowerError';
}
