import type { Logger } from '../../../common/logging.js';
import { BOOT_METHOD_PROPERTY, type PowerDriverFactory } from '../drivers.js';
import { RedfishPowerDriver } from './driver.js';
import type { RedfishConnections } from './pool.js';
import { redfishSettings } from './settings.js';

/** The `redfish` power driver, made from a node's power.redfish.* properties and its secret power.redfish.password. */
export function redfishDriverFactory(connections: RedfishConnections, logger: Logger): PowerDriverFactory {
  return (properties, secrets) => {
    const method = properties[BOOT_METHOD_PROPERTY] || 'network';
    if (method !== 'network' && method !== 'virtual-media')
      throw new Error(`${BOOT_METHOD_PROPERTY}: '${method}' is not one of network, virtual-media`);
    return new RedfishPowerDriver(redfishSettings(properties, secrets), connections, { bootMethod: method }, logger);
  };
}
