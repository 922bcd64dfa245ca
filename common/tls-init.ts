import { existsSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { createCertificateAuthority, issueCertificate, type KeyAndCertificate } from './certificates.js';

/*
 * The files of a private TLS deployment, made by `metalcast tls init` and by the
 * controller's --tls-generate alike; kept here so that neither program imports the other.
 */

/** What `metalcast tls init` writes, in this order; keys are mode 0600. */
export const TLS_INIT_FILES = {
  ca: 'ca.pem',
  caKey: 'ca-key.pem',
  controller: 'controller.pem',
  controllerKey: 'controller-key.pem',
  admin: 'admin.pem',
  adminKey: 'admin-key.pem',
} as const;

export interface TlsInitOptions {
  dir: string;
  /** Names and addresses agents and operators reach the controller at; all go into its certificate. */
  hosts: string[];
  /** Validity of the controller and admin certificates (the CA gets ten years). */
  days: number;
}

/**
 * Makes a private CA, a controller certificate for `hosts` and an operator
 * client certificate (OU=admin) signed by it, and writes them to `dir`.
 * Refuses to overwrite anything: every file is checked first, and each is
 * created exclusively. Returns the paths written.
 */
export async function tlsInit(options: TlsInitOptions): Promise<Record<keyof typeof TLS_INIT_FILES, string>> {
  const dir = resolve(options.dir);
  const paths = Object.fromEntries(Object.entries(TLS_INIT_FILES).map(([key, file]) => [key, join(dir, file)])) as Record<
    keyof typeof TLS_INIT_FILES,
    string
  >;
  const existing = Object.values(paths).filter((path) => existsSync(path));
  if (existing.length > 0) {
    throw new Error(
      `${existing.join(', ')} already exist${existing.length === 1 ? 's' : ''}; not overwriting: choose another --dir, or move them away`,
    );
  }
  const ca = await createCertificateAuthority({ commonName: 'metalcast CA', validDays: 3650 });
  const controller = await issueCertificate(ca, {
    commonName: `metalcast controller ${options.hosts[0]}`,
    hosts: options.hosts,
    usage: 'server-and-client',
    validDays: options.days,
  });
  const admin = await issueCertificate(ca, { commonName: 'admin', organizationalUnit: 'admin', usage: 'client', validDays: options.days });
  await mkdir(dir, { recursive: true });
  const write = (path: string, text: string, secret: boolean) => writeFile(path, text, { flag: 'wx', mode: secret ? 0o600 : 0o644 });
  const pairs: [string, string, KeyAndCertificate][] = [
    [paths.ca, paths.caKey, ca],
    [paths.controller, paths.controllerKey, controller],
    [paths.admin, paths.adminKey, admin],
  ];
  for (const [certPath, keyPath, pair] of pairs) {
    await write(keyPath, pair.keyPem, true);
    await write(certPath, pair.certPem, false);
  }
  return paths;
}
