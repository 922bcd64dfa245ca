import { QmpClient } from './qmp.js';
import { type PowerBootDevice, type PowerDriver, PowerError, type PowerState } from './power-driver.js';

/** Node properties the qemu driver reads. */
export const QMP_SOCKET_PROPERTY = 'power.qmp_socket';
export const QEMU_NIC_PROPERTY = 'power.qemu_nic';

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
  ) {}

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
    return this.withQmp((qmp) => this.bootIndex(qmp, device));
  }

  state(): Promise<PowerState> {
    return this.withQmp(async (qmp) => ((await QemuPowerDriver.status(qmp)) === 'running' ? 'on' : 'off'));
  }

  close(): void {}
}
