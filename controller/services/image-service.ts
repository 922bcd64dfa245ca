import { abortable, isAbortError } from 'abort-controller-x';
import ms from 'ms';
import { type CallContext, Status } from 'nice-grpc-common';
import {
  alreadyExists,
  dataLoss,
  failedPrecondition,
  invalidArgument,
  MetalcastError,
  notFound,
  resourceExhausted,
  unavailable,
} from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import {
  type DownloadImageRequest,
  type DownloadImageResponse,
  type Image,
  ImageFormat,
  ImageState,
  type ImageServiceImplementation,
  type UploadImageRequest,
} from '../../gen/metalcast/v1/image.js';
import type { ControllerConfig } from '../config.js';
import { ImageCatalog } from '../images/catalog.js';
import type { ImageFiles, ReceivedFile } from '../images/image-files.js';
import { explainShortBlob } from '../images/image-server.js';
import { IMPORT_STOPPED, ImageImporter } from '../images/importer.js';
import { announceImageReady, ImageReplicator, type ReplicatorOptions } from '../images/replicator.js';
import {
  formatChecksum,
  parseChecksum,
  redactUrl,
  validateImageName,
  validateImageSize,
  validateImportUrl,
  validateOptionalSha256,
} from '../images/validation.js';
import { prepareImage } from '../images/formats/prepare.js';
import { withManifest } from '../images/manifest/build.js';
import { type ChunkManifest, DIGEST_BYTES } from '../../common/chunk-manifest.js';
import { releaseRequestBuffer, requestPoolAllocations } from '../../common/pooled-request-decoder.js';
import type { ImageRecord, NewImage, Store } from '../store/store.js';

export interface ImageServiceDeps {
  store: Store;
  files: ImageFiles;
  config: ControllerConfig;
  logger: Logger;
  /** How to reach another controller (TLS or not) when copying its images; plaintext when absent. */
  peerClient?: ReplicatorOptions['peerClient'];
}

/** The image API and the background work behind it. */
export interface ImageService {
  implementation: ImageServiceImplementation;
  /**
   * Cleans up after a previous run (fails its unfinished imports, removes
   * its unfinished uploads) and starts copying content from other
   * controllers. Call before serving.
   */
  init(): Promise<void>;
  /** Ends every DownloadImage stream at its next chunk (shutdown; clients resume elsewhere). Call before the server shuts down. */
  stopTransfers(): void;
  /** Stops copying content, aborts imports in flight and marks them failed. Call before the store closes. */
  stop(): Promise<void>;
}

/** The proto Image, made at the edge. */
export function imageToProto(image: ImageRecord, manifest?: ChunkManifest): Image {
  const known = image.sha256 !== '';
  return {
    name: image.name,
    state: ImageState[`IMAGE_STATE_${image.state.toUpperCase()}` as keyof typeof ImageState],
    sizeBytes: image.sizeBytes,
    sha256: image.sha256,
    sourceUrl: image.sourceUrl,
    error: image.error,
    createdAt: new Date(image.createdAt),
    format: !known
      ? ImageFormat.IMAGE_FORMAT_UNSPECIFIED
      : image.format === 'qcow2'
        ? ImageFormat.IMAGE_FORMAT_QCOW2
        : ImageFormat.IMAGE_FORMAT_RAW,
    // Images stored before formats were recorded were raw: the file as sent was the content.
    sourceSha256: image.sourceSha256 || image.sha256,
    sourceSizeBytes: image.sourceSizeBytes || image.sizeBytes,
    allocatedBytes: image.allocatedBytes ?? 0,
    allocatedExtentCount: image.extentCount,
    manifestChunkSizeBytes: manifest?.chunkSize ?? 0,
    manifestChunkCount: manifest ? manifest.digests.length / DIGEST_BYTES : 0,
    manifestRootSha256: manifest?.rootSha256 ?? '',
  };
}

/**
 * The operator API for images. An upload or import first reserves its name
 * with a row in state 'importing'; content goes through ImageFiles, which
 * verifies it before it becomes a blob, and the row turns 'ready' only then.
 * A failed upload removes its row; a failed import keeps it, 'failed' with
 * the reason, so that the operator sees what went wrong.
 */
export function createImageService(deps: ImageServiceDeps): ImageService {
  const { store, files, config, logger } = deps;
  const catalog = new ImageCatalog(store, files, logger);
  /**
   * Detects the format of received content and converts qcow2 to raw (controller/images/formats/), then
   * builds the chunk manifest of the raw form, checked against the root the operator expects, if any.
   */
  const formats = (expectedManifestRoot?: string) => (signal: AbortSignal) => async (path: string, received: ReceivedFile) =>
    withManifest(
      await prepareImage(
        path,
        { sha256: received.sha256, sizeBytes: received.sizeBytes },
        { maxVirtualSize: config.maxImageVirtualSize, tempPath: () => files.tempPath(), signal },
      ),
      config.imageManifestChunkSize,
      expectedManifestRoot,
      signal,
      { path, manifest: received.manifest },
    );
  const importer = new ImageImporter(
    store,
    files,
    catalog,
    {
      attempts: config.importAttempts,
      stallTimeoutMs: config.importStallTimeout,
      maxBytes: config.maxImageSize,
      prepare: formats(),
      manifestChunkSize: config.imageManifestChunkSize,
    },
    logger.child({ component: 'importer' }),
  );
  const replicator = new ImageReplicator(
    store,
    files,
    {
      controllerId: config.controllerId,
      keepalive: { timeMs: config.keepaliveTime, timeoutMs: config.keepaliveTimeout },
      maxBytes: config.maxImageSize,
      intervalMs: config.imageSyncInterval,
      peerClient: deps.peerClient,
    },
    logger.child({ component: 'replicator' }),
  );
  /** Names with an upload in progress. */
  const uploads = new Set<string>();
  let downloads = 0;
  let stoppingTransfers = false;

  async function reserve(record: NewImage): Promise<ImageRecord> {
    try {
      return await store.createImage(record);
    } catch (error) {
      if (error instanceof MetalcastError && error.status === Status.ALREADY_EXISTS) {
        throw alreadyExists(
          `an image named '${record.name}' already exists; choose another name, or delete it first (metalcast image delete ${record.name})`,
        );
      }
      throw error;
    }
  }

  /**
   * The data messages after the header. Ends only on the client's
   * half-close: a cancelled call also ends the request stream, so the
   * signal is checked after the end, or a broken upload would look whole.
   */
  async function* uploadData(requests: AsyncIterator<UploadImageRequest>, signal: AbortSignal): AsyncGenerator<Uint8Array> {
    const idleMs = config.importStallTimeout;
    const idle = new AbortController();
    const timer = setTimeout(() => idle.abort(), idleMs);
    const either = AbortSignal.any([signal, idle.signal]);
    let received = 0;
    try {
      for (;;) {
        let next: IteratorResult<UploadImageRequest>;
        try {
          next = await abortable(either, requests.next());
        } catch (error) {
          if (idle.signal.aborted && !signal.aborted) {
            throw new MetalcastError(
              Status.DEADLINE_EXCEEDED,
              `no data for ${ms(idleMs, { long: true })}; the upload was abandoned, start it again`,
            );
          }
          throw error;
        }
        timer.refresh();
        if (next.done) break;
        const part = next.value.part;
        if (part?.$case === 'header') {
          throw invalidArgument('only the first message of an upload may be a header; send data after it');
        }
        if (part?.$case !== 'data') throw invalidArgument('an upload message carries neither header nor data');
        if (part.value.byteLength === 0) continue;
        received += part.value.byteLength;
        yield part.value;
      }
      signal.throwIfAborted();
      if (received === 0) throw invalidArgument('no data after the header; an image cannot be empty');
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * A ready image's content from the local blob, a header first, then
   * chunks of --image-chunk-size read one ahead of the one being sent.
   * Memory stays bounded: nice-grpc waits at yield once grpc-js has queued
   * its 16 messages, so a stalled reader pins about 17 chunks; at most
   * --max-image-transfers downloads run at once, each for at most
   * --image-read-timeout (the client resumes after it).
   */
  async function* downloadImage(request: DownloadImageRequest, context: CallContext): AsyncGenerator<DownloadImageResponse> {
    const name = validateImageName(request.name);
    const image = await store.getImage(name);
    if (!image) throw notFound(`image '${name}' not found; metalcast image list shows the images`);
    if (image.state === 'importing') {
      throw failedPrecondition(
        `image '${name}' is still being imported or uploaded; wait until it is ready (metalcast image show ${name})`,
      );
    }
    if (image.state !== 'ready')
      throw failedPrecondition(`image '${name}' is ${image.state} (${image.error}); it has no content to download`);
    if (!Number.isSafeInteger(request.offset) || request.offset > image.sizeBytes) {
      throw invalidArgument(`offset: ${request.offset} is past the end of image '${name}' (${image.sizeBytes} bytes)`);
    }
    if (stoppingTransfers) throw unavailable('the controller is shutting down; download from another controller, or after the restart');
    const blob = await files.openBlob(image.sha256);
    if (!blob) {
      if (!(await files.requestMissing(image.sha256))) {
        throw dataLoss(`the content of image '${name}' is missing on this controller; upload or import it again`);
      }
      throw unavailable(
        `image '${name}' is not on this controller yet: it is being copied here from another controller; retry in a few seconds, or download it from another controller`,
      );
    }
    if (downloads >= config.maxImageTransfers) {
      await blob.close();
      throw resourceExhausted(
        `the controller is serving ${downloads} image downloads, its limit (--max-image-transfers); retry in a few seconds`,
      );
    }
    downloads++;
    const log = logger.child({ image: name, from: request.offset, peer: context.peer });
    const startedAt = Date.now();
    const timedOut = new AbortController();
    const deadline = setTimeout(() => timedOut.abort(), config.imageReadTimeout);
    let offset = request.offset;
    try {
      yield {
        part: {
          $case: 'header',
          value: { sizeBytes: image.sizeBytes, sha256: image.sha256, offset, chunkSizeBytes: config.imageChunkSize },
        },
      };
      // A fresh buffer per chunk: grpc-js queues yielded messages unserialised while the reader is behind.
      for await (const data of blob.chunks(offset, image.sizeBytes, config.imageChunkSize)) {
        if (context.signal.aborted) break;
        if (stoppingTransfers) {
          throw unavailable(`the controller is shutting down; resume from offset ${offset} with another controller, or after the restart`);
        }
        if (timedOut.signal.aborted) {
          throw unavailable(
            `this download reached the controller's limit of ${ms(config.imageReadTimeout, { long: true })} per stream (--image-read-timeout); resume from offset ${offset}`,
          );
        }
        yield { part: { $case: 'chunk', value: { offset, data } } };
        offset += data.length;
      }
      log.info(
        { bytes: offset - request.offset, seconds: (Date.now() - startedAt) / 1000, cancelled: context.signal.aborted },
        'image download ended',
      );
    } catch (error) {
      throw explainShortBlob(error, { name, sizeBytes: image.sizeBytes });
    } finally {
      clearTimeout(deadline);
      await blob.close();
      downloads--;
    }
  }

  const implementation: ImageServiceImplementation = {
    async uploadImage(requests, context) {
      const iterator = requests[Symbol.asyncIterator]();
      const first = await iterator.next();
      const header = !first.done && first.value.part?.$case === 'header' ? first.value.part.value : undefined;
      if (!header) {
        throw invalidArgument('the first message of an upload must be the header (name, and optionally sha256 and size_bytes)');
      }
      const name = validateImageName(header.name, 'header.name');
      const expectedSha256 = validateOptionalSha256(header.sha256, 'header.sha256');
      const expectedSize = validateImageSize(header.sizeBytes, config.maxImageSize, 'header.size_bytes');
      await reserve({
        name,
        state: 'importing',
        sha256: '',
        sizeBytes: 0,
        sourceUrl: '',
        expectedChecksum: expectedSha256 ? `sha256:${expectedSha256}` : '',
        error: '',
      });
      uploads.add(name);
      const log = logger.child({ image: name });
      const startedAt = Date.now();
      let image: ImageRecord | undefined;
      let manifest: ChunkManifest | undefined;
      try {
        const content = await files.receive(uploadData(iterator, context.signal), {
          expectedSha256,
          expectedSize,
          maxBytes: config.maxImageSize,
          signal: context.signal,
          prepare: formats()(context.signal),
          manifestChunkSize: config.imageManifestChunkSize,
          // Each data message lies in a pooled receive buffer (common/pooled-request-decoder.ts): used again once written.
          onConsumed: releaseRequestBuffer,
        });
        try {
          image = await catalog.commit(name, content);
          manifest = content.manifest;
        } finally {
          content.release();
        }
        log.info(
          {
            sha256: image.sha256,
            sizeBytes: image.sizeBytes,
            seconds: (Date.now() - startedAt) / 1000,
            // The receive pool's buffers since start (all uploads): far fewer than messages received when reuse works.
            receivePoolAllocations: requestPoolAllocations(),
          },
          'image uploaded',
        );
        // Every controller on the database copies the content now.
        await announceImageReady(store, name, log);
        return { image: imageToProto(image, manifest) };
      } catch (error) {
        if (context.signal.aborted || isAbortError(error)) log.info('upload cancelled by the client; nothing kept');
        else log.info({ reason: (error as Error).message }, 'upload refused; nothing kept');
        throw error;
      } finally {
        uploads.delete(name);
        if (!image) await catalog.discard(name);
      }
    },

    async importImage(request) {
      const name = validateImageName(request.name);
      const url = validateImportUrl(request.url);
      const checksum = parseChecksum(request.checksum);
      const manifestRoot = validateOptionalSha256(request.manifestRootSha256, 'manifest_root_sha256');
      const image = await reserve({
        name,
        state: 'importing',
        sha256: '',
        sizeBytes: 0,
        sourceUrl: redactUrl(url),
        expectedChecksum: formatChecksum(checksum),
        error: '',
      });
      importer.start(name, url, checksum, manifestRoot ? formats(manifestRoot) : undefined);
      logger.info({ image: name, url: image.sourceUrl }, 'image import started');
      return { image: imageToProto(image) };
    },

    async getImage(request) {
      const name = validateImageName(request.name);
      const image = await store.getImage(name);
      if (!image) throw notFound(`image '${name}' not found; metalcast image list shows the images`);
      const manifest = image.state === 'ready' ? await store.getImageManifest(image.sha256) : undefined;
      return { image: imageToProto(image, manifest) };
    },

    async listImages() {
      return { images: (await store.listImages()).map((image) => imageToProto(image)) };
    },

    async deleteImage(request) {
      const name = validateImageName(request.name);
      if (uploads.has(name)) {
        throw failedPrecondition(`image '${name}' is being uploaded; cancel the upload instead (it leaves nothing behind)`);
      }
      // Deleting an image that is still importing stops the import.
      await importer.cancel(name);
      const { deleted, blobRemoved } = await catalog.delete(name);
      if (!deleted) throw notFound(`image '${name}' not found; metalcast image list shows the images`);
      logger.info({ image: name, blobRemoved }, 'image deleted');
      return {};
    },

    downloadImage,
  };

  /**
   * Fails the imports and removes the uploads a previous run left
   * unfinished. Image rows do not say which controller works on them, so
   * while other controllers share the database this leaves them alone:
   * those may be theirs, in progress.
   */
  async function cleanUpPreviousRun(): Promise<void> {
    const unfinished = (await store.listImages()).filter((image) => image.state === 'importing');
    if (unfinished.length === 0) return;
    const others = (await store.listControllers()).filter((controller) => controller.id !== config.controllerId);
    if (others.length > 0) {
      logger.info(
        { images: unfinished.map((image) => image.name), controllers: others.map((controller) => controller.id) },
        'images being imported or uploaded left alone: other controllers share the database and may be working on them',
      );
      return;
    }
    let failed = 0;
    let removed = 0;
    for (const image of unfinished) {
      if (image.sourceUrl !== '') {
        await store.updateImage(image.name, { state: 'failed', error: IMPORT_STOPPED });
        failed++;
      } else {
        await catalog.discard(image.name);
        removed++;
      }
    }
    logger.warn({ failedImports: failed, removedUploads: removed }, 'cleaned up images a previous run left unfinished');
  }

  return {
    implementation,

    async init() {
      await cleanUpPreviousRun();
      replicator.start();
    },

    stopTransfers() {
      stoppingTransfers = true;
    },

    async stop() {
      await replicator.stop();
      await importer.stop();
    },
  };
}
