import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { type Command, InvalidArgumentError } from 'commander';
import { tlsInit } from '../../common/tls-init.js';
import { cliInteger } from '../parsers.js';

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
    .option('--days <n>', 'validity of the controller and admin certificates in days (the CA: 10 years)', cliInteger(1, 3650), 825)
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
