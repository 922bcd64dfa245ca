import { spawnSync } from 'node:child_process';
import { appendFileSync, existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AGENT_ISO_APT_PACKAGES } from '../../../controller/boot/agent-iso.js';
import { type CertificateAuthority, createCertificateAuthority, issueCertificate } from '../../../common/certificates.js';
import { QmpMachine } from './qmp-machine.js';
import { RedfishSimulator } from './simulator.js';

/*
 * The lab's Redfish BMC for one guest (`npm run lab -- --power redfish`):
 * the simulator of simulator.ts in this process, on 127.0.0.1 at a port of
 * its own, over HTTPS with a certificate from a CA made for the lab run (the
 * controller verifies it with power.redfish.ca_file, as it would a real
 * BMC's: no insecure flag), in front of the guest's QMP socket (the guest's
 * NIC nic0 and CD drive cd0, lab/qemu.ts).
 *
 * Every request it answered goes to a log file of its own as it is answered
 * (time, method, path, how it was authenticated, status: never a header or body),
 * so that a failed run shows what the controller asked, and the lab can
 * check that no log holds the BMC's password.
 */

/** Why a guest cannot boot from virtual media here (the agent ISO cannot be built), or undefined. */
export function virtualMediaUnavailable(): string | undefined {
  for (const tool of ['grub-mkrescue', 'xorriso', 'mformat']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`], { timeout: 5000 }).status !== 0)
      return `${tool} is not installed: the agent ISO cannot be built (apt-get install -y ${AGENT_ISO_APT_PACKAGES})`;
  }
  for (const dir of ['/usr/lib/grub/i386-pc', '/usr/lib/grub/x86_64-efi']) {
    if (!existsSync(dir))
      return `${dir} is missing: the agent ISO cannot boot BIOS and UEFI (apt-get install -y ${AGENT_ISO_APT_PACKAGES})`;
  }
  return undefined;
}

/** One CA per lab run for every lab BMC's certificate (BMC certificates are usually signed by a site CA, not the controller's). */
export async function labBmcCa(dir: string): Promise<{ ca: CertificateAuthority; caFile: string }> {
  mkdirSync(dir, { recursive: true });
  const ca = await createCertificateAuthority({ commonName: 'metalcast lab BMC CA', validDays: 2 });
  const caFile = join(dir, 'bmc-ca.pem');
  writeFileSync(caFile, ca.certPem);
  return { ca, caFile };
}

export interface LabRedfishBmcOptions {
  name: string;
  /** Folder for the fetched media, the request log and the password file. */
  dir: string;
  username: string;
  password: string;
  ca: CertificateAuthority;
  /** The guest's second QMP socket (lab/qemu.ts bmcSocketPath). */
  qmpSocketPath: string;
  /** The guest's own boot order, as it was started: the NIC first (Pxe) or the disk (Hdd). */
  initial: 'Pxe' | 'Hdd';
  firmware: 'bios' | 'uefi';
}

export interface LabRedfishBmc {
  readonly simulator: RedfishSimulator;
  /** https://127.0.0.1:PORT */
  readonly url: string;
  /** The file holding the password (mode 0600), as an operator gives it: metalcast node create … --bmc-password-file. */
  readonly passwordFile: string;
  /** The request log, one line per request as it is answered. */
  readonly logPath: string;
  /** Ends the simulator and its QMP connection. Idempotent; never throws. */
  stop(): Promise<void>;
}

export async function startLabRedfishBmc(options: LabRedfishBmcOptions): Promise<LabRedfishBmc> {
  mkdirSync(options.dir, { recursive: true });
  const passwordFile = join(options.dir, 'password');
  writeFileSync(passwordFile, options.password, { mode: 0o600 });
  const leaf = await issueCertificate(options.ca, {
    commonName: `${options.name} BMC`,
    hosts: ['127.0.0.1'],
    usage: 'server',
    validDays: 2,
  });
  const logPath = join(options.dir, 'requests.log');
  writeFileSync(logPath, '');
  const simulator = await new RedfishSimulator({
    machine: new QmpMachine(options.qmpSocketPath, { nic: 'nic0', cdrom: 'cd0' }, options.initial),
    name: options.name,
    users: { [options.username]: options.password },
    tls: { key: leaf.keyPem, cert: leaf.certPem },
    firmware: options.firmware,
    mediaDir: join(options.dir, 'media'),
    onRequest: (r) => {
      const line = `${new Date().toISOString()} ${r.method} ${r.path} auth=${r.auth}${r.ifMatch ? ' if-match' : ''} -> ${r.status}\n`;
      try {
        appendFileSync(logPath, line);
      } catch {
        // the work folder went away: nothing to keep
      }
    },
  }).start();
  let stopped = false;
  return {
    simulator,
    url: simulator.url,
    passwordFile,
    logPath,
    async stop() {
      if (stopped) return;
      stopped = true;
      await simulator.stop().catch(() => {});
    },
  };
}
