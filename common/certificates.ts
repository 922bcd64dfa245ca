import { webcrypto } from 'node:crypto';
import { isIP } from 'node:net';
import * as x509 from '@peculiar/x509';

/**
 * Making keys and X.509 certificates (@peculiar/x509 over WebCrypto): the
 * agent's self-signed certificate at every start, and the CA, controller and
 * operator certificates of `metalcast tls init`, the demo and the tests.
 * Every key is ECDSA P-256 with SHA-256 signatures: small, fast to make, and
 * accepted by every TLS stack the fleet meets.
 */

const ECDSA_P256 = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' } as const;
const HOUR_MS = 3_600_000;
const DAY_MS = 24 * HOUR_MS;
/** notBefore is this far in the past, so that a peer whose clock is behind still accepts a certificate made just now. */
export const CLOCK_SKEW_MS = HOUR_MS;

/** A certificate and its private key, both PEM. */
export interface KeyAndCertificate {
  certPem: string;
  /** PKCS#8 PEM. */
  keyPem: string;
}

/** A CA that can sign: its certificate and key as PEM, and in the form the signer needs. */
export interface CertificateAuthority extends KeyAndCertificate {
  certificate: x509.X509Certificate;
  keys: webcrypto.CryptoKeyPair;
}

export interface CertificateOptions {
  /** Subject common name. */
  commonName: string;
  /** Subject organizational unit; the controller reads the operator role from it (OU=admin, OU=reader). */
  organizationalUnit?: string;
  /** Host names and IP addresses for the subjectAltName (IPv6 with or without brackets). */
  hosts?: readonly string[];
  /** What the key may authenticate (extendedKeyUsage). */
  usage: 'server' | 'client' | 'server-and-client';
  /** Validity from now (minus the clock-skew allowance). */
  validDays: number;
  /** "Now", for tests. */
  now?: number;
}

async function newKeyPair(): Promise<webcrypto.CryptoKeyPair> {
  return (await webcrypto.subtle.generateKey(ECDSA_P256, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
}

async function privateKeyPem(key: webcrypto.CryptoKey): Promise<string> {
  return x509.PemConverter.encode(await webcrypto.subtle.exportKey('pkcs8', key), 'PRIVATE KEY');
}

function subject(commonName: string, organizationalUnit?: string): x509.JsonName {
  return organizationalUnit ? [{ OU: [organizationalUnit] }, { CN: [commonName] }] : [{ CN: [commonName] }];
}

/** subjectAltName entries: IP addresses as IP, everything else as DNS names. */
function altNames(hosts: readonly string[]): x509.JsonGeneralName[] {
  return hosts.map((host) => {
    const bare = host.replace(/^\[|\]$/g, '');
    return isIP(bare) ? { type: 'ip' as const, value: bare } : { type: 'dns' as const, value: bare };
  });
}

function validity(options: { validDays: number; now?: number }) {
  const now = options.now ?? Date.now();
  return { notBefore: new Date(now - CLOCK_SKEW_MS), notAfter: new Date(now + options.validDays * DAY_MS) };
}

function usages(usage: CertificateOptions['usage']): string[] {
  if (usage === 'server') return [x509.ExtendedKeyUsage.serverAuth];
  if (usage === 'client') return [x509.ExtendedKeyUsage.clientAuth];
  return [x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth];
}

async function leafExtensions(options: CertificateOptions, publicKey: webcrypto.CryptoKey): Promise<x509.Extension[]> {
  const extensions: x509.Extension[] = [
    new x509.BasicConstraintsExtension(false, undefined, true),
    new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
    new x509.ExtendedKeyUsageExtension(usages(options.usage)),
    await x509.SubjectKeyIdentifierExtension.create(publicKey),
  ];
  if (options.hosts && options.hosts.length > 0) extensions.push(new x509.SubjectAlternativeNameExtension(altNames(options.hosts)));
  return extensions;
}

/** A new CA (self-signed, may sign leaf certificates only). */
export async function createCertificateAuthority(options: {
  commonName: string;
  validDays: number;
  now?: number;
}): Promise<CertificateAuthority> {
  const keys = await newKeyPair();
  const certificate = await x509.X509CertificateGenerator.createSelfSigned({
    name: subject(options.commonName),
    keys,
    signingAlgorithm: ECDSA_P256,
    ...validity(options),
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  return { certificate, keys, certPem: certificate.toString('pem'), keyPem: await privateKeyPem(keys.privateKey) };
}

/** A new key and a certificate for it signed by `ca`. */
export async function issueCertificate(ca: CertificateAuthority, options: CertificateOptions): Promise<KeyAndCertificate> {
  const keys = await newKeyPair();
  const certificate = await x509.X509CertificateGenerator.create({
    subject: subject(options.commonName, options.organizationalUnit),
    issuer: ca.certificate.subject,
    publicKey: keys.publicKey,
    signingKey: ca.keys.privateKey,
    signingAlgorithm: ECDSA_P256,
    ...validity(options),
    extensions: [...(await leafExtensions(options, keys.publicKey)), await x509.AuthorityKeyIdentifierExtension.create(ca.keys.publicKey)],
  });
  return { certPem: certificate.toString('pem'), keyPem: await privateKeyPem(keys.privateKey) };
}

/** A new key and a self-signed leaf certificate for it (the agent's identity: it is pinned, not chained). */
export async function selfSignedCertificate(options: CertificateOptions): Promise<KeyAndCertificate> {
  const keys = await newKeyPair();
  const certificate = await x509.X509CertificateGenerator.createSelfSigned({
    name: subject(options.commonName, options.organizationalUnit),
    keys,
    signingAlgorithm: ECDSA_P256,
    ...validity(options),
    extensions: await leafExtensions(options, keys.publicKey),
  });
  return { certPem: certificate.toString('pem'), keyPem: await privateKeyPem(keys.privateKey) };
}
