import { agentMetadata, agentMetadataFields } from '../../common/agent-metadata.js';
import type { GetImageManifestResponse, ReadImageResponse, StatImageResponse } from '../../gen/metalcast/v1/agent_gateway.js';
import type { ExchangeChunksRequest, ExchangeChunksResponse } from '../../gen/metalcast/v1/fanout.js';
import { type ControllerLink, isConnectionError } from '../controller/controller-link.js';
import type { HeartbeatIdentity } from '../controller/heartbeat.js';
import type { LaneEndpoint } from './lanes/lane-protocol.js';

/** Where the image writer gets its bytes: the controller's StatImage and ReadImage, as the writer needs them. */
export interface ImageSource {
  stat(image: string, signal: AbortSignal): Promise<StatImageResponse>;
  /** Chunks from `offset` to the end of the image, or of `length` bytes when given; aborting the signal cancels the call. */
  read(image: string, offset: number, signal: AbortSignal, length?: number): AsyncIterable<ReadImageResponse>;
  /** The image's chunk manifest in pages from `firstChunk` (agent/imaging/chunked-writer.ts); absent when the source has none. */
  manifest?(image: string, firstChunk: number, signal: AbortSignal): AsyncIterable<GetImageManifestResponse>;
  /** The fan-out tracker's ExchangeChunks (agent/fanout/peer-fetcher.ts); absent when the source has none. */
  exchange?(request: ExchangeChunksRequest, signal: AbortSignal): Promise<ExchangeChunksResponse>;
  /** Told about a failed call, so that connection errors move to the next controller. */
  failed(error: unknown): void;
  /**
   * How a lane worker opens its own connection to the same controller
   * (agent/imaging/lanes); absent: every read stays on the agent's thread.
   */
  lanes?(): { endpoint: LaneEndpoint; metadata: () => Record<string, string> };
}

/**
 * Reads from the controller through the agent's link, with the token of
 * the moment: a re-lookup between two attempts gives the next attempt the
 * new token.
 */
export function controllerImageSource(
  link: ControllerLink,
  identity: () => HeartbeatIdentity | undefined,
  callTimeoutMs: number,
): ImageSource {
  const metadata = () => {
    const id = identity();
    if (!id) throw new Error('the agent has no token (lookup has not finished)');
    return agentMetadata(id.nodeUuid, id.token);
  };
  return {
    stat: (image, signal) => link.gateway.statImage({ image }, { metadata: metadata(), deadline: callTimeoutMs, signal }),
    read: (image, offset, signal, length = 0) => link.gateway.readImage({ image, offset, length }, { metadata: metadata(), signal }),
    manifest: (image, firstChunk, signal) => link.gateway.getImageManifest({ image, firstChunk }, { metadata: metadata(), signal }),
    exchange: (request, signal) => link.gateway.exchangeChunks(request, { metadata: metadata(), deadline: callTimeoutMs, signal }),
    failed: (error) => {
      if (isConnectionError(error)) link.next('image transfer could not connect');
    },
    lanes: () => ({
      endpoint: link.laneEndpoint(),
      metadata: () => {
        const id = identity();
        if (!id) throw new Error('the agent has no token (lookup has not finished)');
        return agentMetadataFields(id.nodeUuid, id.token);
      },
    }),
  };
}
