import { parseDocument } from 'yaml';

/** Largest user data accepted, in bytes (what Nova allows, decoded). */
export const MAX_USER_DATA_BYTES = 64 * 1024;

export type UserDataType = 'cloud-config' | 'script' | 'mime-multipart' | 'gzip' | 'include' | 'boothook' | 'jinja';

export class UserDataError extends Error {
  override name = 'UserDataError';
}

/**
 * What cloud-init will make of user data, by its first line (cloud-init's
 * "user data formats"); refuses what it would ignore, and cloud-config that
 * is not a YAML mapping. The text itself never appears in an error: user
 * data may carry secrets.
 */
export function classifyUserData(data: Buffer): UserDataType {
  if (data.length === 0) throw new UserDataError('is empty; leave it out instead');
  if (data.length > MAX_USER_DATA_BYTES) throw new UserDataError(`is ${data.length} bytes, more than ${MAX_USER_DATA_BYTES}`);
  if (data[0] === 0x1f && data[1] === 0x8b) return 'gzip';
  const text = data.toString('utf8');
  const first = (text.split('\n', 1)[0] ?? '').trim().toLowerCase();
  if (first.startsWith('#cloud-config')) {
    const document = parseDocument(text);
    if (document.errors.length > 0) {
      const error = document.errors[0];
      const line = error?.linePos?.[0]?.line;
      throw new UserDataError(`is #cloud-config but not valid YAML${line ? ` (line ${line}: ${error?.code})` : ''}`);
    }
    const value = document.toJS() as unknown;
    if (value !== null && (typeof value !== 'object' || Array.isArray(value))) {
      throw new UserDataError('is #cloud-config but its YAML is not a mapping of module settings');
    }
    return 'cloud-config';
  }
  if (first.startsWith('#!')) return 'script';
  if (first.startsWith('#include')) return 'include';
  if (first.startsWith('#cloud-boothook')) return 'boothook';
  if (first.startsWith('## template: jinja')) return 'jinja';
  if (/^(content-type|mime-version):/i.test(first)) return 'mime-multipart';
  throw new UserDataError(
    'does not start with a line cloud-init acts on: #cloud-config, #! (a script), #include, #cloud-boothook, ## template: jinja, a MIME header, or gzip',
  );
}
