import type { CallContext } from 'nice-grpc';
import { chunkCount } from '../../common/chunk-manifest.js';
import { invalidArgument, notFound, permissionDenied } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { truncate } from '../../common/mac.js';
import type { ExchangeChunksRequest, ExchangeChunksResponse } from '../../gen/metalcast/v1/fanout.js';
import type { ImageManifests } from '../images/manifest/manifests.js';
import { validateImageName } from '../images/validation.js';
import { authenticateAgent } from '../services/agent-auth.js';
import type { Store } from '../store/store.js';
import type { FanoutTracker } from './tracker.js';

export interface ExchangeDeps {
  store: Store;
  manifests: ImageManifests;
  tracker: FanoutTracker;
  logger: Logger;
}

/** Most assignments per exchange: an agent fetches a handful of chunks at once. */
const MAX_ASSIGNMENTS = 64;

/**
 * ExchangeChunks at the gRPC edge: the caller must be the agent of a node
 * being deployed with this image (as for ReadImage); fan-out must be on for
 * the controller and not turned off for the deploy. The rest is the
 * tracker's (controller/fanout/tracker.ts).
 */
export function createExchangeChunksHandler(deps: ExchangeDeps) {
  /** Chunk count by image content: a manifest read per exchange would be a database read per agent every few hundred ms. */
  const counts = new Map<string, number>();
  const disabled: ExchangeChunksResponse = {
    enabled: false,
    waveCredential: '',
    assignments: [],
    retryAfterMs: 0,
    maxUploads: 0,
    maxUploadBytesPerSecond: 0,
  };

  return async function exchangeChunks(request: ExchangeChunksRequest, context: CallContext): Promise<ExchangeChunksResponse> {
    validateImageName(request.image, 'image');
    const { node } = await authenticateAgent(context, deps.store, deps.logger);
    const deploying = node.provisionState === 'deploying' || node.provisionState === 'deploy_wait';
    const spec = node.deployJson ? (JSON.parse(node.deployJson) as { image?: string; fanoutDisabled?: boolean }) : undefined;
    if (!deploying || spec?.image !== request.image) {
      throw permissionDenied(
        `node ${node.uuid} is not being deployed with image '${truncate(request.image)}'; fan-out is only for the deploy image`,
      );
    }
    const policy = deps.tracker.policy;
    if (!policy.enabled || spec.fanoutDisabled === true) return disabled;
    // Serving peers need a pinned certificate to be trusted by; an agent without one (--insecure) only fetches.
    const image = await deps.store.getImage(request.image);
    if (!image) throw notFound(`image '${request.image}' does not exist on this controller`);
    let count = counts.get(image.sha256);
    if (count === undefined) {
      const manifest = await deps.manifests.get(image);
      count = chunkCount(manifest.sizeBytes, manifest.chunkSize);
      counts.set(image.sha256, count);
    }
    const bytes = Math.ceil(count / 8);
    if (request.heldChunks.length !== bytes || request.fetchingChunks.length !== bytes) {
      throw invalidArgument(
        `held_chunks and fetching_chunks: ${bytes} bytes each for the ${count} chunks of image '${image.name}', got ${request.heldChunks.length} and ${request.fetchingChunks.length}`,
      );
    }
    if (request.maxAssignments > MAX_ASSIGNMENTS) {
      throw invalidArgument(`max_assignments: at most ${MAX_ASSIGNMENTS}, got ${request.maxAssignments}`);
    }
    const out = deps.tracker.exchange({
      nodeUuid: node.uuid,
      address: node.agentAddress,
      certificatePem: node.agentCertificatePem ?? '',
      properties: node.properties,
      waveKey: `${image.name}@${image.sha256}`,
      chunkCount: count,
      held: request.heldChunks,
      fetching: request.fetchingChunks,
      maxAssignments: request.maxAssignments,
      failures: request.failures.slice(0, 256),
      bytesFromPeers: request.bytesFromPeers,
      bytesFromController: request.bytesFromController,
    });
    return {
      enabled: true,
      waveCredential: out.credential,
      assignments: out.assignments,
      retryAfterMs: out.retryAfterMs,
      maxUploads: policy.maxUploads,
      maxUploadBytesPerSecond: policy.maxUploadBytesPerSecond,
    };
  };
}
