import { Status } from 'nice-grpc-common';
import { MetalcastError } from '../../common/errors.js';
import { checkName, checkSha256, SHA256_HEX } from '../../common/input.js';
import { truncate } from '../../common/mac.js';

const invalid = (message: string) => new MetalcastError(Status.INVALID_ARGUMENT, message);

const SHA512_HEX = /^[0-9a-f]{128}$/;
const MAX_URL_LENGTH = 2048;

/** Same rule as node names (common/input.ts), so that names are safe in URLs, logs and file names alike. */
export function validateImageName(name: string, field = 'name'): string {
  return checkName(name, field, 'image');
}

/** An optional expected sha256: '' means none. */
export function validateOptionalSha256(value: string, field: string): string | undefined {
  if (value === '') return undefined;
  return checkSha256(value, field);
}

export function validateImageSize(size: number, maxBytes: number, field: string): number | undefined {
  if (size === 0) return undefined;
  if (!Number.isSafeInteger(size) || size < 0) throw invalid(`${field}: ${size} is not a byte count`);
  if (size > maxBytes) {
    throw invalid(`${field}: ${size} bytes is more than this controller accepts (--max-image-size, ${maxBytes} bytes)`);
  }
  return size;
}

/** An http(s) URL to import from. */
export function validateImportUrl(raw: string, field = 'url'): URL {
  if (raw === '') throw invalid(`${field}: the http or https URL to import from is required`);
  if (raw.length > MAX_URL_LENGTH) throw invalid(`${field}: longer than ${MAX_URL_LENGTH} characters`);
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw invalid(`${field}: '${truncate(raw)}' is not a URL; give one like https://example.com/images/ubuntu.img`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw invalid(`${field}: ${url.protocol.slice(0, -1)} URLs are not supported; use http or https`);
  }
  return url;
}

export interface Checksum {
  algorithm: 'sha256' | 'sha512';
  /** Lower-case hex. */
  hex: string;
}

/** "sha256:<64 hex>" or "sha512:<128 hex>"; hex digits are accepted in either case and kept in lower case. */
export function parseChecksum(raw: string, field = 'checksum'): Checksum {
  const index = raw.indexOf(':');
  const algorithm = index < 0 ? '' : raw.slice(0, index).toLowerCase();
  const hex = raw.slice(index + 1).toLowerCase();
  if (algorithm === 'sha256' && SHA256_HEX.test(hex)) return { algorithm, hex };
  if (algorithm === 'sha512' && SHA512_HEX.test(hex)) return { algorithm, hex };
  if (raw === '')
    throw invalid(`${field}: required, as sha256:<64 hex digits> or sha512:<128 hex digits>, so that the download can be verified`);
  if (algorithm === 'sha256' || algorithm === 'sha512') {
    throw invalid(`${field}: a ${algorithm} has ${algorithm === 'sha256' ? 64 : 128} hex digits; '${truncate(raw)}' does not`);
  }
  throw invalid(`${field}: '${truncate(raw)}' is not of the form sha256:<64 hex digits> or sha512:<128 hex digits>`);
}

export function formatChecksum(checksum: Checksum): string {
  return `${checksum.algorithm}:${checksum.hex}`;
}

/** The URL without user name or password, for the database, logs and error messages. */
export function redactUrl(url: URL): string {
  if (url.username === '' && url.password === '') return url.href;
  const copy = new URL(url.href);
  copy.username = '***';
  copy.password = '';
  return copy.href;
}
