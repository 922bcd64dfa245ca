import { abortable, isAbortError } from 'abort-controller-x';
import ms from 'ms';
import { Status } from 'nice-grpc-common';
import { alreadyExists, failedPrecondition, invalidArgument, MetalcastError, notFound } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { type Image, ImageState, type ImageServiceImplementation, type UploadImageRequest } from '../../gen/metalcast/v1/image.js';
import type { ControllerConfig } from '../config.js';
import { ImageCatalog } from '../images/catalog.js';
import type { ImageFiles } from '../images/image-files.js';
import { IMPORT_STOPPED, ImageImporter } from '../images/importer.js';
import {
  formatChecksum,
  parseChecksum,
  redactUrl,
  validateImageName,
  validateImageSize,
  validateImportUrl,
  validateOptionalSha256,
} from '../images/validation.js';
import type { ImageRecord, Store } from '../store/store.js';

export interface ImageServiceDeps {
  store: Store;
  files: ImageFiles;
  config: ControllerConfig;
  logger: Logger;
}

/** The image API and the background work behind it. */
export interface ImageService {
  implementation: ImageServiceImplementation;
  /** Cleans up after a previous run: fails its unfinished imports, removes its unfinished uploads. Call before serving. */
  init(): Promise<void>;
  /** Aborts imports in flight and marks them failed. Call before the store closes. */
  stop(): Promise<void>;
}

/** The proto Image, made at the edge. */
export function imageToProto(image: ImageRecord): Image {
  return {
    name: image.name,
    state: ImageState[`IMAGE_STATE_${image.state.toUpperCase()}` as keyof typeof ImageState],
    sizeBytes: image.sizeBytes,
    sha256: image.sha256,
    sourceUrl: image.sourceUrl,
    error: image.error,
    createdAt: new Date(image.createdAt),
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
  const importer = new ImageImporter(
    store,
    files,
    catalog,
    { attempts: config.importAttempts, stallTimeoutMs: config.importStallTimeout, maxBytes: config.maxImageSize },
    logger.child({ component: 'importer' }),
  );
  /** Names with an upload in progress. */
  const uploads = new Set<string>();

  async function reserve(record: Omit<ImageRecord, 'createdAt' | 'updatedAt'>): Promise<ImageRecord> {
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
      try {
        const content = await files.receive(uploadData(iterator, context.signal), {
          expectedSha256,
          expectedSize,
          maxBytes: config.maxImageSize,
          signal: context.signal,
        });
        image = await catalog.commit(name, content);
        log.info({ sha256: image.sha256, sizeBytes: image.sizeBytes, seconds: (Date.now() - startedAt) / 1000 }, 'image uploaded');
        return { image: imageToProto(image) };
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
      const image = await reserve({
        name,
        state: 'importing',
        sha256: '',
        sizeBytes: 0,
        sourceUrl: redactUrl(url),
        expectedChecksum: formatChecksum(checksum),
        error: '',
      });
      importer.start(name, url, checksum);
      logger.info({ image: name, url: image.sourceUrl }, 'image import started');
      return { image: imageToProto(image) };
    },

    async getImage(request) {
      const name = validateImageName(request.name);
      const image = await store.getImage(name);
      if (!image) throw notFound(`image '${name}' not found; metalcast image list shows the images`);
      return { image: imageToProto(image) };
    },

    async listImages() {
      return { images: (await store.listImages()).map(imageToProto) };
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
  };

  return {
    implementation,

    async init() {
      let failed = 0;
      let removed = 0;
      for (const image of await store.listImages()) {
        if (image.state !== 'importing') continue;
        if (image.sourceUrl !== '') {
          await store.updateImage(image.name, { state: 'failed', error: IMPORT_STOPPED });
          failed++;
        } else {
          await catalog.discard(image.name);
          removed++;
        }
      }
      if (failed + removed > 0) {
        logger.warn({ failedImports: failed, removedUploads: removed }, 'cleaned up images a previous run left unfinished');
      }
    },

    async stop() {
      await importer.stop();
    },
  };
}
