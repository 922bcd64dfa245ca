import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  closeSync,
  copyFileSync,
  existsSync,
  ftruncateSync,
  fstatSync,
  mkdirSync,
  openSync,
  readSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { createServer } from 'node:net';
import { dirname } from 'node:path';
import { QmpClient, type QmpEvent } from './qmp.js';

/*
 * A QEMU guest as a lab machine: its own MAC on a virtio NIC behind QEMU's
 * user networking (the guest reaches the host's 127.0.0.1:PORT at
 * 10.0.2.2:PORT), a virtio disk backed by a raw file, a serial console
 * written to a file, and QMP sockets to power it on and off like a BMC.
 *
 * Power. One QEMU process is the machine, from startGuest() to stop(); it
 * runs with -no-shutdown, so that a guest that powers itself off
 * (`poweroff -f`) stops instead of ending QEMU, and the machine can be
 * powered on again through QMP alone. Off is "CPUs stopped": power off is
 * QMP `stop` (hard, no ACPI: a ramdisk has nothing listening), power on is
 * `system_reset` then `cont` (just `cont` the first time, after -S), reset
 * is `system_reset`. A guest reboot resets it in place. That is all a power
 * driver outside this process (the controller's) needs: give it
 * bmcSocketPath, a QMP socket of its own, since QEMU serves one client per
 * socket; this module follows the state through the events either causes.
 *
 * Boot device. `-boot order=` is read once at start and cannot change. The
 * NIC and the disk carry `bootindex` properties instead (devices nic0 and
 * disk0), which QMP `qom-set` changes while QEMU runs; QEMU rebuilds the
 * firmware's boot order (fw_cfg "bootorder") at every reset, so the new
 * device boots from the next reset or power on, guest reboots included.
 * Network first is NIC 1, disk 2; disk first is disk 2, NIC 3: only the NIC's
 * index moves, and no two devices ever share one, which QEMU refuses. Either
 * way SeaBIOS falls back to the other device when the first cannot boot, as
 * a real machine does. A direct kernel boot (-kernel) wins over every
 * bootindex, so switching from or to one restarts the QEMU process at the
 * next power on (same disk, same console file).
 *
 * Firmware. SeaBIOS by default; `firmware: 'uefi'` boots OVMF (Debian's
 * ovmf: OVMF_CODE_4M.fd read-only, and a per-guest copy of OVMF_VARS_4M.fd
 * as its NVRAM). OVMF honours the same bootindex order; its network boot
 * runs the EFI build of the same iPXE ROM, and a deployed disk boots through
 * its ESP's EFI/BOOT/BOOTX64.EFI. The firmware is fixed for the life of the
 * QEMU process.
 *
 * Every QEMU runs under a small shell that kills it when this process's end
 * of its stdin closes, so no guest outlives the program that started it,
 * however that program dies; an exit handler also kills what is left.
 */

/** Where the guest boots from: its NIC (iPXE), its disk, or a kernel given to QEMU directly. */
export type BootDevice = 'network' | 'disk';
export interface KernelBoot {
  kernel: string;
  initrd: string;
  append: string;
}
export type BootSource = BootDevice | KernelBoot;

export interface GuestOptions {
  /** Names the QEMU process and the machine's SMBIOS serial number. */
  name: string;
  /** aa:bb:cc:dd:ee:ff of the virtio NIC. */
  mac: string;
  /** Raw disk image file, created when missing. */
  diskPath: string;
  /** Grows (or creates, sparse) the disk file to this size before starting; default: leave it as it is (1 GiB when created). */
  diskSizeBytes?: number;
  /** virtio-blk serial (/sys/block/vda/serial), at most 20 characters; default derived from the name. */
  diskSerial?: string;
  boot: BootSource;
  /** Serial console output, appended to across power cycles. */
  consolePath: string;
  /** The QMP unix socket QEMU creates for this module (at most 107 bytes of path). */
  qmpSocketPath: string;
  /** A second QMP socket, for a power driver in another process (the controller's): QEMU serves one client per socket. */
  bmcSocketPath?: string;
  /** Default 1024: the agent ramdisk unpacks about 110 MiB into memory. */
  memoryMiB?: number;
  /** Default 1. */
  cpus?: number;
  /**
   * The URL iPXE loads after DHCP (QEMU's DHCP `bootfile`), for example
   * http://10.0.2.2:8080/boot.ipxe. Needed for network boot.
   */
  netBootUrl?: string;
  /** Forward a port on the host's 127.0.0.1 to this guest port (the agent's API, 9999), so that the host can call the agent. */
  forwardGuestPort?: number;
  /** The host port for forwardGuestPort; default a free one. */
  forwardHostPort?: number;
  /** Power on at start (default true); otherwise QEMU waits, off, for powerOn() (or the BMC socket's `cont`). */
  poweredOn?: boolean;
  /** Default qemu-system-x86_64 on the PATH. */
  qemuBinary?: string;
  /**
   * An empty IDE CD drive (QEMU device cd0), last in the boot order
   * (bootindex 4): a Redfish BMC of lab/bmc/redfish/ puts virtual media in it
   * and moves it first for a Cd boot override. Default: none.
   */
  cdrom?: boolean;
  /** Appended to QEMU's arguments. */
  extraArgs?: string[];
  /**
   * A command QEMU runs under, e.g. ['ip', 'netns', 'exec', NS] for a guest
   * on a tap inside a network namespace; it must exec QEMU (so the pid is
   * QEMU's). Default none.
   */
  commandPrefix?: string[];
  /**
   * A tap interface (made beforehand, in the namespace of commandPrefix) for
   * the NIC instead of QEMU's user networking: the guest then network-boots
   * from whatever DHCP server is on that segment, so netBootUrl, the port
   * forward and 10.0.2.2 do not apply. Default: user networking.
   */
  tap?: string;
  /**
   * The NIC's option ROM file (QEMU's romfile=): undefined for QEMU's default
   * (iPXE from ipxe-qemu), '' for none (OVMF then boots the network with its
   * own PXE).
   */
  nicRomFile?: string;
  /**
   * The firmware: 'bios' (SeaBIOS, QEMU's default; the default here) or
   * 'uefi' (OVMF from Debian's ovmf package: OVMF_CODE_4M.fd read-only, and a
   * per-guest copy of OVMF_VARS_4M.fd as its NVRAM, kept across power cycles).
   * QEMU cannot change it while it runs.
   */
  firmware?: 'bios' | 'uefi';
  /** The guest's own copy of the UEFI variables; default <diskPath>.OVMF_VARS.fd, created from OVMF_VARS_4M.fd when missing. */
  uefiVarsPath?: string;
  /** More ports to forward from the host's 127.0.0.1, each to a guest address (default the DHCP one, 10.0.2.15) and port. */
  forwards?: { hostPort: number; guestPort: number; guestAddress?: string }[];
}

/** Debian's OVMF (package ovmf), the 4 MiB build QEMU's own firmware descriptors name. */
export const OVMF_CODE = '/usr/share/OVMF/OVMF_CODE_4M.fd';
export const OVMF_VARS_TEMPLATE = '/usr/share/OVMF/OVMF_VARS_4M.fd';

/** Why UEFI guests cannot run here, or undefined when they can. */
export function uefiUnavailable(): string | undefined {
  for (const path of [OVMF_CODE, OVMF_VARS_TEMPLATE]) {
    if (!existsSync(path)) return `${path} is missing (apt-get install -y ovmf)`;
  }
  return undefined;
}

export interface Guest {
  readonly name: string;
  readonly mac: string;
  readonly diskPath: string;
  readonly consolePath: string;
  readonly qmpSocketPath: string;
  /** 127.0.0.1:PORT forwarded to forwardGuestPort, when asked for. */
  readonly forwardedAddress: string | undefined;
  /** What the next reset or start boots from. */
  readonly bootSource: BootSource;
  /** The QEMU process's id while it runs. */
  readonly pid: number | undefined;
  /** True while the machine is on (its CPUs run). */
  readonly poweredOn: boolean;
  /** Date.now() when the current QEMU process was started. */
  readonly startedAt: number | undefined;
  /** Events of the current QEMU process (RESET, SHUTDOWN, STOP, RESUME, ...). */
  readonly events: readonly QmpEvent[];
  /** Runs a QMP command on this guest's QEMU. */
  qmp<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T>;
  /** Powers on from a fresh reset, booting bootSource. Does nothing when on. */
  powerOn(): Promise<void>;
  /** Hard power off. Does nothing when off. */
  powerOff(): Promise<void>;
  /** Hard reset; powers on when off. */
  reset(): Promise<void>;
  /** Boots from this at the next reset or power on. */
  setBootDevice(source: BootSource): Promise<void>;
  /** Characters of console output so far: pass as `since` to wait only for what comes after. */
  consoleLength(): number;
  /** Waits for console output after `since` to match; rejects on timeout, or when the machine is off before it matched. */
  waitForConsole(pattern: RegExp, timeoutMs: number, options?: { since?: number }): Promise<RegExpExecArray>;
  /** The last lines of the console, for failure messages. */
  consoleTail(lines?: number): string;
  /** Resolves when the machine is off (the guest powered itself off, or a power off); rejects after timeoutMs. */
  waitForPowerOff(timeoutMs: number): Promise<void>;
  /** Ends QEMU whatever its state. Idempotent; never throws. */
  stop(): Promise<void>;
}

const DEFAULT_DISK_BYTES = 1024 ** 3;
const QMP_CONNECT_TIMEOUT_MS = 15_000;
const KILL_WAIT_MS = 5_000;

/** Why QEMU guests cannot run here, or undefined when they can. */
export function qemuUnavailable(binary = 'qemu-system-x86_64'): string | undefined {
  if (process.platform !== 'linux') return `QEMU guests need Linux (this is ${process.platform})`;
  const probe = spawnSync(binary, ['--version'], { timeout: 10_000, stdio: 'ignore' });
  if (probe.error) return `${binary} is not installed (${(probe.error as NodeJS.ErrnoException).code ?? probe.error.message})`;
  if (probe.status !== 0) return `${binary} --version exited with ${probe.status}`;
  return undefined;
}

/** A host port nobody listens on right now, on 127.0.0.1. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}

/** A locally administered unicast MAC in QEMU's 52:54:00 range, from a number (0..0xffffff). */
export function labMac(index: number): string {
  const bytes = [0x52, 0x54, 0x00, (index >> 16) & 0xff, (index >> 8) & 0xff, index & 0xff];
  return bytes.map((b) => b.toString(16).padStart(2, '0')).join(':');
}

/**
 * Creates the guest and (unless poweredOn is false) powers it on. Stop it
 * with stop(), also when a test fails.
 */
export async function startGuest(options: GuestOptions): Promise<Guest> {
  const guest = new QemuGuest(
    options,
    options.forwardGuestPort === undefined ? undefined : (options.forwardHostPort ?? (await freePort())),
  );
  prepareDisk(options.diskPath, options.diskSizeBytes);
  if (options.firmware === 'uefi') {
    const missing = uefiUnavailable();
    if (missing) throw new Error(`guest ${options.name} boots UEFI, but ${missing}`);
  }
  mkdirSync(dirname(options.consolePath), { recursive: true });
  // A new machine starts with an empty console; power cycles append to it.
  writeFileSync(options.consolePath, '');
  mkdirSync(dirname(options.qmpSocketPath), { recursive: true });
  try {
    await (options.poweredOn === false ? guest.start() : guest.powerOn());
  } catch (error) {
    await guest.stop();
    throw error;
  }
  return guest;
}

function prepareDisk(path: string, sizeBytes: number | undefined): void {
  mkdirSync(dirname(path), { recursive: true });
  const fd = openSync(path, existsSync(path) ? 'r+' : 'w+');
  try {
    const size = fstatSync(fd).size;
    const wanted = sizeBytes ?? (size === 0 ? DEFAULT_DISK_BYTES : size);
    if (wanted < size) throw new Error(`disk ${path} is ${size} bytes, more than diskSizeBytes ${wanted}: not shrinking it`);
    if (wanted > size) ftruncateSync(fd, wanted);
  } finally {
    closeSync(fd);
  }
}

/**
 * Runs QEMU ("$@") and kills it when stdin reaches end of file: the parent
 * holds the other end, so however the parent ends, its guests end with it.
 * QEMU's pid goes to stdout. (A background command's stdin is /dev/null
 * unless redirected, hence the copy on fd 3; the watcher keeps none of our
 * output pipes, so that they close when QEMU and the shell end.)
 */
const WATCHDOG = `
exec 3<&0
"$@" </dev/null >/dev/null 3<&- &
qemu=$!
echo "$qemu"
( cat <&3; kill -KILL "$qemu" ) >/dev/null 2>&1 &
watcher=$!
wait "$qemu"
status=$?
kill "$watcher" 2>/dev/null
exit "$status"
`;

const live = new Set<QemuGuest>();
let exitHandlerInstalled = false;

function installExitHandler(): void {
  if (exitHandlerInstalled) return;
  exitHandlerInstalled = true;
  process.on('exit', () => {
    for (const guest of live) guest.killSync();
  });
}

/** Stops every guest this process started (for SIGINT handlers). */
export async function stopAllGuests(): Promise<void> {
  await Promise.all([...live].map((guest) => guest.stop()));
}

interface Run {
  wrapper: ChildProcess;
  qemuPid: Promise<number | undefined>;
  pid: number | undefined;
  qmp: QmpClient | undefined;
  /** What this process was started to boot: a direct kernel boot cannot change without a new process. */
  launchedWith: BootSource;
  poweredOn: boolean;
  exited: Promise<void>;
  hasExited: boolean;
  stderr: string;
}

class QemuGuest implements Guest {
  readonly name: string;
  readonly mac: string;
  readonly diskPath: string;
  readonly consolePath: string;
  readonly qmpSocketPath: string;
  readonly forwardedAddress: string | undefined;
  bootSource: BootSource;
  startedAt: number | undefined;
  private current: Run | undefined;
  private readonly console: ConsoleFile;
  private stopped = false;

  constructor(
    private readonly options: GuestOptions,
    private readonly forwardHostPort: number | undefined,
  ) {
    this.name = options.name;
    this.mac = options.mac;
    this.diskPath = options.diskPath;
    this.consolePath = options.consolePath;
    this.qmpSocketPath = options.qmpSocketPath;
    this.bootSource = options.boot;
    this.forwardedAddress = forwardHostPort === undefined ? undefined : `127.0.0.1:${forwardHostPort}`;
    this.console = new ConsoleFile(options.consolePath);
    if (options.boot === 'network' && !options.netBootUrl && !options.tap)
      throw new Error(`guest ${options.name}: network boot needs netBootUrl (or a tap on a network with a DHCP server)`);
    if (options.tap && options.forwardGuestPort !== undefined)
      throw new Error(`guest ${options.name}: forwardGuestPort works with user networking only, not with a tap`);
  }

  get pid(): number | undefined {
    return this.alive ? this.current?.pid : undefined;
  }

  get poweredOn(): boolean {
    return this.alive && (this.current?.poweredOn ?? false);
  }

  get events(): readonly QmpEvent[] {
    return this.current?.qmp?.events ?? [];
  }

  private get alive(): boolean {
    return this.current !== undefined && !this.current.hasExited;
  }

  async qmp<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    const qmp = this.current?.qmp;
    if (!this.alive || !qmp) throw new Error(`guest ${this.name} has no QEMU running to send ${command} to`);
    return qmp.execute<T>(command, args);
  }

  /** Starts QEMU, off, for a power on through the BMC socket. */
  async start(): Promise<void> {
    await this.ensureProcess();
  }

  /** Launches QEMU when there is none, or when a direct kernel boot changed; leaves it off (prelaunch). */
  private async ensureProcess(): Promise<Run> {
    if (this.stopped) throw new Error(`guest ${this.name} was stopped`);
    const run = this.current;
    if (run && !run.hasExited && sameLaunch(run.launchedWith, this.bootSource)) return run;
    if (run && !run.hasExited) await this.kill(run);
    return this.launch();
  }

  async powerOn(): Promise<void> {
    const run = await this.ensureProcess();
    if (run.poweredOn) return;
    const { status } = await this.qmp<{ status: string }>('query-status');
    // Fresh from -S the machine has never run; otherwise it starts over, as a power on does.
    if (status !== 'prelaunch') await this.qmp('system_reset');
    await this.qmp('cont');
    run.poweredOn = true;
  }

  async powerOff(): Promise<void> {
    const run = this.current;
    if (!run || run.hasExited || !run.poweredOn) return;
    await this.qmp('stop');
    run.poweredOn = false;
  }

  async reset(): Promise<void> {
    if (!this.poweredOn || !sameLaunch(this.current?.launchedWith, this.bootSource)) return this.powerOn();
    await this.qmp('system_reset');
  }

  async setBootDevice(source: BootSource): Promise<void> {
    if (source === 'network' && !this.options.netBootUrl && !this.options.tap)
      throw new Error(`guest ${this.name}: network boot needs netBootUrl`);
    this.bootSource = source;
    if (!this.alive || typeof source !== 'string') return;
    // Only the NIC moves (1 before the disk's 2, or 3 after it), so no two devices ever share an index.
    await this.qmp('qom-set', { path: '/machine/peripheral/nic0', property: 'bootindex', value: bootIndexes(source).nic });
  }

  consoleLength(): number {
    return this.console.refresh().length;
  }

  async waitForConsole(pattern: RegExp, timeoutMs: number, options: { since?: number } = {}): Promise<RegExpExecArray> {
    const since = options.since ?? 0;
    const deadline = Date.now() + timeoutMs;
    const flags = pattern.flags.replace('g', '');
    for (;;) {
      const offBefore = !this.poweredOn;
      const text = this.console.refresh().slice(since);
      const match = new RegExp(pattern.source, flags).exec(text);
      if (match) return match;
      if (offBefore) {
        const stderr = this.current?.hasExited ? this.current.stderr.trim() : '';
        throw new Error(
          `guest ${this.name} is off${stderr ? ` (QEMU ended: ${stderr})` : ''} without ${pattern} on its console; last lines:\n${this.consoleTail()}`,
        );
      }
      if (Date.now() >= deadline) {
        throw new Error(`guest ${this.name}: no ${pattern} on its console within ${timeoutMs} ms; last lines:\n${this.consoleTail()}`);
      }
      await sleep(100);
    }
  }

  consoleTail(lines = 30): string {
    return this.console.tail(lines);
  }

  async waitForPowerOff(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.poweredOn) {
      if (Date.now() >= deadline) {
        throw new Error(`guest ${this.name} did not power off within ${timeoutMs} ms; last lines:\n${this.consoleTail()}`);
      }
      await sleep(50);
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    const run = this.current;
    if (run && !run.hasExited) await this.kill(run);
    live.delete(this);
    rmSync(this.qmpSocketPath, { force: true });
    if (this.options.bmcSocketPath) rmSync(this.options.bmcSocketPath, { force: true });
  }

  /** For the exit handler: synchronous. */
  killSync(): void {
    const run = this.current;
    if (!run || run.hasExited) return;
    if (run.pid !== undefined) signal(run.pid, 'SIGKILL');
    run.wrapper.kill('SIGKILL');
  }

  private async kill(run: Run): Promise<void> {
    run.qmp?.close();
    const pid = run.pid ?? (await Promise.race([run.qemuPid, sleep(1000).then(() => undefined)]));
    if (pid !== undefined) signal(pid, 'SIGKILL');
    // Closing stdin makes the watchdog kill QEMU too, should its pid not be known yet.
    run.wrapper.stdin?.end();
    await Promise.race([run.exited, sleep(KILL_WAIT_MS)]);
    if (!run.hasExited) run.wrapper.kill('SIGKILL');
  }

  private async launch(): Promise<Run> {
    rmSync(this.qmpSocketPath, { force: true });
    if (this.options.bmcSocketPath) rmSync(this.options.bmcSocketPath, { force: true });
    const binary = this.options.qemuBinary ?? 'qemu-system-x86_64';
    const args = this.qemuArgs();
    this.startedAt = Date.now();
    if (this.options.firmware === 'uefi') {
      const vars = this.uefiVarsPath();
      if (!existsSync(vars)) copyFileSync(OVMF_VARS_TEMPLATE, vars);
    }
    const wrapper = spawn('/bin/sh', ['-c', WATCHDOG, 'qemu-watchdog', ...(this.options.commandPrefix ?? []), binary, ...args], {
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    installExitHandler();
    live.add(this);
    let resolvePid: (pid: number | undefined) => void = () => {};
    const run: Run = {
      wrapper,
      qemuPid: new Promise((resolve) => {
        resolvePid = resolve;
      }),
      pid: undefined,
      qmp: undefined,
      launchedWith: this.bootSource,
      poweredOn: false,
      hasExited: false,
      stderr: '',
      exited: new Promise((resolve) => {
        wrapper.once('close', () => {
          run.hasExited = true;
          run.poweredOn = false;
          run.qmp?.close();
          // The watchdog's `cat` ends with our end of the pipe.
          wrapper.stdin?.destroy();
          resolvePid(undefined);
          resolve();
        });
      }),
    };
    wrapper.stdin?.on('error', () => {});
    let out = '';
    wrapper.stdout?.setEncoding('utf8').on('data', (text: string) => {
      out += text;
      const line = /^(\d+)\n/.exec(out);
      if (line && run.pid === undefined) {
        run.pid = Number(line[1]);
        resolvePid(run.pid);
      }
    });
    wrapper.stderr?.setEncoding('utf8').on('data', (text: string) => {
      run.stderr = (run.stderr + text).slice(-8192);
    });
    this.current = run;
    try {
      run.qmp = await QmpClient.connect(this.qmpSocketPath, {
        timeoutMs: QMP_CONNECT_TIMEOUT_MS,
        givenUp: () => (run.hasExited ? `QEMU exited at start: ${run.stderr.trim() || 'no message'}` : undefined),
      });
    } catch (error) {
      await this.kill(run);
      throw new Error(`guest ${this.name}: ${(error as Error).message}\n  ${binary} ${args.join(' ')}`);
    }
    // Power changes made through the BMC socket, or by the guest, show up here as events.
    run.qmp.onEvent((event) => {
      if (event.event === 'STOP' || event.event === 'SHUTDOWN') run.poweredOn = false;
      else if (event.event === 'RESUME') run.poweredOn = true;
    });
    return run;
  }

  /** The guest's own copy of OVMF's variable store (boot entries persist across power cycles, as in NVRAM). */
  private uefiVarsPath(): string {
    return this.options.uefiVarsPath ?? `${this.options.diskPath}.OVMF_VARS.fd`;
  }

  private qemuArgs(): string[] {
    const o = this.options;
    const source = this.bootSource;
    const order = bootIndexes(typeof source === 'string' ? source : 'network');
    const netdev = o.tap ? ['tap', 'id=net0', `ifname=${o.tap}`, 'script=no', 'downscript=no'] : ['user', 'id=net0'];
    if (o.netBootUrl && !o.tap) netdev.push(`bootfile=${o.netBootUrl}`);
    if (o.forwardGuestPort !== undefined) netdev.push(`hostfwd=tcp:127.0.0.1:${this.forwardHostPort}-:${o.forwardGuestPort}`);
    for (const f of o.forwards ?? []) netdev.push(`hostfwd=tcp:127.0.0.1:${f.hostPort}-${f.guestAddress ?? ''}:${f.guestPort}`);
    const nicRom = o.nicRomFile === undefined ? '' : `,romfile=${o.nicRomFile}`;
    const firmware =
      o.firmware === 'uefi'
        ? [
            '-drive',
            `if=pflash,format=raw,unit=0,readonly=on,file=${OVMF_CODE}`,
            '-drive',
            `if=pflash,format=raw,unit=1,file=${this.uefiVarsPath()}`,
          ]
        : [];
    const serial = (o.diskSerial ?? `mc-${createHash('sha256').update(o.name).digest('hex').slice(0, 12)}`).slice(0, 20);
    const args = [
      '-name',
      `guest=${o.name}`,
      '-accel',
      'tcg',
      '-machine',
      'pc',
      ...firmware,
      '-m',
      String(o.memoryMiB ?? 1024),
      '-smp',
      String(o.cpus ?? 1),
      '-nodefaults',
      '-no-user-config',
      // Besides no display, -nographic has SeaBIOS copy its screen (and iPXE's) to the serial port.
      '-nographic',
      '-monitor',
      'none',
      '-S',
      '-no-shutdown',
      '-qmp',
      `unix:${o.qmpSocketPath},server=on,wait=off`,
      ...(o.bmcSocketPath ? ['-qmp', `unix:${o.bmcSocketPath},server=on,wait=off`] : []),
      '-chardev',
      `file,id=console0,path=${o.consolePath},append=on`,
      '-serial',
      'chardev:console0',
      '-smbios',
      `type=1,manufacturer=metalcast-lab,product=QEMU guest,serial=${o.name},uuid=${uuidFrom(o.name)}`,
      '-netdev',
      netdev.join(','),
      '-device',
      `virtio-net-pci,id=nic0,netdev=net0,mac=${o.mac},bootindex=${order.nic}${nicRom}`,
      '-drive',
      `file=${o.diskPath},if=none,id=drive0,format=raw,cache=writeback,discard=unmap`,
      '-device',
      `virtio-blk-pci,id=disk0,drive=drive0,serial=${serial},bootindex=${order.disk}`,
    ];
    if (o.cdrom) args.push('-drive', 'if=none,id=cddrive0,media=cdrom,readonly=on', '-device', 'ide-cd,id=cd0,drive=cddrive0,bootindex=4');
    if (typeof source !== 'string') args.push('-kernel', source.kernel, '-initrd', source.initrd, '-append', source.append);
    return [...args, ...(o.extraArgs ?? [])];
  }
}

function sameLaunch(a: BootSource | undefined, b: BootSource): boolean {
  if (a === undefined) return false;
  if (typeof a === 'string' || typeof b === 'string') return typeof a === 'string' && typeof b === 'string';
  return a.kernel === b.kernel && a.initrd === b.initrd && a.append === b.append;
}

function bootIndexes(device: BootDevice): { nic: number; disk: number } {
  return device === 'network' ? { nic: 1, disk: 2 } : { nic: 3, disk: 2 };
}

/** A stable SMBIOS UUID per machine name, so that the agent sees the same machine every boot. */
function uuidFrom(name: string): string {
  const hex = createHash('sha256').update(`metalcast-lab:${name}`).digest('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-4${hex.slice(13, 16)}-8${hex.slice(17, 20)}-${hex.slice(20, 32)}`;
}

function signal(pid: number, name: NodeJS.Signals): void {
  try {
    process.kill(pid, name);
  } catch {
    // already gone
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref());
}

/** The console file, read as it grows. Text is latin1 (the console is ASCII), \r removed. */
class ConsoleFile {
  private text = '';
  private offset = 0;

  constructor(private readonly path: string) {}

  refresh(): string {
    let fd: number;
    try {
      fd = openSync(this.path, 'r');
    } catch {
      return this.text;
    }
    try {
      const chunk = Buffer.alloc(64 * 1024);
      for (;;) {
        const read = readSync(fd, chunk, 0, chunk.length, this.offset);
        if (read <= 0) break;
        this.offset += read;
        this.text += chunk.subarray(0, read).toString('latin1').replaceAll('\r', '');
      }
    } finally {
      closeSync(fd);
    }
    return this.text;
  }

  tail(lines: number): string {
    return this.refresh()
      .split('\n')
      .slice(-lines)
      .map((line) => `    | ${line}`)
      .join('\n');
  }
}
