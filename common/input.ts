import { Status } from 'nice-grpc-common';
import type { DiskHints } from '../gen/metalcast/v1/command.js';
import { MetalcastError } from './errors.js';
import { truncate } from './mac.js';

/*
 * Rules for untrusted strings that both programs check: names, uuids,
 * hex digests and free text. The provisioning network is hostile, so every
 * string a request carries is bounded, and text that ends up in front of an
 * operator (a terminal, a log viewer) carries no control characters, which
 * could rewrite the screen.
 */

const invalid = (message: string) => new MetalcastError(Status.INVALID_ARGUMENT, message);

/** Node and image names: safe in URLs, logs, file names and shells alike. */
export const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
/** The name rule in words, for error messages. */
export const NAME_RULE = "1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit";
export const UUID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
export const SHA256_HEX = /^[0-9a-f]{64}$/;

/** C0 controls but tab (and newline in `multiline` text), DEL and C1 controls: the position of the first, or -1. */
function controlCharacterAt(value: string, multiline: boolean): number {
  for (let i = 0; i < value.length; i++) {
    const code = value.charCodeAt(i);
    if ((code < 0x20 && code !== 0x09 && !(multiline && code === 0x0a)) || (code >= 0x7f && code <= 0x9f)) return i;
  }
  return -1;
}

/** A name of `kind` ('node', 'image'); INVALID_ARGUMENT naming `field` otherwise. */
export function checkName(value: string, field: string, kind: string): string {
  if (value === '') throw invalid(`${field}: ${kind === 'image' ? 'an' : 'a'} ${kind} name is required`);
  if (!NAME_PATTERN.test(value)) throw invalid(`${field}: '${truncate(value)}' is not a valid ${kind} name (${NAME_RULE})`);
  return value;
}

/** Free text of at most `max` characters without control characters ('' allowed). */
export function checkText(value: string, field: string, max: number, options: { multiline?: boolean } = {}): string {
  if (value.length > max) throw invalid(`${field}: at most ${max} characters, got ${value.length}`);
  const at = controlCharacterAt(value, options.multiline ?? false);
  if (at >= 0) {
    const code = value.charCodeAt(at).toString(16).toUpperCase().padStart(4, '0');
    throw invalid(`${field}: control character U+${code} at position ${at} is not allowed`);
  }
  return value;
}

/** A string bounded in length only (identifiers the program never shows or interprets). */
export function checkLength(value: string, field: string, max: number): string {
  if (value.length > max) throw invalid(`${field}: at most ${max} characters, got ${value.length}`);
  return value;
}

/** A list of at most `max` entries. */
export function checkCount<T>(values: readonly T[], field: string, max: number, what = 'entries'): readonly T[] {
  if (values.length > max) throw invalid(`${field}: at most ${max} ${what}, got ${values.length}`);
  return values;
}

/** An absolute device path such as /dev/sda or /dev/disk/by-path/…: at most 255 characters, no '..' and no controls. */
export function checkDevicePath(value: string, field: string): string {
  checkText(value, field, 255);
  if (!value.startsWith('/') || value.split('/').includes('..')) {
    throw invalid(`${field}: '${truncate(value)}' is not an absolute device path such as /dev/sda`);
  }
  return value;
}

/** A lower-case hex sha256 ('' only when `optional`). */
export function checkSha256(value: string, field: string, optional = false): string {
  if (value === '' && optional) return value;
  if (!SHA256_HEX.test(value))
    throw invalid(`${field}: '${truncate(value)}' is not a sha256 (64 lower-case hex digits, as sha256sum prints)`);
  return value;
}

/** A value of a proto enum (ts-proto hands unknown numbers through, and -1 for UNRECOGNIZED). */
export function checkEnum<E extends number>(value: number, known: Record<string, string | number>, field: string): E {
  const name = known[value];
  if (typeof name !== 'string' || name === 'UNRECOGNIZED') {
    const names = Object.entries(known)
      .filter(([key, v]) => typeof v === 'number' && v >= 0 && key !== 'UNRECOGNIZED')
      .map(([key]) => key);
    throw invalid(`${field}: ${value} is not one of ${names.join(', ')}`);
  }
  return value as E;
}

/** Disk hints (deploy targets, write_image): every string bounded, the device path absolute. */
export function checkDiskHints(hints: DiskHints | undefined, field: string): DiskHints | undefined {
  if (!hints) return hints;
  if (hints.devicePath !== undefined) checkDevicePath(hints.devicePath, `${field}.device_path`);
  if (hints.name !== undefined) checkText(hints.name, `${field}.name`, 64);
  if (hints.serial !== undefined) checkText(hints.serial, `${field}.serial`, 256);
  if (hints.model !== undefined) checkText(hints.model, `${field}.model`, 256);
  return hints;
}
