import { type FileHandle, open } from 'node:fs/promises';
import { Status } from 'nice-grpc-common';
import { MetalcastError } from '../../common/errors.js';
import { checkCount, checkDevicePath, checkEnum } from '../../common/input.js';
import { EraseMode } from '../../gen/metalcast/v1/command.js';
import type { Disk, Inventory } from '../../gen/metalcast/v1/inventory.js';
import type { CommandHandler } from './command.js';

const MIB = 1024 * 1024;
/** GPT keeps a copy of its header at the end of the disk; RAID and LVM signatures sit at either end. */
const QUICK_ERASE_BYTES = 4 * MIB;
const FULL_ERASE_BLOCK = 4 * MIB;
/** More disks than any machine has. */
const MAX_DEVICE_PATHS = 256;

/**
 * erase_disks: quick wipes partition tables and signatures at both ends of
 * each disk; full writes zeros over every byte, reporting progress. Every
 * disk is flushed before the command reports success.
 */
export function eraseDisksCommand(discover: () => Promise<Inventory>): CommandHandler<'eraseDisks'> {
  return {
    name: 'eraseDisks',
    validate(parameters, field) {
      checkEnum(parameters.mode, EraseMode, `${field}.mode`);
      checkCount(parameters.devicePaths, `${field}.device_paths`, MAX_DEVICE_PATHS, 'device paths');
      const seen = new Set<string>();
      for (const path of parameters.devicePaths) {
        checkDevicePath(path, `${field}.device_paths`);
        if (seen.has(path)) throw new MetalcastError(Status.INVALID_ARGUMENT, `${field}.device_paths: ${path} is listed twice`);
        seen.add(path);
      }
    },
    async run(parameters, context) {
      const inventory = await discover();
      const disks = selectDisks(inventory.disks, parameters.devicePaths);
      const full = parameters.mode === EraseMode.ERASE_MODE_FULL;
      const total = full ? disks.reduce((sum, d) => sum + d.sizeBytes, 0) : disks.length;
      context.logger.info({ disks: disks.map((d) => d.devicePath), mode: full ? 'full' : 'quick' }, 'erasing disks');
      let done = 0;
      const zeros = Buffer.alloc(FULL_ERASE_BLOCK);
      for (const disk of disks) {
        const file = await open(disk.devicePath, 'r+').catch((error: unknown) => {
          throw new Error(`erasing ${disk.devicePath} failed: ${(error as Error).message}`);
        });
        try {
          if (full) {
            for (let at = 0; at < disk.sizeBytes; at += FULL_ERASE_BLOCK) {
              context.signal.throwIfAborted();
              const length = Math.min(FULL_ERASE_BLOCK, disk.sizeBytes - at);
              await writeZeros(file, zeros, at, length);
              done += length;
              context.progress({ phase: `erasing ${disk.name}`, doneBytes: done, totalBytes: total });
            }
          } else {
            const length = Math.min(QUICK_ERASE_BYTES, disk.sizeBytes);
            await writeZeros(file, zeros, 0, length);
            await writeZeros(file, zeros, Math.max(0, disk.sizeBytes - length), length);
            done += 1;
            context.progress({ phase: `erasing ${disk.name}`, doneBytes: done, totalBytes: total });
          }
          await file.sync();
        } catch (error) {
          throw new Error(`erasing ${disk.devicePath} failed: ${(error as Error).message}`);
        } finally {
          // A failing device may fail its close too; that must not hide the error above.
          await file.close().catch(() => {});
        }
      }
      return { result: { $case: 'eraseDisks', value: { devicePaths: disks.map((d) => d.devicePath) } } };
    },
  };
}

function selectDisks(disks: readonly Disk[], wanted: readonly string[]): Disk[] {
  if (wanted.length === 0) return [...disks];
  return wanted.map((path) => {
    const disk = disks.find((d) => d.devicePath === path);
    if (!disk) throw new Error(`no disk ${path} on this machine; disks: ${disks.map((d) => d.devicePath).join(', ') || 'none'}`);
    return disk;
  });
}

async function writeZeros(file: FileHandle, zeros: Buffer, at: number, length: number): Promise<void> {
  let written = 0;
  while (written < length) {
    const { bytesWritten } = await file.write(zeros, 0, Math.min(zeros.length, length - written), at + written);
    written += bytesWritten;
  }
}
