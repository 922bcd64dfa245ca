import { spawnSync } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawnGuarded } from '../../process-guard.js';
import { freePort } from '../../qemu.js';

/*
 * A real IPMI BMC for a lab guest: OpenIPMI's ipmi_sim (Debian's openipmi),
 * serving IPMI v2.0 over LAN (RMCP+, what `ipmitool -I lanplus` speaks) on
 * 127.0.0.1:<udp port>, with one admin user.
 *
 * ipmi_sim ships no configuration, so this writes its two files (man 5
 * ipmi_lan, man 5 ipmi_sim_cmd): lan.conf (the LAN channel, the user, a
 * VM serial interface and the chassis control program) and an .emu command
 * file (one BMC at IPMB 0x20).
 *
 * Boot device: ipmi_sim answers Set System Boot Options for the boot flags
 * (parameter 5: what `ipmitool chassis bootdev` sets) and the boot info
 * acknowledge that ipmitool sends first (parameter 4) only through a chassis
 * control program (lan.conf `chassis_control "PROG"`) or a loaded module;
 * with a VM serial interface alone it answers "Invalid data field in request".
 * With a chassis control program, ipmi_sim also hands it power and reset
 * (its `startcmd`, which would launch QEMU on power on, is then never used),
 * so the program (lab/bmc/ipmi/chassis-control.mjs) does all three on the
 * guest's QMP socket: the guest's QEMU is owned by lab/qemu.ts, like every
 * lab guest, and stays up across power cycles (off = CPUs stopped).
 *
 * QEMU still connects back to the BMC as a real machine's board does, through
 * `-chardev socket` + `-device ipmi-bmc-extern` + `-device isa-ipmi-bt`
 * (qemuArgs): the guest's OS sees a BT system interface served by this BMC.
 *
 * The password is written to lan.conf (mode 0600) and given to nothing else.
 */

export interface IpmiBmcOptions {
  /** Names the BMC (lan.conf `name`) and its files. */
  name: string;
  /** Folder for lan.conf, the .emu file, ipmi_sim's state and log. */
  dir: string;
  username: string;
  password: string;
  /** The guest's QMP socket the chassis control program acts through (one client at a time: not the lab's own). */
  qmpSocketPath: string;
  /** The guest's NIC device id (default nic0), whose bootindex is the boot device. */
  nicId?: string;
  /** Default ipmi_sim on the PATH. */
  binary?: string;
}

export interface IpmiBmc {
  readonly address: string;
  readonly port: number;
  /** ipmi_sim's log (its stdout and stderr). */
  readonly logPath: string;
  /** QEMU arguments that connect the guest's IPMI system interface (BT) to this BMC. */
  qemuArgs(): string[];
  /** Ends ipmi_sim. Idempotent; never throws. */
  stop(): Promise<void>;
  /** The process id while it runs. */
  readonly pid: number | undefined;
}

const CHASSIS_CONTROL = fileURLToPath(new URL('./chassis-control.mjs', import.meta.url));
const READY_TIMEOUT_MS = 15_000;

/** Why ipmi_sim BMCs cannot run here, or undefined when they can. */
export function ipmiBmcUnavailable(): string | undefined {
  const missing: string[] = [];
  for (const [tool, pkg] of [
    ['ipmi_sim', 'openipmi'],
    ['ipmitool', 'ipmitool'],
  ] as const) {
    const probe = spawnSync('sh', ['-c', `command -v ${tool}`], { timeout: 5000 });
    if (probe.status !== 0) missing.push(`${tool} is not installed (apt-get install -y ${pkg})`);
  }
  return missing.length > 0 ? missing.join('; ') : undefined;
}

/** A UDP port nobody has bound on 127.0.0.1 right now. */
export function freeUdpPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const socket = createSocket('udp4');
    socket.once('error', reject);
    socket.bind(0, '127.0.0.1', () => {
      const { port } = socket.address();
      socket.close(() => resolve(port));
    });
  });
}

/** lan.conf for one BMC (man 5 ipmi_lan). Quoted values may not hold a double quote. */
export function lanConf(options: {
  name: string;
  address: string;
  port: number;
  username: string;
  password: string;
  vmPort: number;
  chassisControl: string;
}): string {
  for (const [what, value] of Object.entries({ name: options.name, username: options.username, password: options.password })) {
    if (/["\n\\]/.test(value)) throw new Error(`the lab BMC's ${what} may not contain a double quote, a backslash or a newline`);
  }
  return `# Written by metalcast's lab (lab/bmc/ipmi/ipmi-bmc.ts) for ipmi_sim.
name "${options.name}"
set_working_mc 0x20
  startlan 1
    addr ${options.address} ${options.port}
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
  endlan
  serial 15 127.0.0.1 ${options.vmPort} codec VM
  chassis_control "${options.chassisControl}"
  user 1 false "" "" user 10 none md2 md5 straight
  user 2 true "${options.username}" "${options.password}" admin 10 none md2 md5 straight
`;
}

/** The .emu command file (man 5 ipmi_sim_cmd): one BMC at IPMB 0x20 with a SEL. */
export const EMU_COMMANDS = `mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable 0x20 1000 0x0a
mc_enable 0x20
`;

/** Starts ipmi_sim for one guest and waits until it answers over IPMI. */
export async function startIpmiBmc(options: IpmiBmcOptions): Promise<IpmiBmc> {
  const why = ipmiBmcUnavailable();
  if (why) throw new Error(`cannot start the lab IPMI BMC: ${why}`);
  mkdirSync(join(options.dir, 'state'), { recursive: true });
  const port = await freeUdpPort();
  const vmPort = await freePort();
  const address = '127.0.0.1';
  const chassisControl = [process.execPath, CHASSIS_CONTROL, options.qmpSocketPath, options.nicId ?? 'nic0']
    .map((word) => (/^[\w./:@+-]+$/.test(word) ? word : `'${word.replaceAll("'", "'\\''")}'`))
    .join(' ');
  const confPath = join(options.dir, 'lan.conf');
  writeFileSync(
    confPath,
    lanConf({ name: options.name, address, port, username: options.username, password: options.password, vmPort, chassisControl }),
    { mode: 0o600 },
  );
  const emuPath = join(options.dir, 'bmc.emu');
  writeFileSync(emuPath, EMU_COMMANDS);
  const logPath = join(options.dir, 'ipmi_sim.log');
  const binary = options.binary ?? 'ipmi_sim';
  const sim = spawnGuarded(binary, ['-c', confPath, '-f', emuPath, '-s', join(options.dir, 'state'), '-n', '-p'], logPath);
  const stop = () => sim.stop();

  // Ready when a real IPMI session works (Get Device ID: the chassis program, and so the guest, need not exist yet).
  const deadline = Date.now() + READY_TIMEOUT_MS;
  for (;;) {
    if (sim.exited)
      throw new Error(`ipmi_sim for ${options.name} exited at start: ${sim.output().trim() || 'no message'} (config ${confPath})`);
    const probe = spawnSync(
      'ipmitool',
      ['-I', 'lanplus', '-C', '3', '-H', address, '-p', String(port), '-U', options.username, '-E', '-N', '1', '-R', '1', 'mc', 'info'],
      { env: { PATH: process.env.PATH ?? '/usr/bin:/bin', IPMI_PASSWORD: options.password }, timeout: 5000, encoding: 'utf8' },
    );
    if (probe.status === 0) break;
    if (Date.now() > deadline) {
      await stop();
      throw new Error(
        `ipmi_sim for ${options.name} did not answer IPMI within ${READY_TIMEOUT_MS / 1000} s: ${probe.stderr?.trim()}; log: ${sim.output().trim()}`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }

  return {
    address,
    port,
    logPath,
    get pid() {
      return sim.exited ? undefined : sim.child.pid;
    },
    qemuArgs: () => [
      '-chardev',
      `socket,id=ipmi0,host=127.0.0.1,port=${vmPort},reconnect=2`,
      '-device',
      'ipmi-bmc-extern,id=bmc0,chardev=ipmi0',
      '-device',
      'isa-ipmi-bt,bmc=bmc0',
    ],
    stop,
  };
}
