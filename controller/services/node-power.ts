import { Status } from 'nice-grpc-common';
import { MetalcastError, notFound } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import {
  BootDevice,
  NodePowerState,
  type NodeServiceImplementation,
  PowerAction,
  type NodeValidation,
} from '../../gen/metalcast/v1/node.js';
import type { PowerDrivers } from '../power/drivers.js';
import type { PowerBootDevice, PowerDriver, PowerState } from '../power/power-driver.js';
import type { NodeLocks } from '../provisioning/locks.js';
import type { NodeRecord, Store } from '../store/store.js';
import { validateNodeRef } from './validation.js';

export interface NodePowerDeps {
  store: Store;
  locks: NodeLocks;
  power: PowerDrivers;
  logger: Logger;
}

type PowerMethods = Pick<NodeServiceImplementation, 'setNodePower' | 'getNodePower' | 'validateNode'>;

const ACTIONS: Partial<Record<PowerAction, 'on' | 'off' | 'reset' | 'soft off'>> = {
  [PowerAction.POWER_ACTION_ON]: 'on',
  [PowerAction.POWER_ACTION_OFF]: 'off',
  [PowerAction.POWER_ACTION_RESET]: 'reset',
  [PowerAction.POWER_ACTION_SOFT_OFF]: 'soft off',
};

const DEVICES: Partial<Record<BootDevice, PowerBootDevice>> = {
  [BootDevice.BOOT_DEVICE_UNSPECIFIED]: 'disk',
  [BootDevice.BOOT_DEVICE_NETWORK]: 'network',
  [BootDevice.BOOT_DEVICE_DISK]: 'disk',
  [BootDevice.BOOT_DEVICE_CD]: 'cd',
};

const stateToProto = (state: PowerState) => (state === 'on' ? NodePowerState.NODE_POWER_STATE_ON : NodePowerState.NODE_POWER_STATE_OFF);
const failed = (message: string) => new MetalcastError(Status.FAILED_PRECONDITION, message);

/**
 * The operator's power calls (`metalcast node power`, `metalcast node
 * validate`): through the node's power driver, as the conductor would. A
 * power action holds the node's lock (it fails at once while a step runs,
 * rather than power off a machine mid-deploy) and goes into the node's
 * history; a BMC's refusal is FAILED_PRECONDITION carrying what it said.
 */
export function createNodePowerMethods(deps: NodePowerDeps): PowerMethods {
  const { store, locks, power } = deps;

  async function requireNode(ref: string): Promise<NodeRecord> {
    const node = await store.getNode(validateNodeRef(ref));
    if (!node) throw notFound(`node '${ref}' not found; metalcast node list shows the enrolled nodes`);
    return node;
  }

  /** The node's driver; FAILED_PRECONDITION when it has none or its settings are wrong. */
  function driverOf(node: NodeRecord): PowerDriver {
    let driver: PowerDriver | undefined;
    try {
      driver = power.forNode(node);
    } catch (error) {
      throw failed(`${(error as Error).message}; fix it with metalcast node set ${node.name}`);
    }
    if (!driver)
      throw failed(
        `node '${node.name}' has no power driver (property power.driver): it is powered by hand; give it one with metalcast node set`,
      );
    return driver;
  }

  return {
    async setNodePower(request) {
      validateNodeRef(request.node);
      const action = ACTIONS[request.action];
      if (!action) throw new MetalcastError(Status.INVALID_ARGUMENT, 'action: must be one of on, off, reset, soft off');
      const device = DEVICES[request.bootDevice];
      if (!device) throw new MetalcastError(Status.INVALID_ARGUMENT, `boot_device: ${request.bootDevice} is not a boot device`);
      const node = await requireNode(request.node);
      const driver = driverOf(node);
      const what = action === 'on' ? `power on (boot from ${device})` : `power ${action}`;
      const lock = await locks.lock(node.uuid, what);
      try {
        try {
          if (action === 'on') await driver.powerOn(device);
          else if (action === 'off') await driver.powerOff();
          else if (action === 'reset') await driver.reset();
          else if (driver.softPowerOff) await driver.softPowerOff();
          else await driver.powerOff();
          const state = await driver.state();
          await store.addEvent(node.uuid, {
            kind: 'power',
            message: `${what} through ${driver.name}: now ${state}`,
            actor: 'operator',
            fromState: null,
            toState: null,
          });
          deps.logger.info({ node: node.uuid, nodeName: node.name, action, device, driver: driver.name, state }, 'power action');
          return { powerState: stateToProto(state), driver: driver.name };
        } catch (error) {
          const reason = `${what} through ${driver.name} failed: ${(error as Error).message}`;
          await store
            .addEvent(node.uuid, { kind: 'power', message: reason, actor: 'operator', fromState: null, toState: null })
            .catch(() => {});
          deps.logger.warn({ node: node.uuid, nodeName: node.name, reason }, 'power action failed');
          throw failed(reason);
        }
      } finally {
        driver.close();
        await lock.release();
      }
    },

    async getNodePower(request) {
      const node = await requireNode(request.node);
      const driver = driverOf(node);
      try {
        return { powerState: stateToProto(await driver.state()), driver: driver.name };
      } catch (error) {
        throw failed(`reading the power state through ${driver.name} failed: ${(error as Error).message}`);
      } finally {
        driver.close();
      }
    },

    async validateNode(request) {
      const node = await requireNode(request.node);
      const checks: NodeValidation[] = [];
      let driver: PowerDriver | undefined;
      try {
        driver = power.forNode(node);
        if (!driver) {
          return {
            driver: '',
            checks: [
              { check: 'power settings', ok: false, detail: 'no power driver (property power.driver): the node is powered by hand' },
            ],
          };
        }
        checks.push({ check: 'power settings', ok: true, detail: `${driver.name} driver` });
      } catch (error) {
        return {
          driver: node.properties['power.driver'] ?? '',
          checks: [{ check: 'power settings', ok: false, detail: (error as Error).message }],
        };
      }
      try {
        if (!driver.validate) {
          checks.push({ check: 'BMC', ok: true, detail: `the ${driver.name} driver has nothing more to check` });
        } else {
          for (const row of await driver.validate()) checks.push({ check: row.check, ok: row.ok, detail: row.detail });
        }
      } finally {
        driver.close();
      }
      deps.logger.info(
        { node: node.uuid, nodeName: node.name, driver: driver.name, failed: checks.filter((c) => !c.ok).map((c) => c.check) },
        'node validated',
      );
      return { driver: driver.name, checks };
    },
  };
}
