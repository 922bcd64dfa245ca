import { QmpClient } from '../../qmp.js';
import type { BootTarget, SimulatedMachine } from './machine.js';

/** QEMU device ids of a lab guest (lab/qemu.ts): the NIC, and the CD drive when the guest has one. */
export interface QmpMachineDevices {
  nic: string;
  cdrom?: string | undefined;
}

/** Boot indexes per target: the disk keeps 2; the NIC moves between 1 and 3, the CD between 0 and 4, so no two ever share one. */
const INDEXES: Record<Exclude<BootTarget, 'None'>, { nic: number; cd: number }> = {
  Pxe: { nic: 1, cd: 4 },
  Hdd: { nic: 3, cd: 4 },
  Cd: { nic: 3, cd: 0 },
};

/** How long after a RESET no further one may come before a "once" override counts as used (see QmpMachine). */
const ONCE_SETTLE_MS = 10_000;

/**
 * A lab guest as the machine behind a simulated BMC, through the guest's
 * own QMP socket (lab/qemu.ts bmcSocketPath; QEMU serves one client per
 * socket, and this one keeps it for the events).
 *
 * - On is "CPUs running"; power on is system_reset then cont (the reset
 *   rebuilds the firmware's boot order from the bootindex properties), off
 *   is stop (the guest runs with -no-shutdown), the power button is
 *   system_powerdown (ACPI);
 * - the boot target moves the NIC's and the CD's bootindex (qom-set); QEMU
 *   builds the firmware's boot order from them at every reset. A "once"
 *   override is put back to the machine's own order ONCE_SETTLE_MS after the
 *   last of the RESET events that follow it (a power on, a reset, or the
 *   guest rebooting itself): not at the first, because SeaBIOS, started
 *   again in a machine that already ran (RAM kept, as QEMU's system_reset
 *   keeps it), resets the machine once more itself, and that second reset
 *   builds the boot order the firmware then reads; put back at the first,
 *   the override was gone by then and a running machine restarted into its
 *   own order (the disk, then the NIC) instead of the CD;
 * - media: blockdev-change-medium on the CD device (read-only), eject.
 */
export class QmpMachine implements SimulatedMachine {
  private qmp: QmpClient | undefined;
  private connecting: Promise<QmpClient> | undefined;
  /** The machine's own order (its "BIOS setting"), and an override waiting for a reset. */
  private persistent: Exclude<BootTarget, 'None'>;
  private onceTarget: Exclude<BootTarget, 'None'> | undefined;
  /** Pending put-back of a used "once" override. */
  private settle: NodeJS.Timeout | undefined;

  constructor(
    private readonly socketPath: string,
    private readonly devices: QmpMachineDevices,
    /** The order the guest was started with. */
    initial: 'Pxe' | 'Hdd' = 'Pxe',
  ) {
    this.persistent = initial;
  }

  private async client(): Promise<QmpClient> {
    if (this.qmp?.open) return this.qmp;
    this.connecting ??= QmpClient.connect(this.socketPath, { timeoutMs: 5000 })
      .then((qmp) => {
        this.qmp = qmp;
        qmp.onEvent((event) => {
          if (event.event === 'RESET' && this.onceTarget) {
            // Every further RESET (the firmware's own) starts the wait again.
            clearTimeout(this.settle);
            this.settle = setTimeout(() => {
              this.settle = undefined;
              if (!this.onceTarget) return;
              this.onceTarget = undefined;
              void this.applyIndexes(this.persistent).catch(() => {});
            }, ONCE_SETTLE_MS);
            this.settle.unref();
          }
        });
        return qmp;
      })
      .finally(() => {
        this.connecting = undefined;
      });
    return this.connecting;
  }

  private async status(): Promise<string> {
    return (await (await this.client()).execute<{ status: string }>('query-status')).status;
  }

  async isOn(): Promise<boolean> {
    return (await this.status()) === 'running';
  }

  async powerOn(): Promise<void> {
    if (await this.isOn()) return;
    await this.resetAndRun();
  }

  async powerOff(): Promise<void> {
    if (await this.isOn()) await (await this.client()).execute('stop');
  }

  async pressPowerButton(): Promise<void> {
    if (await this.isOn()) await (await this.client()).execute('system_powerdown');
  }

  async reset(): Promise<void> {
    await this.resetAndRun();
  }

  /** system_reset, wait for its RESET event (the boot order is built then), then run. */
  private async resetAndRun(): Promise<void> {
    const qmp = await this.client();
    const since = qmp.events.length;
    await qmp.execute('system_reset');
    await qmp.waitForEvent('RESET', 10_000, since);
    if ((await this.status()) !== 'running') await qmp.execute('cont');
  }

  async setBootTarget(target: BootTarget, once: boolean): Promise<void> {
    // A new override replaces one still waiting to be put back.
    clearTimeout(this.settle);
    this.settle = undefined;
    if (target === 'None') {
      this.onceTarget = undefined;
      await this.applyIndexes(this.persistent);
      return;
    }
    if (target === 'Cd' && !this.devices.cdrom) throw new Error('this machine has no CD drive');
    if (once) this.onceTarget = target;
    else {
      this.onceTarget = undefined;
      this.persistent = target;
    }
    await this.applyIndexes(target);
  }

  private async applyIndexes(target: Exclude<BootTarget, 'None'>): Promise<void> {
    const qmp = await this.client();
    const wanted = INDEXES[target];
    const set = async (id: string, value: number) => {
      const path = `/machine/peripheral/${id}`;
      // QEMU refuses an index a device already has, and any that another device has.
      if ((await qmp.execute<number>('qom-get', { path, property: 'bootindex' })) !== value)
        await qmp.execute('qom-set', { path, property: 'bootindex', value });
    };
    // Moving away first keeps the two apart at every step.
    if (this.devices.cdrom) await set(this.devices.cdrom, 4);
    await set(this.devices.nic, wanted.nic);
    if (this.devices.cdrom) await set(this.devices.cdrom, wanted.cd);
  }

  async insertMedia(file: string): Promise<void> {
    if (!this.devices.cdrom) throw new Error('this machine has no CD drive');
    await (await this.client()).execute('blockdev-change-medium', {
      id: this.devices.cdrom,
      filename: file,
      format: 'raw',
      'read-only-mode': 'read-only',
    });
  }

  async ejectMedia(): Promise<void> {
    if (!this.devices.cdrom) return;
    await (await this.client()).execute('eject', { id: this.devices.cdrom, force: true });
  }

  close(): void {
    clearTimeout(this.settle);
    this.qmp?.close();
    this.qmp = undefined;
  }
}
