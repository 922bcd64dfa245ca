import { pickDisk } from '../../common/disk-hints.js';
import { checkDiskHints, checkName, checkSha256 } from '../../common/input.js';
import { MetalcastError } from '../../common/errors.js';
import { Status } from 'nice-grpc-common';
import type { Inventory } from '../../gen/metalcast/v1/inventory.js';
import type { FanoutHook } from '../fanout/fanout-hook.js';
import type { ImageSource } from '../imaging/image-source.js';
import { DEFAULT_WRITE_OPTIONS } from '../imaging/image-writer.js';
import { writeImage } from '../imaging/write-image.js';
import type { CommandHandler } from './command.js';

/**
 * write_image: pick the target disk from the hints, then stream the image
 * onto it (agent/imaging/image-writer.ts does the transfer and the checks).
 */
export function writeImageCommand(
  source: ImageSource,
  discover: () => Promise<Inventory>,
  fanout?: FanoutHook,
  /** --image-streams: connections to fetch the image over at once. */
  streams = 1,
): CommandHandler<'writeImage'> {
  return {
    name: 'writeImage',
    validate(parameters, field) {
      checkName(parameters.image, `${field}.image`, 'image');
      checkDiskHints(parameters.target, `${field}.target`);
      checkSha256(parameters.sha256, `${field}.sha256`, true);
      // 0 means the agent's default; the controller's --transfer-stall-timeout is at least 100 ms and
      // --transfer-attempts at most 1000.
      if (parameters.stallTimeoutMs !== 0 && parameters.stallTimeoutMs < 100) {
        throw new MetalcastError(
          Status.INVALID_ARGUMENT,
          `${field}.stall_timeout_ms: at least 100 (or 0 for the default), got ${parameters.stallTimeoutMs}`,
        );
      }
      if (parameters.maxAttempts > 1000) {
        throw new MetalcastError(Status.INVALID_ARGUMENT, `${field}.max_attempts: at most 1000, got ${parameters.maxAttempts}`);
      }
    },
    async run(parameters, context) {
      const inventory = await discover();
      const disk = pickDisk(inventory.disks, parameters.target, parameters.sizeBytes);
      context.logger.info({ device: disk.devicePath, size: disk.sizeBytes }, 'target disk chosen');
      let ok = false;
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
          fanout,
          streams,
        },
        context.progress,
        context.signal,
        context.logger,
      )
        .then((written) => {
          ok = true;
          return written;
        })
        .finally(() => fanout?.writeEnded(ok));
      return { result: { $case: 'writeImage', value: result } };
    },
  };
}
