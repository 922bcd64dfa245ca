import { accessSync, constants } from 'node:fs';
import { join } from 'node:path';

/**
 * The programs the agent runs, with the Debian package of each. The ramdisk
 * build (scripts/ramdisk/build-ramdisk.ts) puts every one of them in, and the
 * agent checks for them at start-up, so that a machine finds out at boot, not
 * in the middle of a deploy, that it cannot write a config drive.
 */
export const AGENT_TOOLS = [
  { tool: 'sgdisk', pkg: 'gdisk', why: 'config drive partition on GPT disks' },
  { tool: 'sfdisk', pkg: 'fdisk', why: 'config drive partition on MBR disks' },
] as const;

/** The path of a tool on the PATH (where the agent's child processes will look), or undefined. */
export function findAgentTool(tool: string, path: string): string | undefined {
  for (const dir of path.split(':').filter(Boolean)) {
    try {
      accessSync(join(dir, tool), constants.X_OK);
      return join(dir, tool);
    } catch {
      // not here
    }
  }
  return undefined;
}

/** Throws an Error naming every missing tool, its package and what needs it; `path` is the PATH to search. */
export function checkAgentTools(path: string): void {
  const missing = AGENT_TOOLS.filter(({ tool }) => findAgentTool(tool, path) === undefined);
  if (missing.length === 0) return;
  throw new Error(
    `the agent needs ${missing.map(({ tool, pkg, why }) => `${tool} (Debian package ${pkg}; for the ${why})`).join(' and ')}, which ${missing.length === 1 ? 'is' : 'are'} not on the PATH (${path}): apt-get install -y ${missing.map(({ pkg }) => pkg).join(' ')}, or rebuild the ramdisk (npm run build:ramdisk)`,
  );
}
