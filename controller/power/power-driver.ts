/**
 * How the controller switches a machine on and off and picks what it boots
 * from, the way a BMC does. One driver instance per node, made from the
 * node's properties and secrets (controller/power/drivers.ts); `qemu` drives
 * lab guests through QMP, `fake` records actions for tests; `redfish` and
 * `ipmi` drive real BMCs, each in a folder of its own.
 */
/** What the machine boots from: its NIC (PXE/iPXE), its local disk, or a virtual CD the BMC attached. */
export type PowerBootDevice = 'network' | 'disk' | 'cd';
export type PowerState = 'on' | 'off';
/** The firmware mode a boot override asks for (node property boot.mode; default uefi). */
export type BootMode = 'uefi' | 'bios';

/** One line of `metalcast node validate`: a capability checked against the BMC, and what was found. */
export interface PowerValidation {
  /** What was checked, e.g. "credentials", "reset types", "boot override", "virtual media". */
  check: string;
  ok: boolean;
  /** What was found, or what to fix. */
  detail: string;
}

export interface PowerDriver {
  /** The driver's name, as in the node property power.driver: it names the driver in errors. */
  readonly name: string;
  /** Sets the boot device, then powers on from a fresh reset (a reset when already on). */
  powerOn(bootDevice: PowerBootDevice): Promise<void>;
  /** Hard power off; nothing when off. */
  powerOff(): Promise<void>;
  /** Asks the OS to shut down (ACPI), then powers off hard after the driver's timeout; drivers without it leave it out (callers use powerOff). */
  softPowerOff?(): Promise<void>;
  /** Hard reset; powers on when off. */
  reset(): Promise<void>;
  /** Boots from this at the next power on or reset. */
  setBootDevice(device: PowerBootDevice): Promise<void>;
  state(): Promise<PowerState>;
  /** Lets go of connections; the machine is left as it is. */
  close(): void;
  /** Attaches a CD image (virtual media) that the BMC fetches from `url`; drivers without virtual media leave it out. */
  insertMedia?(url: string): Promise<void>;
  /** Detaches the virtual CD; nothing when none is attached. */
  ejectMedia?(): Promise<void>;
  /** Checks reachability, credentials and capabilities without changing the machine's state. */
  validate?(): Promise<PowerValidation[]>;
}

/** A power action that failed; the message says through which driver and why. */
export class PowerError extends Error {
  override name = 'PowerError';
}
