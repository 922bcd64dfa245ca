import type { CallContext } from 'nice-grpc';
import {
  dataLoss,
  failedPrecondition,
  invalidArgument,
  notFound,
  permissionDenied,
  resourceExhausted,
  unavailable,
} from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { truncate } from '../../common/mac.js';
import type {
  GetImageManifestRequest,
  GetImageManifestResponse,
  ReadImageRequest,
  ReadImageResponse,
  StatImageRequest,
  StatImageResponse,
} from '../../gen/metalcast/v1/agent_gateway.js';
import { DIGEST_BYTES, isZeroChunk } from '../../common/chunk-manifest.js';
import { ChunkPool } from '../../common/read-image-codec.js';
import type { ControllerMetrics } from '../observability/metrics.js';
import { authenticateAgent } from '../services/agent-auth.js';
import type { ImageRecord, NodeRecord, Store } from '../store/store.js';
import { type BlobReader, type ImageFiles, ShortBlobError } from './image-files.js';
import type { ImageManifests } from './manifest/manifests.js';
import { validateImageName } from './validation.js';

export interface ImageServerDeps {
  store: Store;
  files: ImageFiles;
  metrics: ControllerMetrics;
  logger: Logger;
  chunkSize: number;
  maxTransfers: number;
  /** Longest one ReadImage stream may run; the agent resumes after it. */
  readTimeoutMs: number;
  /** Chunk manifests, built lazily for images stored before manifests. */
  manifests: ImageManifests;
}

/** Chunks per GetImageManifest page: 128 KiB of digests, well under any message limit. */
const MANIFEST_PAGE_CHUNKS = 4096;

const RETRY_AFTER_MS = 2000;
const EMPTY = Buffer.alloc(0);

/**
 * StatImage and ReadImage for agents. Only the agent of a node being
 * deployed with an image may read it. Chunks are read from the blob on
 * demand, one ahead of the one being sent. Image rows are shared by every
 * controller on the database but content is per controller: a ready image
 * whose content has not been copied here yet is answered UNAVAILABLE, which
 * the agent retries (the replicator fetches it meanwhile). Memory per transfer stays
 * bounded however slow the reader: gRPC flow control holds the loop at
 * `yield` once grpc-js has queued its high-water mark of 16 messages, so a
 * stalled reader pins at most about 17 chunks.
 */
export function createImageServer(deps: ImageServerDeps) {
  const { store, files, metrics } = deps;
  let active = 0;
  let stopping = false;
  const zeroChunk = Buffer.alloc(deps.chunkSize);
  const chunks = new ChunkPool(deps.chunkSize);
  const takeChunk = (length: number) => chunks.take(length);

  async function authorise(context: CallContext, imageName: string): Promise<{ node: NodeRecord; image: ImageRecord }> {
    validateImageName(imageName, 'image');
    const { node } = await authenticateAgent(context, store, deps.logger);
    const deploying = node.provisionState === 'deploying' || node.provisionState === 'deploy_wait';
    const deployImage = node.deployJson ? (JSON.parse(node.deployJson) as { image?: string }).image : undefined;
    if (!deploying || deployImage !== imageName) {
      deps.logger.warn({ node: node.uuid, image: imageName, state: node.provisionState }, 'image read refused: node is not deploying it');
      throw permissionDenied(
        `node ${node.uuid} is not being deployed with image '${truncate(imageName)}'; only its deploy image may be read`,
      );
    }
    const image = await store.getImage(imageName);
    if (!image) throw notFound(`image '${imageName}' does not exist on this controller`);
    if (image.state !== 'ready') throw failedPrecondition(`image '${imageName}' is ${image.state}, not ready`);
    return { node, image };
  }

  /**
   * The image's blob, or why there is none. Rows are shared by every
   * controller on the database, content is per controller: when the
   * replicator expects to bring a missing blob here (from another
   * controller or the image's URL), UNAVAILABLE makes the agent retry.
   * Otherwise this controller has lost it.
   */
  async function openOrExplain(image: ImageRecord): Promise<BlobReader> {
    const blob = await files.openBlob(image.sha256);
    if (blob) return blob;
    if (!(await files.requestMissing(image.sha256))) {
      throw dataLoss(`the content of image '${image.name}' is missing on this controller; upload or import it again`);
    }
    deps.logger.info({ image: image.name, sha256: image.sha256 }, 'image read refused: its content is not on this controller yet');
    throw unavailable(
      `image '${image.name}' is still being copied to this controller from another controller; retry in a few seconds, or read it from another controller`,
    );
  }

  async function statImage(request: StatImageRequest, context: CallContext): Promise<StatImageResponse> {
    const { image } = await authorise(context, request.image);
    const manifest = await deps.manifests.get(image);
    return {
      image: image.name,
      sizeBytes: image.sizeBytes,
      sha256: image.sha256,
      chunkSizeBytes: deps.chunkSize,
      manifestChunkSizeBytes: manifest.chunkSize,
      manifestChunkCount: manifest.digests.length / DIGEST_BYTES,
      manifestRootSha256: manifest.rootSha256,
    };
  }

  async function* getImageManifest(request: GetImageManifestRequest, context: CallContext): AsyncGenerator<GetImageManifestResponse> {
    const { image } = await authorise(context, request.image);
    const manifest = await deps.manifests.get(image);
    const count = manifest.digests.length / DIGEST_BYTES;
    if (request.firstChunk > count) {
      throw invalidArgument(`first_chunk: ${request.firstChunk} is past the last chunk of image '${image.name}' (${count} chunks)`);
    }
    for (let first = request.firstChunk; first < count; first += MANIFEST_PAGE_CHUNKS) {
      if (context.signal.aborted) return;
      const end = Math.min(count, first + MANIFEST_PAGE_CHUNKS);
      const zeroChunks: number[] = [];
      for (let index = first; index < end; index++) if (isZeroChunk(manifest, index)) zeroChunks.push(index);
      yield { firstChunk: first, chunkSha256s: manifest.digests.subarray(first * DIGEST_BYTES, end * DIGEST_BYTES), zeroChunks };
    }
  }

  async function* readImage(request: ReadImageRequest, context: CallContext): AsyncGenerator<ReadImageResponse> {
    const { node, image } = await authorise(context, request.image);
    if (request.offset > image.sizeBytes) {
      throw invalidArgument(`offset: ${request.offset} is past the end of image '${image.name}' (${image.sizeBytes} bytes)`);
    }
    const end = request.length === 0 ? image.sizeBytes : request.offset + request.length;
    if (end > image.sizeBytes) {
      throw invalidArgument(
        `length: offset ${request.offset} + length ${request.length} is past the end of image '${image.name}' (${image.sizeBytes} bytes)`,
      );
    }
    const blob = await openOrExplain(image);
    if (active >= deps.maxTransfers) {
      await blob.close();
      metrics.imageTransfersRejected.inc();
      context.trailer.set('retry-after-ms', String(RETRY_AFTER_MS));
      throw resourceExhausted(`the controller is serving ${active} image transfers, its limit; retry in ${RETRY_AFTER_MS / 1000}s`);
    }
    active++;
    metrics.imageTransfersActive.inc();
    if (request.offset > 0) metrics.imageTransferResumes.inc();
    const log = deps.logger.child({ node: node.uuid, image: image.name, from: request.offset, to: end });
    log.info('image transfer started');
    const stopTimer = metrics.imageTransferDuration.startTimer();
    const deadline = setTimeout(() => timedOut.abort(), deps.readTimeoutMs);
    const timedOut = new AbortController();
    let offset = request.offset;
    let result = 'error';
    try {
      // Buffers from the pool (allocChunk's, which the fast codec frames in place). grpc-js queues written
      // messages unserialised while the reader is behind (up to its high-water mark), so a buffer handed to
      // yield comes back to the pool only once its response has been sent. The next chunk is read while this
      // one is sent.
      for await (const chunk of blob.chunks(offset, end, deps.chunkSize, takeChunk)) {
        const length = chunk.length;
        const chunkOffset = offset;
        offset += length;
        if (context.signal.aborted || timedOut.signal.aborted) break;
        if (stopping)
          throw unavailable('the controller is shutting down; resume from this offset with another controller or after the restart');
        const zero = chunk.equals(length === deps.chunkSize ? zeroChunk : zeroChunk.subarray(0, length));
        metrics.imageBytesServed.inc(length);
        if (zero) chunks.giveBack(chunk); // not sent: only its length travels
        yield { offset: chunkOffset, length, zero, data: zero ? EMPTY : chunk };
      }
      if (timedOut.signal.aborted) {
        result = 'timeout';
        log.info({ sent: offset - request.offset }, 'image transfer hit --image-read-timeout; the agent resumes');
        return;
      }
      result = context.signal.aborted ? 'cancelled' : 'ok';
      // chunkPoolAllocations: buffers the controller's chunk pool has allocated since start, all transfers together.
      log.info({ bytes: offset - request.offset, result, chunkPoolAllocations: chunks.allocated }, 'image transfer ended');
    } catch (error) {
      throw explainShortBlob(error, image);
    } finally {
      clearTimeout(deadline);
      await blob.close();
      active--;
      metrics.imageTransfersActive.dec();
      stopTimer({ result });
    }
  }

  /** Ends every transfer at its next chunk (shutdown): agents resume where they stopped. */
  function stop(): void {
    stopping = true;
  }

  return { statImage, readImage, getImageManifest, stop };
}

export type ImageServer = ReturnType<typeof createImageServer>;

/** A blob that ends before the image's recorded size is lost data, for whoever reads it (ReadImage, DownloadImage). */
export function explainShortBlob(error: unknown, image: { name: string; sizeBytes: number }): unknown {
  if (!(error instanceof ShortBlobError)) return error;
  return dataLoss(
    `the content of image '${image.name}' on this controller is shorter than its recorded size (${image.sizeBytes} bytes); upload or import it again`,
  );
}
