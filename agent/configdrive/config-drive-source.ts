import { agentMetadata } from '../../common/agent-metadata.js';
import type { GetConfigDriveResponse } from '../../gen/metalcast/v1/agent_gateway.js';
import { type ControllerLink, isConnectionError } from '../controller/controller-link.js';
import type { HeartbeatIdentity } from '../controller/heartbeat.js';

/** Where write_config_drive gets the config drive: the controller's GetConfigDrive. */
export interface ConfigDriveSource {
  fetch(signal: AbortSignal): Promise<GetConfigDriveResponse>;
}

export function controllerConfigDriveSource(
  link: ControllerLink,
  identity: () => HeartbeatIdentity | undefined,
  callTimeoutMs: number,
): ConfigDriveSource {
  return {
    async fetch(signal) {
      const id = identity();
      if (!id) throw new Error('the agent has no token (lookup has not finished)');
      try {
        return await link.gateway.getConfigDrive({}, { metadata: agentMetadata(id.nodeUuid, id.token), deadline: callTimeoutMs, signal });
      } catch (error) {
        if (isConnectionError(error)) link.next('config drive download could not connect');
        throw error;
      }
    },
  };
}
