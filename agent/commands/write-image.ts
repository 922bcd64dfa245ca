import { pickDisk } from '../../common/disk-hints.js';
import type { Inventory } from '../../gen/metalcast/v1/inventory.js';
import type { ImageSource } from '../image-source.js';
import { DEFAULT_WRITE_OPTIONS, writeImage } from '../image-writer.js';
import type { CommandHandler } from './command.js';

/**
 * write_image: pick the target disk from the hints, then stream the image
 * onto it (agent/image-writer.ts does the transfer and the checks).
 */
export function writeImageCommand(source: ImageSource, discover: () => Promise<Inventory>): CommandHandler<'writeImage'> {
  return {
    name: 'writeImage',
    async run(parameters, context) {
      if (parameters.image === '') throw new Error('write_image needs an image name');
      if (parameters.sha256 !== '' && !/^[0-9a-f]{64}$/.test(parameters.sha256)) {
        throw new Error(`sha256 '${parameters.sha256.slice(0, 80)}' is not 64 lower-case hex characters`);
      }
      const inventory = await discover();
      const disk = pickDisk(inventory.disks, parameters.target, parameters.sizeBytes);
      context.logger.info({ device: disk.devicePath, size: disk.sizeBytes }, 'target disk chosen');
      const result = await writeImage(
        source,
        {
          image: parameters.image,
          devicePath: disk.devicePath,
          deviceSizeBytes: disk.sizeBytes,
          expectedSha256: parameters.sha256,
          expectedSizeBytes: parameters.sizeBytes,
        },
        {
          ...DEFAULT_WRITE_OPTIONS,
          stallTimeoutMs: parameters.stallTimeoutMs || DEFAULT_WRITE_OPTIONS.stallTimeoutMs,
          maxAttempts: parameters.maxAttempts || DEFAULT_WRITE_OPTIONS.maxAttempts,
          timeLimitMs: parameters.timeLimitMs,
          verifyReadback: parameters.verifyReadback,
          diskIsZeroed: parameters.diskIsZeroed,
        },
        context.progress,
        context.signal,
        context.logger,
      );
      return { result: { $case: 'writeImage', value: result } };
    },
  };
}
