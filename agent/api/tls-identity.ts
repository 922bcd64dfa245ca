import { X509Certificate } from 'node:crypto';
import { hostname } from 'node:os';
import { type KeyAndCertificate, selfSignedCertificate } from '../../common/certificates.js';

/** The agent's TLS identity: a key made at start that never leaves memory, and its self-signed certificate. */
export interface AgentTlsIdentity extends KeyAndCertificate {
  /** SHA-256 fingerprint, as the controller's log shows it when it pins the certificate. */
  fingerprint: string;
  validTo: string;
}

/**
 * How long the certificate is valid. The controller trusts it by pinning,
 * not by its dates, and forgets the pin when the node leaves the states
 * that wait for an agent; but OpenSSL still refuses an expired one, and an
 * agent that outlived its certificate could no longer be called. A year
 * is longer than any agent runs (a new start makes a new key).
 */
const VALID_DAYS = 365;

/**
 * Makes a fresh ECDSA P-256 key and a self-signed certificate for the
 * agent's API: notBefore an hour back (a controller whose clock is behind
 * still accepts it), the advertised host in the subjectAltName. The
 * controller pins it from the first heartbeat after a lookup.
 */
export async function createAgentTlsIdentity(advertiseHost: string, now = Date.now()): Promise<AgentTlsIdentity> {
  const hosts = [...new Set([advertiseHost, hostname()].filter((host) => host !== ''))];
  const made = await selfSignedCertificate({
    commonName: `metalcast agent ${hostname()}`,
    hosts,
    usage: 'server',
    validDays: VALID_DAYS,
    now,
  });
  const certificate = new X509Certificate(made.certPem);
  return { ...made, fingerprint: certificate.fingerprint256, validTo: new Date(certificate.validTo).toISOString() };
}
