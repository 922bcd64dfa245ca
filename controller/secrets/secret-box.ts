import { createCipheriv, createDecipheriv, createHash, randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';

/** Where the key lives by default, under the data directory. */
export const SECRETS_KEY_FILE = 'secrets.key';

/** Sealed values start with this: version 1, AES-256-GCM. */
const PREFIX = 'mcs1';
const KEY_BYTES = 32;
const IV_BYTES = 12;
const TAG_BYTES = 16;

/** A secret that cannot be opened: sealed by another key, or damaged. The message says which key and what to do. */
export class SecretError extends Error {
  override name = 'SecretError';
}

/**
 * Seals node secrets (BMC passwords) for the database and opens them again
 * for the power drivers: AES-256-GCM with a 32-byte key kept in a file of
 * the controller's (mode 0600; made at the first start), the secret's name
 * as associated data so that a sealed value cannot be moved to another key.
 * A sealed value names the key it was sealed with by a short fingerprint,
 * so that a controller holding another key says so instead of failing
 * obscurely. Several controllers on one database need the same key file.
 *
 * The database alone (a dump, a backup, a replica) then reveals no
 * password; the controller's host (data directory) still does, as it must
 * to power the machines.
 */
export class SecretBox {
  /** The first 8 hex digits of sha256(key): safe to show, names the key in errors. */
  readonly keyId: string;

  private constructor(
    private readonly key: Buffer,
    /** Where the key came from, for error messages. */
    readonly source: string,
  ) {
    this.keyId = createHash('sha256').update(key).digest('hex').slice(0, 8);
  }

  /** A box with a fresh random key held only in memory (tests, tools). */
  static ephemeral(): SecretBox {
    return new SecretBox(randomBytes(KEY_BYTES), 'memory');
  }

  /**
   * The key in `path` (64 hex digits), made (mode 0600) when the file does
   * not exist yet; an Error naming the file when it is unreadable or not a key.
   */
  static loadOrCreate(path: string): SecretBox {
    let text: string;
    try {
      text = readFileSync(path, 'utf8');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT')
        throw new Error(`cannot read the secrets key ${path}: ${(error as Error).message}`);
      mkdirSync(dirname(path), { recursive: true });
      const key = randomBytes(KEY_BYTES);
      try {
        // 'wx': two controllers starting at once on one directory must not both write a key.
        writeFileSync(path, `${key.toString('hex')}\n`, { mode: 0o600, flag: 'wx' });
        return new SecretBox(key, path);
      } catch (writeError) {
        if ((writeError as NodeJS.ErrnoException).code !== 'EEXIST')
          throw new Error(`cannot write the secrets key ${path}: ${(writeError as Error).message}`);
        text = readFileSync(path, 'utf8');
      }
    }
    const hex = text.trim();
    if (!/^[0-9a-f]{64}$/i.test(hex))
      throw new Error(`${path} is not a secrets key (64 hex digits); restore it from a backup or the other controllers`);
    return new SecretBox(Buffer.from(hex, 'hex'), path);
  }

  /** `value` sealed for the database, bound to the secret's `name`. */
  seal(name: string, value: string): string {
    const iv = randomBytes(IV_BYTES);
    const cipher = createCipheriv('aes-256-gcm', this.key, iv);
    cipher.setAAD(Buffer.from(name));
    const body = Buffer.concat([cipher.update(value, 'utf8'), cipher.final(), cipher.getAuthTag()]);
    return [PREFIX, this.keyId, iv.toString('base64url'), body.toString('base64url')].join('.');
  }

  /** The plain value of a sealed secret; SecretError when this key cannot open it. */
  open(name: string, sealed: string): string {
    const [prefix, keyId, iv, body] = sealed.split('.');
    if (prefix !== PREFIX || !keyId || !iv || !body)
      throw new SecretError(`secret ${name} is not a sealed value this controller understands`);
    if (keyId !== this.keyId) {
      throw new SecretError(
        `secret ${name} was sealed with key ${keyId}, but this controller's key (${this.source}) is ${this.keyId}: give every controller the same --secrets-key-file, or set the secret again`,
      );
    }
    const data = Buffer.from(body, 'base64url');
    try {
      const decipher = createDecipheriv('aes-256-gcm', this.key, Buffer.from(iv, 'base64url'));
      decipher.setAAD(Buffer.from(name));
      decipher.setAuthTag(data.subarray(data.length - TAG_BYTES));
      return Buffer.concat([decipher.update(data.subarray(0, data.length - TAG_BYTES)), decipher.final()]).toString('utf8');
    } catch {
      throw new SecretError(`secret ${name} is damaged (it does not authenticate with key ${this.keyId}); set it again`);
    }
  }

  /** Every secret of a node opened, by name. */
  openAll(sealed: Readonly<Record<string, string>>): Record<string, string> {
    return Object.fromEntries(Object.entries(sealed).map(([name, value]) => [name, this.open(name, value)]));
  }

  /** Every secret sealed, by name. */
  sealAll(plain: Readonly<Record<string, string>>): Record<string, string> {
    return Object.fromEntries(Object.entries(plain).map(([name, value]) => [name, this.seal(name, value)]));
  }
}
