import { Status } from 'nice-grpc-common';
import { MetalcastError } from '../../common/errors.js';
import { truncate } from '../../common/mac.js';

const invalid = (message: string) => new MetalcastError(Status.INVALID_ARGUMENT, message);

/** Same rule as node names, so that names are safe in URLs, logs and file names alike. */
const IMAGE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
const SHA256_HEX = /^[0-9a-f]{64}$/;
const SHA512_HEX = /^[0-9a-f]{128}$/;
const MAX_URL_LENGTH = 2048;

export function validateImageName(name: string, field = 'name'): string {
  if (name === '') throw invalid(`${field}: an image name is required`);
  if (!IMAGE_NAME.test(name)) {
    throw invalid(
      `${field}: '${truncate(name)}' is not a valid image name (1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit)`,
    );
  }
  return name;
}

/** An optional expected sha256: '' means none. */
export function validateOptionalSha256(value: string, field: string): string | undefined {
  if (value === '') return undefined;
  if (!SHA256_HEX.test(value)) {
    throw invalid(`${field}: '${truncate(value)}' is not a sha256 (64 lower-case hex digits, as sha256sum prints)`);
  }
  return value;
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
