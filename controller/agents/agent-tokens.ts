import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';

/** A fresh 256-bit agent token, base64url. Only its hash is ever stored. */
export function generateAgentToken(): string {
  return randomBytes(32).toString('base64url');
}

export function hashAgentToken(token: string): string {
  return createHash('sha256').update(token).digest('hex');
}

/** Compares a presented token with a stored hash in constant time. */
export function agentTokenMatches(storedHash: string | null, presented: string): boolean {
  if (!storedHash || presented === '') return false;
  const expected = Buffer.from(storedHash, 'hex');
  const actual = createHash('sha256').update(presented).digest();
  return expected.length === actual.length && timingSafeEqual(expected, actual);
}
