import type { AgentGatewayServiceImplementation } from '../../gen/metalcast/v1/agent_gateway.js';
import type { ImageServer } from '../images/image-server.js';
import { createExchangeChunksHandler, type ExchangeDeps } from '../fanout/exchange.js';
import { createGetConfigDriveHandler } from './config-drive.js';
import { createHeartbeatHandler, type HeartbeatDeps } from './heartbeat.js';
import { createLookupHandler, type LookupDeps } from './lookup.js';

/** The service agents call: lookup, heartbeats, image reads, config drives and the fan-out tracker. */
export function createAgentGatewayService(
  deps: LookupDeps & HeartbeatDeps & { images: ImageServer; fanout: Omit<ExchangeDeps, 'store' | 'logger'> },
): AgentGatewayServiceImplementation {
  return {
    lookup: createLookupHandler(deps),
    heartbeat: createHeartbeatHandler(deps),
    statImage: deps.images.statImage,
    readImage: deps.images.readImage,
    getImageManifest: deps.images.getImageManifest,
    getConfigDrive: createGetConfigDriveHandler(deps),
    exchangeChunks: createExchangeChunksHandler({ ...deps.fanout, store: deps.store, logger: deps.logger }),
  };
}
