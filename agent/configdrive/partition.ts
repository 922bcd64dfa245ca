import { execFile } from 'node:child_process';
import { open } from 'node:fs/promises';
import { agentToolCommand } from './tools.js';

/**
 * A partition at the end of a disk for the config drive, after the image
 * has been written, as ironic-python-agent makes it: on GPT the backup
 * header is first moved to the disk's real end (the image's table ends where
 * the image ended) with `sgdisk -e`, then a partition named config-2 is
 * added with sgdisk (gdisk); on MBR a primary partition is appended with
 * sfdisk (fdisk). Works on block devices and on plain files (tests) alike.
 */

export type PartitionTable = 'gpt' | 'mbr';

export interface ConfigDrivePartition {
  table: PartitionTable;
  /** 1-based, as the kernel names it (vda3). */
  number: number;
  offsetBytes: number;
  sizeBytes: number;
  /** True when a config-2 partition from an earlier attempt was reused. */
  reused: boolean;
}

/** The GPT partition name (and, by cloud-init, the file system label) of the config drive. */
export const CONFIG_DRIVE_NAME = 'config-2';
const ALIGN_BYTES = 1024 * 1024;
/** MBR addresses 2^32 sectors of 512 bytes. */
const MBR_LIMIT_SECTORS = 2 ** 32;

export type Runner = (command: string, args: string[], input?: string) => Promise<string>;

/** Runs a partitioning tool; rejects with its stderr. */
export const runTool: Runner = (command, args, input) =>
  new Promise((resolve, reject) => {
    const child = execFile(agentToolCommand(command), args, { timeout: 60_000, encoding: 'utf8' }, (error, stdout, stderr) => {
      if (!error) return resolve(stdout);
      const why = (error as NodeJS.ErrnoException).code === 'ENOENT' ? 'not installed' : String(stderr).trim() || error.message;
      reject(new Error(`${command} ${args.join(' ')}: ${why}`));
    });
    if (input !== undefined) child.stdin?.end(input);
  });

/** Which table the disk has, from its first sectors. */
export async function partitionTableOf(devicePath: string): Promise<PartitionTable | undefined> {
  const file = await open(devicePath, 'r');
  try {
    const head = Buffer.alloc(8192 + 8);
    await file.read(head, 0, head.length, 0);
    const gptAt = [512, 4096].find((at) => head.subarray(at, at + 8).toString('latin1') === 'EFI PART');
    if (gptAt !== undefined) return 'gpt';
    if (head[510] === 0x55 && head[511] === 0xaa) {
      // A protective MBR without a GPT header behind it is a broken GPT, not an MBR disk.
      if ([0, 1, 2, 3].some((i) => head[446 + i * 16 + 4] === 0xee)) return undefined;
      return 'mbr';
    }
    return undefined;
  } finally {
    await file.close();
  }
}

/**
 * Makes (or finds, from an earlier attempt) the config drive partition of
 * `partitionBytes` at the end of the disk of `diskBytes`. Throws an Error
 * saying what to fix when the disk has no partition table, no free slot or
 * no room at its end.
 */
export async function ensureConfigDrivePartition(
  devicePath: string,
  diskBytes: number,
  partitionBytes: number,
  run: Runner = runTool,
): Promise<ConfigDrivePartition> {
  const table = await partitionTableOf(devicePath);
  if (table === 'gpt') return gptPartition(devicePath, partitionBytes, run);
  if (table === 'mbr') return mbrPartition(devicePath, diskBytes, partitionBytes, run);
  throw new Error(
    `${devicePath} has no partition table after the image was written: a config drive needs a whole-disk image with a GPT or MBR partition table`,
  );
}

interface GptLayout {
  sectorBytes: number;
  lastUsable: number;
  partitions: { number: number; start: number; end: number; name: string }[];
}

async function gptLayout(devicePath: string, run: Runner): Promise<GptLayout> {
  const out = await run('sgdisk', ['--print', devicePath]);
  // A file says "Sector size (logical): 512 bytes", a block device "Sector size (logical/physical): 512/4096 bytes".
  const sector = /Sector size \(logical(?:\/physical)?\):\s*(\d+)/.exec(out);
  const usable = /last usable sector is (\d+)/.exec(out);
  if (!sector || !usable) throw new Error(`sgdisk --print ${devicePath} did not say the sector size and last usable sector`);
  // Rows: number, start, end, size ("2.0 MiB"), code, name (may be empty); fields within one line.
  const partitions = [...out.matchAll(/^[ \t]+(\d+)[ \t]+(\d+)[ \t]+(\d+)[ \t]+\S+ \S+[ \t]+\S+[ \t]*(.*)$/gm)].map((m) => ({
    number: Number(m[1]),
    start: Number(m[2]),
    end: Number(m[3]),
    name: (m[4] ?? '').trim(),
  }));
  return { sectorBytes: Number(sector[1]), lastUsable: Number(usable[1]), partitions };
}

async function gptPartition(devicePath: string, partitionBytes: number, run: Runner): Promise<ConfigDrivePartition> {
  // The image's backup header sits where the image ended; the disk goes on past it.
  await run('sgdisk', ['--move-second-header', devicePath]);
  const layout = await gptLayout(devicePath, run);
  const existing = layout.partitions.find((p) => p.name === CONFIG_DRIVE_NAME);
  if (existing) {
    return {
      table: 'gpt',
      number: existing.number,
      offsetBytes: existing.start * layout.sectorBytes,
      sizeBytes: (existing.end - existing.start + 1) * layout.sectorBytes,
      reused: true,
    };
  }
  const align = ALIGN_BYTES / layout.sectorBytes;
  const start = Math.floor((layout.lastUsable + 1 - partitionBytes / layout.sectorBytes) / align) * align;
  const lastUsed = Math.max(0, ...layout.partitions.map((p) => p.end));
  if (start <= lastUsed) {
    throw new Error(
      `no room for a ${partitionBytes / ALIGN_BYTES} MiB config drive partition at the end of ${devicePath}: the image's partitions reach sector ${lastUsed} of ${layout.lastUsable}; use a larger disk`,
    );
  }
  const used = new Set(layout.partitions.map((p) => p.number));
  const number = Array.from({ length: 128 }, (_, i) => i + 1).find((n) => !used.has(n));
  if (number === undefined) throw new Error(`the GPT of ${devicePath} has no free partition entry for the config drive`);
  await run('sgdisk', [
    `--new=${number}:${start}:${layout.lastUsable}`,
    `--typecode=${number}:8300`,
    `--change-name=${number}:${CONFIG_DRIVE_NAME}`,
    devicePath,
  ]);
  return {
    table: 'gpt',
    number,
    offsetBytes: start * layout.sectorBytes,
    sizeBytes: (layout.lastUsable - start + 1) * layout.sectorBytes,
    reused: false,
  };
}

interface SfdiskJson {
  partitiontable?: { label?: string; sectorsize?: number; partitions?: { node: string; start: number; size: number; type: string }[] };
}

async function mbrPartition(devicePath: string, diskBytes: number, partitionBytes: number, run: Runner): Promise<ConfigDrivePartition> {
  const read = async () => {
    const json = JSON.parse(await run('sfdisk', ['--json', devicePath])) as SfdiskJson;
    const t = json.partitiontable;
    return {
      sectorBytes: t?.sectorsize ?? 512,
      partitions: (t?.partitions ?? []).map((p) => ({ number: Number(/(\d+)$/.exec(p.node)?.[1] ?? 0), start: p.start, size: p.size })),
    };
  };
  const layout = await read();
  const sectors = Math.min(Math.floor(diskBytes / layout.sectorBytes), MBR_LIMIT_SECTORS);
  const align = ALIGN_BYTES / layout.sectorBytes;
  const start = Math.floor((sectors - partitionBytes / layout.sectorBytes) / align) * align;
  const size = sectors - start;
  const existing = layout.partitions.find((p) => p.start === start && p.size === size);
  if (existing) {
    return {
      table: 'mbr',
      number: existing.number,
      offsetBytes: start * layout.sectorBytes,
      sizeBytes: size * layout.sectorBytes,
      reused: true,
    };
  }
  const primaries = layout.partitions.filter((p) => p.number >= 1 && p.number <= 4);
  if (primaries.length >= 4) {
    throw new Error(`the MBR of ${devicePath} has four primary partitions already: no slot for the config drive; use a GPT image`);
  }
  const lastUsed = Math.max(0, ...layout.partitions.map((p) => p.start + p.size - 1));
  if (start <= lastUsed) {
    throw new Error(
      `no room for a ${partitionBytes / ALIGN_BYTES} MiB config drive partition at the end of ${devicePath}${sectors === MBR_LIMIT_SECTORS ? ' within the 2 TiB an MBR addresses' : ''}; use a larger disk`,
    );
  }
  await run('sfdisk', ['--append', '--no-reread', '--no-tell-kernel', '--quiet', devicePath], `start=${start}, size=${size}, type=83\n`);
  const made = (await read()).partitions.find((p) => p.start === start);
  if (!made) throw new Error(`sfdisk did not add the config drive partition to ${devicePath}`);
  return {
    table: 'mbr',
    number: made.number,
    offsetBytes: start * layout.sectorBytes,
    sizeBytes: size * layout.sectorBytes,
    reused: false,
  };
}
