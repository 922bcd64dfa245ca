import { Status } from 'nice-grpc-common';
import { MetalcastError } from '../common/errors.js';
import { truncate } from '../common/mac.js';

const invalid = (message: string) => new MetalcastError(Status.INVALID_ARGUMENT, message);

const NODE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

export function validateNodeName(name: string): string {
  if (!NODE_NAME.test(name)) {
    throw invalid(
      `name: '${truncate(name)}' is not a valid node name (1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit)`,
    );
  }
  return name;
}

/** A node reference: uuid or name. */
export function validateNodeRef(ref: string, field = 'node'): string {
  if (ref === '') throw invalid(`${field}: a node uuid or name is required`);
  if (ref.length > 63 && !/^[0-9a-f-]{36}$/.test(ref)) throw invalid(`${field}: '${truncate(ref)}' is neither a node uuid nor a node name`);
  return ref;
}

export function validateProperties(properties: Record<string, string>): Record<string, string> {
  const entries = Object.entries(properties);
  if (entries.length > 64) throw invalid(`properties: at most 64 entries, got ${entries.length}`);
  for (const [key, value] of entries) {
    if (!/^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$/.test(key))
      throw invalid(`properties: key '${truncate(key)}' must be 1 to 64 letters, digits, '.', '_', '/' or '-'`);
    if (value.length > 1024) throw invalid(`properties.${key}: value longer than 1024 characters`);
  }
  return properties;
}

/** Page size: 0 means the default; larger than the maximum is an error, not silently clipped. */
export function pageSize(value: number, defaultSize = 100, max = 1000): number {
  if (value === 0) return defaultSize;
  if (value > max) throw invalid(`page_size: at most ${max}, got ${value}`);
  return value;
}

/** Page tokens are opaque to clients: base64url of the last key of the previous page. */
export function encodePageToken(key: string | number): string {
  return Buffer.from(JSON.stringify(key)).toString('base64url');
}

export function decodePageToken<T extends string | number>(token: string, kind: 'string' | 'number'): T | undefined {
  if (token === '') return undefined;
  try {
    const value: unknown = JSON.parse(Buffer.from(token, 'base64url').toString());
    if (typeof value === kind) return value as T;
  } catch {
    // fall through to the error below
  }
  throw invalid('page_token: not a token this controller issued; pass next_page_token from the previous page');
}
