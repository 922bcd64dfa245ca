import type { PowerBootDevice, PowerDriver, PowerState } from './power-driver.js';

/** One action a fake driver was asked for, in order. */
export type FakePowerAction = 'power_on' | 'power_off' | 'reset' | `boot_device:${PowerBootDevice}`;

/**
 * A power driver that keeps the machine's state in memory and records every
 * action, for tests. `failWith` makes every action fail with that message
 * until cleared.
 */
export class FakePowerDriver implements PowerDriver {
  readonly name = 'fake';
  readonly actions: FakePowerAction[] = [];
  power: PowerState = 'off';
  bootDevice: PowerBootDevice = 'disk';
  failWith: string | undefined;

  private check(): void {
    if (this.failWith !== undefined) throw new Error(this.failWith);
  }

  async powerOn(bootDevice: PowerBootDevice): Promise<void> {
    await this.setBootDevice(bootDevice);
    this.check();
    this.actions.push(this.power === 'on' ? 'reset' : 'power_on');
    this.power = 'on';
  }

  async powerOff(): Promise<void> {
    this.check();
    this.actions.push('power_off');
    this.power = 'off';
  }

  async reset(): Promise<void> {
    this.check();
    this.actions.push('reset');
    this.power = 'on';
  }

  async setBootDevice(device: PowerBootDevice): Promise<void> {
    this.check();
    this.actions.push(`boot_device:${device}`);
    this.bootDevice = device;
  }

  async state(): Promise<PowerState> {
    this.check();
    return this.power;
  }

  close(): void {}
}
