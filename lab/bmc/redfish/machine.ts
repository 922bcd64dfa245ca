/**
 * What a simulated BMC drives: the machine behind it. Two kinds: a QEMU
 * guest through its QMP socket (qmp-machine.ts, what `npm run lab` uses)
 * and a machine held in memory (below) for tests that exercise the BMC's
 * protocol and faults without booting anything.
 */

/** Redfish boot targets the simulated machines know. */
export type BootTarget = 'None' | 'Pxe' | 'Hdd' | 'Cd';

export interface SimulatedMachine {
  /** Whether the CPUs run. */
  isOn(): Promise<boolean>;
  /** From off: starts booting (the boot override applies). From on: nothing. */
  powerOn(): Promise<void>;
  /** Hard off. */
  powerOff(): Promise<void>;
  /** ACPI power button: the OS decides (a ramdisk may ignore it). */
  pressPowerButton(): Promise<void>;
  /** Hard reset; the boot override applies. */
  reset(): Promise<void>;
  /** What the next boot boots from; `once`: only the next one, then the machine's own order again. */
  setBootTarget(target: BootTarget, once: boolean): Promise<void>;
  /** Puts a CD image file in the drive (replacing any). */
  insertMedia(file: string): Promise<void>;
  ejectMedia(): Promise<void>;
  close(): void;
}

/** One thing a memory machine was asked to do. */
export type MachineAction =
  | 'power_on'
  | 'power_off'
  | 'power_button'
  | 'reset'
  | `boot:${BootTarget}:${'once' | 'continuous'}`
  | `insert:${string}`
  | 'eject';

/**
 * A machine in memory that records what it was asked. `acpi` false: the
 * power button does nothing (as with a ramdisk that has no ACPI daemon).
 * `boots` counts power ons and resets, and `bootedFrom` the device each
 * boot used, so that a test sees a "once" override consumed.
 */
export class MemoryMachine implements SimulatedMachine {
  readonly actions: MachineAction[] = [];
  readonly bootedFrom: BootTarget[] = [];
  on = false;
  acpi = true;
  medium: string | undefined;
  private target: BootTarget = 'None';
  private once = false;

  async isOn(): Promise<boolean> {
    return this.on;
  }

  async powerOn(): Promise<void> {
    this.actions.push('power_on');
    if (this.on) return;
    this.on = true;
    this.boot();
  }

  async powerOff(): Promise<void> {
    this.actions.push('power_off');
    this.on = false;
  }

  async pressPowerButton(): Promise<void> {
    this.actions.push('power_button');
    if (this.acpi) this.on = false;
  }

  async reset(): Promise<void> {
    this.actions.push('reset');
    this.on = true;
    this.boot();
  }

  async setBootTarget(target: BootTarget, once: boolean): Promise<void> {
    this.actions.push(`boot:${target}:${once ? 'once' : 'continuous'}`);
    this.target = target;
    this.once = once;
  }

  async insertMedia(file: string): Promise<void> {
    this.actions.push(`insert:${file}`);
    this.medium = file;
  }

  async ejectMedia(): Promise<void> {
    this.actions.push('eject');
    this.medium = undefined;
  }

  close(): void {}

  private boot(): void {
    this.bootedFrom.push(this.target);
    if (this.once) {
      this.target = 'None';
      this.once = false;
    }
  }
}
