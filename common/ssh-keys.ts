import { createHash } from 'node:crypto';

/** OpenSSH public key types sshd accepts in authorized_keys (OpenSSH 9). */
const KEY_TYPES = new Set([
  'ssh-ed25519',
  'ssh-rsa',
  'ecdsa-sha2-nistp256',
  'ecdsa-sha2-nistp384',
  'ecdsa-sha2-nistp521',
  'sk-ssh-ed25519@openssh.com',
  'sk-ecdsa-sha2-nistp256@openssh.com',
]);

export interface SshPublicKey {
  type: string;
  /** The key as one authorized_keys line: type, base64 blob, comment. */
  line: string;
  comment: string;
  /** As ssh-keygen -l prints it: "SHA256:" and the unpadded base64 of the blob's sha256. */
  fingerprint: string;
}

/**
 * Reads one OpenSSH public key ("ssh-ed25519 AAAA… comment", the line of a
 * .pub file). Throws an Error saying what is wrong: a private key, an
 * unknown type, a blob that does not decode or names another type.
 */
export function parseSshPublicKey(text: string): SshPublicKey {
  const line = text.trim();
  if (line.includes('PRIVATE KEY')) {
    throw new Error('this is a private key; give the public key (the .pub file, or ssh-keygen -y -f KEY)');
  }
  if (/[\r\n]/.test(line)) throw new Error('a public key is one line');
  const [type = '', blob = '', ...rest] = line.split(/\s+/);
  if (!KEY_TYPES.has(type)) {
    throw new Error(`'${type.slice(0, 40)}' is not an OpenSSH public key type (${[...KEY_TYPES].join(', ')})`);
  }
  const decoded = /^[A-Za-z0-9+/]+={0,2}$/.test(blob) ? Buffer.from(blob, 'base64') : Buffer.alloc(0);
  const nameLength = decoded.length >= 4 ? decoded.readUInt32BE(0) : -1;
  const inner = nameLength > 0 && nameLength + 4 <= decoded.length ? decoded.subarray(4, 4 + nameLength).toString('latin1') : '';
  if (inner !== type) throw new Error(`the key data of this ${type} key does not decode to a ${type} key`);
  const comment = rest.join(' ');
  const fingerprint = `SHA256:${createHash('sha256').update(decoded).digest('base64').replace(/=+$/, '')}`;
  return { type, line: comment ? `${type} ${blob} ${comment}` : `${type} ${blob}`, comment, fingerprint };
}
