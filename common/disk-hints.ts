import type { DiskHints } from '../gen/metalcast/v1/command.js';
import type { Disk } from '../gen/metalcast/v1/inventory.js';

/** Describes hints for messages, e.g. "serial=S123, rotational=false". */
export function describeHints(hints: DiskHints | undefined): string {
  if (!hints) return 'no hints';
  const parts = Object.entries(hints)
    .filter(([, value]) => value !== undefined)
    .map(([key, value]) => `${key}=${String(value)}`);
  return parts.length ? parts.join(', ') : 'no hints';
}

function matches(disk: Disk, hints: DiskHints): boolean {
  return (
    (hints.devicePath === undefined || disk.devicePath === hints.devicePath || disk.byPath === hints.devicePath) &&
    (hints.name === undefined || disk.name === hints.name) &&
    (hints.sizeBytes === undefined || disk.sizeBytes === hints.sizeBytes) &&
    (hints.minSizeBytes === undefined || disk.sizeBytes >= hints.minSizeBytes) &&
    (hints.serial === undefined || disk.serial === hints.serial) &&
    (hints.model === undefined || disk.model === hints.model) &&
    (hints.rotational === undefined || disk.rotational === hints.rotational)
  );
}

/**
 * Picks exactly one disk. With no hints at all, the smallest disk that can
 * hold `neededBytes` is chosen (Ironic's default root device). No match and
 * several matches are errors that list the disks, so the operator can fix
 * the hints.
 */
export function pickDisk(disks: readonly Disk[], hints: DiskHints | undefined, neededBytes: number): Disk {
  const listing = () =>
    disks.map((d) => `${d.devicePath} (${d.sizeBytes} bytes, serial ${d.serial || '-'}, model ${d.model || '-'})`).join('; ') || 'none';
  const hinted = hints && Object.values(hints).some((v) => v !== undefined);
  if (!hinted) {
    const fitting = disks.filter((d) => d.sizeBytes >= neededBytes).sort((a, b) => a.sizeBytes - b.sizeBytes);
    const smallest = fitting[0];
    if (!smallest) throw new Error(`no disk can hold ${neededBytes} bytes; disks: ${listing()}`);
    return smallest;
  }
  const matching = disks.filter((d) => matches(d, hints));
  if (matching.length === 0) throw new Error(`no disk matches the hints (${describeHints(hints)}); disks: ${listing()}`);
  if (matching.length > 1) {
    throw new Error(
      `${matching.length} disks match the hints (${describeHints(hints)}): ${matching.map((d) => d.devicePath).join(', ')}; add hints that pick one`,
    );
  }
  const disk = matching[0] as Disk;
  if (disk.sizeBytes < neededBytes)
    throw new Error(`disk ${disk.devicePath} (${disk.sizeBytes} bytes) is smaller than the image (${neededBytes} bytes)`);
  return disk;
}
