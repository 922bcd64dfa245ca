import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import {
  type CertificateAuthority,
  createCertificateAuthority,
  issueCertificate,
  type KeyAndCertificate,
} from '../../common/certificates.js';

/** A PEM pair written to files, with the PEM at hand too. */
export interface PemFiles extends KeyAndCertificate {
  cert: string;
  key: string;
}

/** A test PKI: a CA, a controller certificate for 127.0.0.1 and localhost, and operator client certificates. */
export interface TestPki {
  ca: CertificateAuthority;
  /** ca.pem, the bundle agents and the CLI verify the controller with. */
  caFile: string;
  controller: PemFiles;
  /** Client certificates signed by the CA: OU=admin, OU=reader. */
  admin: PemFiles;
  reader: PemFiles;
  /** Controller flags (camelCase) that serve TLS with this PKI. */
  controllerFlags: { tlsCert: string; tlsKey: string };
}

async function write(dir: string, name: string, pair: KeyAndCertificate): Promise<PemFiles> {
  const cert = join(dir, `${name}.pem`);
  const key = join(dir, `${name}-key.pem`);
  await writeFile(cert, pair.certPem);
  await writeFile(key, pair.keyPem, { mode: 0o600 });
  return { ...pair, cert, key };
}

/** Makes a fresh PKI in `dir` (an existing directory); `prefix` keeps several PKIs in one directory apart. */
export async function makeTestPki(dir: string, prefix = ''): Promise<TestPki> {
  const ca = await createCertificateAuthority({ commonName: `${prefix}test CA`, validDays: 2 });
  const caFile = join(dir, `${prefix}ca.pem`);
  await writeFile(caFile, ca.certPem);
  const controller = await write(
    dir,
    `${prefix}controller`,
    await issueCertificate(ca, {
      commonName: 'test controller',
      hosts: ['127.0.0.1', 'localhost'],
      usage: 'server-and-client',
      validDays: 2,
    }),
  );
  const admin = await write(
    dir,
    `${prefix}admin`,
    await issueCertificate(ca, { commonName: 'alice', organizationalUnit: 'admin', usage: 'client', validDays: 2 }),
  );
  const reader = await write(
    dir,
    `${prefix}reader`,
    await issueCertificate(ca, { commonName: 'bob', organizationalUnit: 'reader', usage: 'client', validDays: 2 }),
  );
  return { ca, caFile, controller, admin, reader, controllerFlags: { tlsCert: controller.cert, tlsKey: controller.key } };
}
