import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { gunzipSync } from 'node:zlib';
import { Status } from 'nice-grpc-common';
import { pickDisk } from '../../common/disk-hints.js';
import { MetalcastError } from '../../common/errors.js';
import { checkDiskHints, checkSha256 } from '../../common/input.js';
import type { Inventory } from '../../gen/metalcast/v1/inventory.js';
import type { ConfigDriveSource } from '../configdrive/config-drive-source.js';
import { ensureConfigDrivePartition, type Runner, runTool } from '../configdrive/partition.js';
import type { CommandHandler } from './command.js';

const MIB = 1024 * 1024;
/** Ironic's config drive partition. */
export const DEFAULT_CONFIG_DRIVE_PARTITION_BYTES = 64 * MIB;
const MAX_PARTITION_BYTES = 1024 * MIB;

/**
 * write_config_drive: after write_image, fetch the node's config drive from
 * the controller, check it against the sha256 and size the controller sent
 * with the command, make the partition at the end of the disk
 * (agent/configdrive/partition.ts), write the image there, flush, and read
 * it back. Its content (the user data) is never logged.
 */
export function writeConfigDriveCommand(
  source: ConfigDriveSource,
  discover: () => Promise<Inventory>,
  run: Runner = runTool,
): CommandHandler<'writeConfigDrive'> {
  return {
    name: 'writeConfigDrive',
    validate(parameters, field) {
      checkDiskHints(parameters.target, `${field}.target`);
      checkSha256(parameters.sha256, `${field}.sha256`, true);
      const size = parameters.partitionSizeBytes;
      if (size !== 0 && (size < MIB || size > MAX_PARTITION_BYTES || size % MIB !== 0)) {
        throw new MetalcastError(
          Status.INVALID_ARGUMENT,
          `${field}.partition_size_bytes: whole MiB from 1 MiB to ${MAX_PARTITION_BYTES / MIB} MiB (or 0 for 64 MiB), got ${size}`,
        );
      }
      if (parameters.sizeBytes === 0 || parameters.sizeBytes > (size || DEFAULT_CONFIG_DRIVE_PARTITION_BYTES)) {
        throw new MetalcastError(Status.INVALID_ARGUMENT, `${field}.size_bytes: the config drive must be 1 byte to the partition's size`);
      }
    },
    async run(parameters, context) {
      const partitionBytes = parameters.partitionSizeBytes || DEFAULT_CONFIG_DRIVE_PARTITION_BYTES;
      const disk = pickDisk((await discover()).disks, parameters.target, 0);
      context.progress({ phase: 'fetching config drive', totalBytes: parameters.sizeBytes });
      const fetched = await source.fetch(context.signal);
      let iso: Buffer;
      try {
        iso = gunzipSync(fetched.gzip, { maxOutputLength: partitionBytes });
      } catch (error) {
        throw new Error(`the config drive from the controller does not decompress: ${(error as Error).message}`);
      }
      const sha256 = createHash('sha256').update(iso).digest('hex');
      if (iso.length !== parameters.sizeBytes || sha256 !== parameters.sha256) {
        throw new Error(
          `the config drive from the controller is ${iso.length} bytes with sha256 ${sha256}, but the command expects ${parameters.sizeBytes} bytes with sha256 ${parameters.sha256}; the deploy changed meanwhile`,
        );
      }
      context.progress({ phase: 'partitioning', totalBytes: iso.length });
      const partition = await ensureConfigDrivePartition(disk.devicePath, disk.sizeBytes, partitionBytes, run);
      context.logger.info(
        {
          device: disk.devicePath,
          table: partition.table,
          partition: partition.number,
          offset: partition.offsetBytes,
          reused: partition.reused,
        },
        'config drive partition ready',
      );
      if (iso.length > partition.sizeBytes) {
        throw new Error(`the config drive (${iso.length} bytes) does not fit its partition (${partition.sizeBytes} bytes)`);
      }
      context.progress({ phase: 'writing config drive', totalBytes: iso.length });
      const file = await open(disk.devicePath, 'r+').catch((error: unknown) => {
        throw new Error(`opening ${disk.devicePath} to write the config drive failed: ${(error as Error).message}`);
      });
      try {
        let written = 0;
        while (written < iso.length) {
          const { bytesWritten } = await file.write(iso, written, iso.length - written, partition.offsetBytes + written);
          written += bytesWritten;
        }
        await file.sync();
        const back = Buffer.alloc(iso.length);
        await file.read(back, 0, back.length, partition.offsetBytes);
        if (!back.equals(iso)) throw new Error(`reading the config drive back from ${disk.devicePath} gave other bytes`);
      } catch (error) {
        throw new Error(`writing the config drive to ${disk.devicePath} failed: ${(error as Error).message}`);
      } finally {
        // A failing device may fail its close too; that must not hide the error above.
        await file.close().catch(() => {});
      }
      context.progress({ phase: 'config drive written', doneBytes: iso.length, totalBytes: iso.length });
      return {
        result: {
          $case: 'writeConfigDrive',
          value: {
            devicePath: disk.devicePath,
            partitionTable: partition.table,
            partitionNumber: partition.number,
            offsetBytes: partition.offsetBytes,
            partitionSizeBytes: partition.sizeBytes,
          },
        },
      };
    },
  };
}
