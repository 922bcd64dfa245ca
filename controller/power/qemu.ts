import { QmpClient } from './qmp.js';
import {
  type BootMode,
  type PowerBootDevice,
  type PowerDriver,
  PowerError,
  type PowerState,
  type PowerValidation,
} from './power-driver.js';

/** Node properties the qemu driver reads. */
export const QMP_SOCKET_PROPERTY = 'power.qmp_socket';
export const QEMU_NIC_PROPERTY = 'power.qemu_nic';
/** The node's firmware mode (uefi|bios), shared by every driver. */
export const BOOT_MODE_PROPERTY = 'boot.mode';

const CONNECT_TIMEOUT_MS = 2000;

/**
 * Powers a QEMU guest through a QMP unix socket of its own, as a BMC would
 * (lab/qemu.ts starts guests with one: bmcSocketPath). QEMU must run with
 * -no-shutdown, so that off is "CPUs stopped": power off is `stop`, power on
 * `system_reset` then `cont`, reset `system_reset`. The boot device is the
 * NIC's bootindex (1: before the disk's 2; 3: after it), changed with
 * qom-set and read by the firmware at the next reset. One connection per
 * action: QEMU serves one client per socket, and a driver holds none
 * between actions.
 */
export class QemuPowerDriver implements PowerDriver {
  readonly name = 'qemu';

  constructor(
    private readonly socketPath: string,
    private readonly nicId = 'nic0',
    /** The node's boot.mode when set: QEMU's firmware is fixed at its start, so the driver checks it instead of setting it. */
    private readonly bootMode?: BootMode,
  ) {}

  /** The firmware the guest runs: OVMF has its flash drives (pflash0), SeaBIOS none. */
  private static async firmware(qmp: QmpClient): Promise<BootMode> {
    const blocks = await qmp.execute<{ device: string }[]>('query-block');
    return blocks.some((block) => block.device === 'pflash0') ? 'uefi' : 'bios';
  }

  /** PowerError when the node asks for a firmware mode its guest does not run. */
  private async checkBootMode(qmp: QmpClient): Promise<void> {
    if (!this.bootMode) return;
    const running = await QemuPowerDriver.firmware(qmp);
    if (running !== this.bootMode) {
      throw new PowerError(
        `the node has boot.mode=${this.bootMode}, but its QEMU guest runs ${running === 'uefi' ? 'OVMF (UEFI)' : 'SeaBIOS (BIOS)'}, and QEMU cannot switch firmware while it runs: start the guest with firmware '${this.bootMode}' (lab/qemu.ts), or set boot.mode=${running}`,
      );
    }
  }

  private async withQmp<T>(action: (qmp: QmpClient) => Promise<T>): Promise<T> {
    const qmp = await QmpClient.connect(this.socketPath, { timeoutMs: CONNECT_TIMEOUT_MS });
    try {
      return await action(qmp);
    } finally {
      qmp.close();
    }
  }

  private static async status(qmp: QmpClient): Promise<string> {
    return (await qmp.execute<{ status: string }>('query-status')).status;
  }

  private async bootIndex(qmp: QmpClient, device: PowerBootDevice): Promise<void> {
    if (device === 'cd')
      throw new PowerError('the qemu power driver boots from network or disk, not cd: give the node a redfish BMC for virtual media');
    const path = `/machine/peripheral/${this.nicId}`;
    const wanted = device === 'network' ? 1 : 3;
    // QEMU refuses to set an index the device already has ("already been used").
    if ((await qmp.execute<number>('qom-get', { path, property: 'bootindex' })) === wanted) return;
    await qmp.execute('qom-set', { path, property: 'bootindex', value: wanted });
  }

  powerOn(bootDevice: PowerBootDevice): Promise<void> {
    return this.withQmp(async (qmp) => {
      await this.checkBootMode(qmp);
      await this.bootIndex(qmp, bootDevice);
      const status = await QemuPowerDriver.status(qmp);
      // Fresh from -S the machine has never run; otherwise it starts over from a reset, as a power on does.
      if (status !== 'prelaunch') await qmp.execute('system_reset');
      if (status !== 'running') await qmp.execute('cont');
    });
  }

  powerOff(): Promise<void> {
    return this.withQmp(async (qmp) => {
      if ((await QemuPowerDriver.status(qmp)) === 'running') await qmp.execute('stop');
    });
  }

  reset(): Promise<void> {
    return this.withQmp(async (qmp) => {
      const status = await QemuPowerDriver.status(qmp);
      if (status !== 'prelaunch') await qmp.execute('system_reset');
      if (status !== 'running') await qmp.execute('cont');
    });
  }

  setBootDevice(device: PowerBootDevice): Promise<void> {
    return this.withQmp(async (qmp) => {
      await this.checkBootMode(qmp);
      await this.bootIndex(qmp, device);
    });
  }

  validate(): Promise<PowerValidation[]> {
    return this.withQmp(async (qmp) => {
      const running = await QemuPowerDriver.firmware(qmp);
      const ok = this.bootMode === undefined || this.bootMode === running;
      return [
        { check: 'QMP socket', ok: true, detail: `${this.socketPath} answers; the guest is ${await QemuPowerDriver.status(qmp)}` },
        {
          check: 'boot mode',
          ok,
          detail: `the guest runs ${running === 'uefi' ? 'OVMF (UEFI)' : 'SeaBIOS (BIOS)'}${this.bootMode ? `; the node asks for ${this.bootMode}` : ''}`,
        },
      ];
    });
  }

  state(): Promise<PowerState> {
    return this.withQmp(async (qmp) => ((await QemuPowerDriver.status(qmp)) === 'running' ? 'on' : 'off'));
  }

  close(): void {}
}
