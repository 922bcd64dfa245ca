import type { ChunkManifest } from '../../../common/chunk-manifest.js';
import { dataLoss, unavailable } from '../../../common/errors.js';
import type { Logger } from '../../../common/logging.js';
import type { ImageRecord, Store } from '../../store/store.js';
import type { ImageFiles } from '../image-files.js';
import { manifestOfFile } from './build.js';

/** How long a caller waits for a manifest being built before it is told to retry (the build goes on). */
const WAIT_FOR_BUILD_MS = 5000;

/**
 * The chunk manifests of ready images. New images get theirs when their
 * content arrives (controller/images/manifest/build.ts); an image stored
 * before manifests existed gets its manifest here, lazily, the first time an
 * agent needs it: built from this controller's blob (one read of the image,
 * at most once at a time per content), checked against the image's recorded
 * sha256 and stored for every controller. A migration could not do it: the
 * bytes live in per-controller files, not in the database.
 */
export class ImageManifests {
  private readonly building = new Map<string, Promise<ChunkManifest>>();

  constructor(
    private readonly store: Store,
    private readonly files: ImageFiles,
    private readonly chunkSize: number,
    private readonly logger: Logger,
  ) {}

  /** The image's manifest; UNAVAILABLE (retry) while one is still being built after a few seconds. */
  async get(image: ImageRecord): Promise<ChunkManifest> {
    const stored = await this.store.getImageManifest(image.sha256);
    if (stored) return stored;
    let build = this.building.get(image.sha256);
    if (!build) {
      build = this.build(image).finally(() => this.building.delete(image.sha256));
      build.catch(() => {});
      this.building.set(image.sha256, build);
    }
    let timer: NodeJS.Timeout | undefined;
    const waited = new Promise<undefined>((resolve) => {
      timer = setTimeout(() => resolve(undefined), WAIT_FOR_BUILD_MS);
    });
    try {
      const manifest = await Promise.race([build, waited]);
      if (manifest) return manifest;
    } finally {
      clearTimeout(timer);
    }
    throw unavailable(
      `the chunk manifest of image '${image.name}' (stored before manifests existed) is being built from its content; retry in a few seconds`,
    );
  }

  private async build(image: ImageRecord): Promise<ChunkManifest> {
    const started = Date.now();
    const path = this.files.blobPath(image.sha256);
    if (!(await this.files.has(image.sha256))) {
      // As ReadImage answers (image-server.ts): lost here, or on its way from another controller.
      if (!(await this.files.requestMissing(image.sha256))) {
        throw dataLoss(`the content of image '${image.name}' is missing on this controller; upload or import it again`);
      }
      throw unavailable(
        `image '${image.name}' is still being copied to this controller from another controller; retry in a few seconds, or read it from another controller`,
      );
    }
    const release = this.files.hold(image.sha256);
    try {
      const { manifest, sha256 } = await manifestOfFile(path, this.chunkSize);
      if (sha256 !== image.sha256 || manifest.sizeBytes !== image.sizeBytes) {
        throw dataLoss(
          `the content of image '${image.name}' on this controller hashes to ${sha256} (${manifest.sizeBytes} bytes), not to its recorded ${image.sha256}; upload or import it again`,
        );
      }
      await this.store.putImageManifest(image.sha256, manifest);
      this.logger.info(
        { image: image.name, chunks: manifest.digests.length / 32, seconds: (Date.now() - started) / 1000 },
        'built the chunk manifest of an image stored before manifests',
      );
      return manifest;
    } finally {
      release();
    }
  }
}
