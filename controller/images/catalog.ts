import { Status } from 'nice-grpc-common';
import { MetalcastError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type { ImageRecord, Store } from '../store/store.js';
import type { ImageFiles, ReceivedContent } from './image-files.js';

/**
 * Keeps image rows and blobs consistent. Blobs are shared by content, so
 * "the last row using this sha256 is gone, remove the blob" and "a row now
 * points at this blob" must not interleave: otherwise a delete of image A
 * could remove the blob that an upload of the same content as B has just
 * renamed into place. Both run here, one at a time; they are short (a few
 * database statements and an unlink), while the long part of an upload,
 * receiving the bytes, runs outside.
 */
export class ImageCatalog {
  private tail: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly store: Store,
    private readonly files: ImageFiles,
    private readonly logger: Logger,
  ) {}

  /** Marks a reserved image ready with the content that ImageFiles.receive() has just stored. */
  async commit(name: string, content: ReceivedContent): Promise<ImageRecord> {
    return this.exclusive(async () => {
      if (!(await this.files.has(content.sha256))) {
        throw new MetalcastError(
          Status.ABORTED,
          `the content of image '${name}' was removed by a delete of another image with the same content at the same moment; send it again`,
        );
      }
      const format = content.format;
      // Before the row turns ready, so that a ready image always has its manifest (older ones get theirs lazily).
      if (content.manifest) await this.store.putImageManifest(content.sha256, content.manifest);
      const image = await this.store.updateImage(name, {
        state: 'ready',
        sha256: content.sha256,
        sizeBytes: content.sizeBytes,
        error: '',
        ...(format && {
          format: format.format,
          sourceSha256: format.sourceSha256,
          sourceSizeBytes: format.sourceSizeBytes,
          extents: format.extents,
        }),
      });
      if (!image) {
        await this.removeIfUnused(content.sha256);
        throw new MetalcastError(Status.ABORTED, `image '${name}' was deleted while its content arrived`);
      }
      return image;
    });
  }

  /**
   * Deletes an image row and, unless other images share it, its blob.
   * FAILED_PRECONDITION (from the store) while a node deploys it.
   */
  async delete(name: string): Promise<{ deleted: boolean; blobRemoved: boolean }> {
    return this.exclusive(async () => {
      const image = await this.store.getImage(name);
      if (!image) return { deleted: false, blobRemoved: false };
      const { deleted, contentStillUsed } = await this.store.deleteImage(name);
      const blobRemoved = deleted && image.sha256 !== '' && !contentStillUsed;
      if (blobRemoved) {
        await this.files.remove(image.sha256);
        await this.store.deleteImageManifest(image.sha256);
      }
      return { deleted, blobRemoved };
    });
  }

  /** Removes the row of an image that never got content (a failed upload); logs rather than throws. */
  async discard(name: string): Promise<void> {
    try {
      const image = await this.store.getImage(name);
      if (image && image.sha256 === '') await this.store.deleteImage(name);
    } catch (error) {
      this.logger.error({ err: error, image: name }, 'could not remove the row of a failed upload');
    }
  }

  private async removeIfUnused(sha256: string): Promise<void> {
    const images = await this.store.listImages();
    if (!images.some((image) => image.sha256 === sha256)) await this.files.remove(sha256);
  }

  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.tail.then(fn, fn);
    this.tail = run.catch(() => {});
    return run;
  }
}
