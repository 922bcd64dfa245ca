import type { CallContext } from 'nice-grpc';
import { failedPrecondition } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type { GetConfigDriveRequest, GetConfigDriveResponse } from '../../gen/metalcast/v1/agent_gateway.js';
import type { Store } from '../store/store.js';
import { authenticateAgent } from './agent-auth.js';

/**
 * GetConfigDrive: the caller's own node's config drive, only while that
 * node is being deployed. It carries the user data, which may hold secrets:
 * it goes to the node's agent alone (authenticated by its token), and
 * neither it nor its contents are logged.
 */
export function createGetConfigDriveHandler(deps: { store: Store; logger: Logger }) {
  return async (_request: GetConfigDriveRequest, context: CallContext): Promise<GetConfigDriveResponse> => {
    const { node } = await authenticateAgent(context, deps.store, deps.logger);
    if (node.provisionState !== 'deploy_wait' && node.provisionState !== 'deploying') {
      throw failedPrecondition(
        `node ${node.uuid} is ${node.provisionState.replaceAll('_', ' ')}; its config drive is served only while it is being deployed`,
      );
    }
    const drive = await deps.store.getConfigDrive(node.uuid);
    if (!drive) throw failedPrecondition(`the deploy of node ${node.uuid} has no config drive`);
    deps.logger.info({ node: node.uuid, sha256: drive.sha256, sizeBytes: drive.sizeBytes }, 'config drive served');
    return { gzip: drive.gzip, sha256: drive.sha256, sizeBytes: drive.sizeBytes };
  };
}
