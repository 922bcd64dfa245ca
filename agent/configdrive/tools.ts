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

/**
 * Where system tools live besides the PATH: sgdisk and sfdisk are in
 * /usr/sbin, which a non-root user's PATH on Debian does not hold (the demo
 * and a developer's agent run so; the ramdisk's PATH has it).
 */
export const SYSTEM_TOOL_DIRS: readonly string[] = ['/usr/local/sbin', '/usr/sbin', '/sbin'];

/** The path of a tool on the PATH or in `extraDirs`, or undefined. */
export function findAgentTool(tool: string, path: string, extraDirs: readonly string[] = SYSTEM_TOOL_DIRS): string | undefined {
  for (const dir of [...path.split(':').filter(Boolean), ...extraDirs]) {
    try {
      accessSync(join(dir, tool), constants.X_OK);
      return join(dir, tool);
    } catch {
      // not here
    }
  }
  return undefined;
}

/** What to run for `tool`: its full path when found (it may be outside the PATH, in /usr/sbin), else the bare name. */
export function agentToolCommand(tool: string): string {
  return findAgentTool(tool, process.env.PATH ?? '') ?? tool;
}

/**
 * The message naming every missing tool, its package and what needs it, or
 * undefined when all are there; `path` is the PATH to search, then `extraDirs`.
 */
export function missingAgentTools(path: string, extraDirs: readonly string[] = SYSTEM_TOOL_DIRS): string | undefined {
  const missing = AGENT_TOOLS.filter(({ tool }) => findAgentTool(tool, path, extraDirs) === undefined);
  if (missing.length === 0) return undefined;
  return `the agent needs ${missing.map(({ tool, pkg, why }) => `${tool} (Debian package ${pkg}; for the ${why})`).join(' and ')}, which ${missing.length === 1 ? 'is' : 'are'} not on the PATH (${path}) nor in ${extraDirs.join(', ') || 'any other directory'}: apt-get install -y ${missing.map(({ pkg }) => pkg).join(' ')}, or rebuild the ramdisk (npm run build:ramdisk)`;
}
