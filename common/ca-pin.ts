import { createHash, X509Certificate } from 'node:crypto';

/**
 * A CA certificate pinned by its SHA-256: how a network-booted agent trusts
 * the controller from its first packet. The controller puts
 * `metalcast.ca_fingerprint=sha256:<hex>` on the kernel command line (which
 * comes over the same boot path as the kernel itself) and serves the CA at
 * /ca.pem; the agent fetches it over plain HTTP and trusts only a
 * certificate whose DER hashes to the pin, whatever else the answer holds.
 */

const PIN = /^sha256:([0-9a-f]{64})$/;

/** `sha256:` and the lowercase hex SHA-256 of the certificate's DER. */
export function caPin(certificate: X509Certificate): string {
  return `sha256:${createHash('sha256').update(certificate.raw).digest('hex')}`;
}

/** The pin of the first certificate of a PEM bundle (the CA that signs the controller's chain). */
export function caPinOfPem(pem: string): string {
  const block = pemBlocks(pem)[0];
  if (!block) throw new Error('holds no PEM certificate');
  return caPin(new X509Certificate(block));
}

/** Checks the form `sha256:<64 lowercase hex>`; returns it, or throws saying what is wrong. */
export function parseCaPin(raw: string): string {
  const value = raw.trim();
  if (!PIN.test(value)) throw new Error(`'${raw}' is not of the form sha256:<64 lowercase hex digits>`);
  return value;
}

/** The PEM certificates of a bundle, as text blocks. */
export function pemBlocks(pem: string): string[] {
  return pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
}

/**
 * The one certificate of `pem` whose pin is `pin`, as PEM; undefined when
 * none matches. Others in the bundle are dropped, never trusted.
 */
export function pinnedCertificate(pem: string, pin: string): { pem: string; certificate: X509Certificate } | undefined {
  for (const block of pemBlocks(pem)) {
    let certificate: X509Certificate;
    try {
      certificate = new X509Certificate(block);
    } catch {
      continue;
    }
    if (caPin(certificate) === pin) return { pem: `${block}\n`, certificate };
  }
  return undefined;
}
