import ms from 'ms';
import { LOG_LEVELS } from './logging.js';
import type { LevelWithSilent } from 'pino';

/**
 * One option of a program: its flag, its environment variable and its
 * default, and how to turn the raw string into a typed, validated value.
 * A table of these drives `--help`, the environment, and start-up
 * validation, so the three cannot drift apart.
 */
export interface OptionSpec<T = unknown> {
  /** Long flag without dashes, for example "heartbeat-timeout". */
  flag: string;
  /** Help text; the environment variable and default are appended. */
  description: string;
  /** Default as the user would type it; undefined means "no default". */
  defaultValue?: string;
  /** Parses and validates; throws ConfigError-style messages (without the flag name). */
  parse: (raw: string) => T;
  /** For repeatable flags (commander collects them). */
  repeatable?: boolean;
  /** A switch: the flag alone means true (`--insecure`), and it still takes a value (`--insecure false`). Parse it with {@link switchValue}. */
  isSwitch?: boolean;
}

/** Thrown when configuration is invalid; its message lists every problem. */
export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`invalid configuration:\n  ${problems.join('\n  ')}`);
    this.name = 'ConfigError';
  }
}

/** METALCAST_HEARTBEAT_TIMEOUT for "heartbeat-timeout". */
export function envName(flag: string): string {
  return `METALCAST_${flag.toUpperCase().replaceAll('-', '_')}`;
}

/** heartbeatTimeout for "heartbeat-timeout", as commander names parsed flags. */
export function camelName(flag: string): string {
  return flag.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
}

type Specs = Record<string, OptionSpec>;
export type ConfigOf<S extends Specs> = { [K in keyof S]: S[K] extends OptionSpec<infer T> ? T : never };

/**
 * A source of raw option values below the environment, such as the agent's
 * kernel command line: the raw value for a flag, and how to name where it
 * came from in an error message.
 */
export type LowerSource = (flag: string) => { raw: string; source: string } | undefined;

/**
 * Resolves every option: flags beat METALCAST_* environment beat the lower
 * source (when given) beat defaults. Collects all problems before failing,
 * so a user fixes them in one go.
 */
export function resolveOptions<S extends Specs>(
  specs: S,
  flags: Record<string, unknown>,
  env: Record<string, string | undefined>,
  lower?: LowerSource,
): ConfigOf<S> {
  const problems: string[] = [];
  const out: Record<string, unknown> = {};
  for (const [key, spec] of Object.entries(specs)) {
    const fromFlag = flags[camelName(spec.flag)];
    const fromEnv = env[envName(spec.flag)];
    const fromLower = lower?.(spec.flag);
    let raw: string | undefined;
    let source: string;
    if (fromFlag !== undefined) {
      raw = Array.isArray(fromFlag) ? fromFlag.join(',') : String(fromFlag);
      source = `--${spec.flag}`;
    } else if (fromEnv !== undefined && fromEnv !== '') {
      raw = fromEnv;
      source = `${envName(spec.flag)} (environment)`;
    } else if (fromLower !== undefined) {
      ({ raw, source } = fromLower);
    } else {
      raw = spec.defaultValue;
      source = `--${spec.flag} (default)`;
    }
    if (raw === undefined) {
      out[key] = undefined;
      continue;
    }
    try {
      out[key] = spec.parse(raw);
    } catch (error) {
      problems.push(`${source}: ${(error as Error).message}`);
    }
  }
  if (problems.length > 0) throw new ConfigError(problems);
  return out as ConfigOf<S>;
}

/** Help text for one option: description, environment variable and default. */
export function optionHelp(spec: OptionSpec): string {
  const parts = [spec.description, `[env ${envName(spec.flag)}]`];
  if (spec.defaultValue !== undefined && spec.defaultValue !== '') parts.push(`(default: ${spec.defaultValue})`);
  return parts.join(' ');
}

// Parsers shared by the programs.

/** Parses "30s", "2m", "1500ms" or a bare number of milliseconds. */
export function duration(options: { min?: number; max?: number; allowZero?: boolean } = {}) {
  return (raw: string): number => {
    const trimmed = raw.trim();
    const value = /^\d+$/.test(trimmed) ? Number(trimmed) : (ms as (s: string) => number | undefined)(trimmed);
    if (value === undefined || !Number.isFinite(value) || value < 0) {
      throw new Error(`'${raw}' is not a duration such as 500ms, 30s, 2m or 1h`);
    }
    if (value === 0 && options.allowZero) return 0;
    if (options.min !== undefined && value < options.min) throw new Error(`'${raw}' is shorter than the minimum ${ms(options.min)}`);
    if (options.max !== undefined && value > options.max) throw new Error(`'${raw}' is longer than the maximum ${ms(options.max)}`);
    return Math.round(value);
  };
}

/** Parses "host:port" (IPv6 in brackets), port 0 allowed for an ephemeral port. */
export function hostPort(raw: string): string {
  const match = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(raw.trim());
  if (!match || Number(match[2]) > 65535) throw new Error(`'${raw}' is not of the form host:port (for example 0.0.0.0:7350)`);
  return raw.trim();
}

/** Parses a comma-separated list of host:port. */
export function hostPortList(raw: string): string[] {
  const items = raw
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  if (items.length === 0) throw new Error('at least one host:port is required');
  return items.map(hostPort);
}

/** Parses a byte count: "1048576", "512K", "1M", "4G" (powers of 1024). */
export function byteSize(options: { min: number; max: number }) {
  return (raw: string): number => {
    const match = /^(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?$/i.exec(raw.trim());
    if (!match) throw new Error(`'${raw}' is not a size such as 65536, 512K, 1M or 4G`);
    const factor = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 }[(match[2] ?? '').toUpperCase() as '' | 'K'];
    const value = Math.round(Number(match[1]) * factor);
    if (value < options.min || value > options.max) throw new Error(`${raw} is not between ${options.min} and ${options.max} bytes`);
    return value;
  };
}

export function integer(options: { min: number; max: number }) {
  return (raw: string): number => {
    if (!/^-?\d+$/.test(raw.trim())) throw new Error(`'${raw}' is not a whole number`);
    const value = Number(raw);
    if (value < options.min || value > options.max) throw new Error(`${value} is not between ${options.min} and ${options.max}`);
    return value;
  };
}

export function logLevel(raw: string): LevelWithSilent {
  const level = raw.trim().toLowerCase() as LevelWithSilent;
  if (!LOG_LEVELS.includes(level)) throw new Error(`'${raw}' is not one of ${LOG_LEVELS.join(', ')}`);
  return level;
}

export function boolean(raw: string): boolean {
  const value = raw.trim().toLowerCase();
  if (['true', 'yes', '1', 'on'].includes(value)) return true;
  if (['false', 'no', '0', 'off'].includes(value)) return false;
  throw new Error(`'${raw}' is not true or false`);
}

/** A switch's value: true or false, and '' (the flag or kernel command line key given alone) is true. */
export function switchValue(raw: string): boolean {
  return raw.trim() === '' ? true : boolean(raw);
}

export function nonEmpty(raw: string): string {
  if (raw.trim() === '') throw new Error('must not be empty');
  return raw.trim();
}

export function oneOf<T extends string>(values: readonly T[]) {
  return (raw: string): T => {
    if (!values.includes(raw as T)) throw new Error(`'${raw}' is not one of ${values.join(', ')}`);
    return raw as T;
  };
}
