import { unimplemented } from '../../common/errors.js';
import type { AgentGatewayServiceImplementation } from '../../gen/metalcast/v1/agent_gateway.js';
import { createHeartbeatHandler, type HeartbeatDeps } from './heartbeat.js';
import { createLookupHandler, type LookupDeps } from './lookup.js';

/** The service agents call: lookup and heartbeats now, image reads with the image-transfer work. */
export function createAgentGatewayService(deps: LookupDeps & HeartbeatDeps): AgentGatewayServiceImplementation {
  return {
    lookup: createLookupHandler(deps),
    heartbeat: createHeartbeatHandler(deps),
    async statImage() {
      throw unimplemented('StatImage is not implemented in this controller version yet (image transfer)');
    },
    // biome-ignore lint/correctness/useYield: answers before streaming anything.
    async *readImage() {
      throw unimplemented('ReadImage is not implemented in this controller version yet (image transfer)');
    },
  };
}
