import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ConfigError, type LowerSource } from '../../common/config.js';

/**
 * The agent's settings on the kernel command line: how a PXE-booted ramdisk
 * learns where its controller is, from the boot loader's configuration
 * (`metalcast.controller=10.0.0.1:7350 metalcast.log_level=debug`).
 */

/** Only tokens that start with this are ours; everything else belongs to the kernel or init. */
export const KERNEL_CMDLINE_PREFIX = 'metalcast.';

/** One `metalcast.<key>=<value>` as it was written. */
export interface KernelSetting {
  /** The key as written, for messages: "metalcast.log_level". */
  key: string;
  value: string;
}

/** The metalcast.* part of a kernel command line, sorted by what the agent does with it. */
export interface KernelCmdline {
  /** Values of agent options by flag name ("log-level"); a key given twice takes its last value, as kernel parameters do. */
  options: Map<string, KernelSetting>;
  /** Keys the agent knows but takes no value from, each with the reason (metalcast.ca: not used yet). */
  ignored: { key: string; reason: string }[];
  /** Keys that name nothing the agent knows, as written. */
  unknown: string[];
}

/** What the parser accepts: the flags it may set, and the keys it knows but ignores (with why). */
export interface KernelCmdlineKeys {
  flags: readonly string[];
  ignored: Readonly<Record<string, string>>;
}

/**
 * Splits a kernel command line into parameters the way the kernel does
 * (lib/cmdline.c next_arg): whitespace separates, except inside double
 * quotes; quotes around a whole parameter or around its value are removed.
 */
export function splitKernelCmdline(text: string): string[] {
  const params: string[] = [];
  let i = 0;
  while (i < text.length) {
    while (i < text.length && /\s/.test(text[i] as string)) i++;
    if (i >= text.length) break;
    const start = i;
    let inQuote = false;
    while (i < text.length && (inQuote || !/\s/.test(text[i] as string))) {
      if (text[i] === '"') inQuote = !inQuote;
      i++;
    }
    params.push(unquote(text.slice(start, i)));
  }
  return params;
}

function unquote(param: string): string {
  let p = param;
  if (p.startsWith('"')) p = p.endsWith('"') && p.length > 1 ? p.slice(1, -1) : p.slice(1);
  const equals = p.indexOf('=');
  if (equals < 0) return p;
  let value = p.slice(equals + 1);
  if (value.startsWith('"')) value = value.endsWith('"') && value.length > 1 ? value.slice(1, -1) : value.slice(1);
  return `${p.slice(0, equals + 1)}${value}`;
}

/** "metalcast.log_level" and "metalcast.Log-Level" both name the flag "log-level". */
function flagOf(key: string): string {
  return key.slice(KERNEL_CMDLINE_PREFIX.length).toLowerCase().replaceAll('_', '-');
}

/** The written form of a flag's key, as the boot loader configuration would spell it: "metalcast.log_level". */
export function kernelKey(flag: string): string {
  return `${KERNEL_CMDLINE_PREFIX}${flag.replaceAll('-', '_')}`;
}

/**
 * Picks the metalcast.* parameters out of a kernel command line (pure).
 * Other parameters are none of the agent's business and are left alone;
 * a metalcast.* key without '=' has the empty value.
 */
export function parseKernelCmdline(text: string, keys: KernelCmdlineKeys): KernelCmdline {
  const known = new Set(keys.flags);
  const result: KernelCmdline = { options: new Map(), ignored: [], unknown: [] };
  for (const param of splitKernelCmdline(text)) {
    if (!param.startsWith(KERNEL_CMDLINE_PREFIX)) continue;
    const equals = param.indexOf('=');
    const key = equals < 0 ? param : param.slice(0, equals);
    const value = equals < 0 ? '' : param.slice(equals + 1);
    const flag = flagOf(key);
    const reason = Object.hasOwn(keys.ignored, flag) ? keys.ignored[flag] : undefined;
    if (reason !== undefined) {
      if (!result.ignored.some((i) => i.key === key)) result.ignored.push({ key, reason });
    } else if (known.has(flag)) {
      result.options.set(flag, { key, value });
    } else if (!result.unknown.includes(key)) {
      result.unknown.push(key);
    }
  }
  return result;
}

/** The kernel command line as a source below the environment, named in errors: "metalcast.controller= (kernel command line)". */
export function kernelCmdlineSource(cmdline: KernelCmdline): LowerSource {
  return (flag) => {
    const setting = cmdline.options.get(flag);
    return setting && { raw: setting.value, source: `${setting.key}= (kernel command line)` };
  };
}

/** A log line the agent writes about its kernel command line once its logger exists. */
export interface KernelCmdlineNote {
  level: 'info' | 'warn';
  fields: Record<string, unknown>;
  message: string;
}

/**
 * What to tell the operator about the kernel command line (pure): which
 * settings it gave, which keys are known but ignored, and which keys are
 * unknown, with the known ones listed, since a typo there would otherwise
 * leave a ramdisk looking for the wrong controller without a word.
 */
export function kernelCmdlineNotes(cmdline: KernelCmdline, keys: KernelCmdlineKeys): KernelCmdlineNote[] {
  const notes: KernelCmdlineNote[] = [];
  if (cmdline.options.size > 0) {
    notes.push({
      level: 'info',
      fields: { settings: [...cmdline.options.values()].map((s) => `${s.key}=${s.value}`) },
      message: 'settings from the kernel command line (flags and METALCAST_* environment win over them)',
    });
  }
  for (const { key, reason } of cmdline.ignored) {
    notes.push({ level: 'warn', fields: { key }, message: `${key} on the kernel command line is ignored: ${reason}` });
  }
  if (cmdline.unknown.length > 0) {
    notes.push({
      level: 'warn',
      fields: { unknown: cmdline.unknown, known: [...keys.flags, ...Object.keys(keys.ignored)].map(kernelKey) },
      message: `unknown key${cmdline.unknown.length > 1 ? 's' : ''} on the kernel command line ignored: ${cmdline.unknown.join(', ')}`,
    });
  }
  return notes;
}

/**
 * Reads `<root>/proc/cmdline`; undefined when there is none (not Linux, or
 * a fake machine without one), which is the same as an empty command line.
 */
export async function readKernelCmdline(root: string): Promise<string | undefined> {
  const path = join(root, 'proc', 'cmdline');
  try {
    return await readFile(path, 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new ConfigError([`cannot read the kernel command line ${path}: ${(error as Error).message}`]);
  }
}
