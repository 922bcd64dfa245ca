import type { AgentGatewayServiceImplementation } from '../../gen/metalcast/v1/agent_gateway.js';
import type { ImageServer } from '../images/image-server.js';
import { createGetConfigDriveHandler } from './config-drive.js';
import { createHeartbeatHandler, type HeartbeatDeps } from './heartbeat.js';
import { createLookupHandler, type LookupDeps } from './lookup.js';

/** The service agents call: lookup, heartbeats, image reads, and config drives. */
export function createAgentGatewayService(deps: LookupDeps & HeartbeatDeps & { images: ImageServer }): AgentGatewayServiceImplementation {
  return {
    lookup: createLookupHandler(deps),
    heartbeat: createHeartbeatHandler(deps),
    statImage: deps.images.statImage,
    readImage: deps.images.readImage,
    getImageManifest: deps.images.getImageManifest,
    getConfigDrive: createGetConfigDriveHandler(deps),
  };
}
