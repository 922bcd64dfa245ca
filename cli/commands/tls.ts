import { X509Certificate } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import { join, resolve } from 'node:path';
import { type Command, InvalidArgumentError } from 'commander';
import { createCertificateAuthority, issueCertificate, type KeyAndCertificate } from '../../common/certificates.js';

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

/** Host names (RFC 1123 labels, wildcards refused) and IP addresses. */
function parseHosts(raw: string): string[] {
  const hosts = raw
    .split(',')
    .map((h) => h.trim().replace(/^\[|\]$/g, ''))
    .filter(Boolean);
  if (hosts.length === 0) throw new InvalidArgumentError('at least one host name or IP address is needed');
  for (const host of hosts) {
    if (
      isIP(host) === 0 &&
      !/^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/.test(host)
    ) {
      throw new InvalidArgumentError(`'${host}' is not a host name or an IP address`);
    }
  }
  return [...new Set(hosts)];
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

/** `metalcast tls init`: the files a TLS deployment needs, for sites without a CA of their own. */
export function registerTlsCommands(program: Command): void {
  const tls = program.command('tls').description('TLS certificates for the controller, the agents and operators');
  tls
    .command('init')
    .description(
      'make a private CA, a certificate for the controller and an operator client certificate (OU=admin), all signed by the CA; refuses to overwrite',
    )
    .requiredOption('--dir <dir>', 'directory to write ca.pem, ca-key.pem, controller.pem, controller-key.pem, admin.pem, admin-key.pem to')
    .requiredOption(
      '--host <name[,name...]>',
      'every host name and IP address agents and operators reach the controller at (they are checked against the certificate), e.g. ctl1.example.net,10.0.0.5',
      parseHosts,
    )
    .option(
      '--days <n>',
      'validity of the controller and admin certificates in days (the CA: 10 years)',
      (raw: string) => {
        const days = Number(raw);
        if (!Number.isInteger(days) || days < 1 || days > 3650)
          throw new InvalidArgumentError(`'${raw}' is not a number of days between 1 and 3650`);
        return days;
      },
      825,
    )
    .action(async (opts: { dir: string; host: string[]; days: number }) => {
      let paths: Awaited<ReturnType<typeof tlsInit>>;
      try {
        paths = await tlsInit({ dir: opts.dir, hosts: opts.host, days: opts.days });
      } catch (error) {
        process.stderr.write(`error: ${(error as Error).message}\n`);
        process.exitCode = 1;
        return;
      }
      const fingerprint = new X509Certificate(readFileSync(paths.controller)).fingerprint256;
      process.stdout.write(
        [
          `wrote ${Object.values(paths).join(', ')}`,
          '(the keys are mode 0600; keep ca-key.pem offline: it signs anything)',
          `controller certificate for ${opts.host.join(', ')}, SHA-256 ${fingerprint}`,
          '',
          'controller:  metalcast controller \\',
          `               --tls-cert ${paths.controller} --tls-key ${paths.controllerKey} [--tls-client-ca ${paths.ca}]`,
          `agents:      --ca ${paths.ca}   (in a ramdisk: copy ca.pem into the image and set metalcast.ca=/etc/metalcast/ca.pem)`,
          `operators:   metalcast node list --ca ${paths.ca}   (with --tls-client-ca: --cert ${paths.admin} --key ${paths.adminKey})`,
          '',
        ].join('\n'),
      );
    });
}
